"""The real mamba_ssm, as an independent reference on a CPU-only machine.

mamba-ssm ships as source whose CUDA extension cannot build without nvcc. Its Python modules are
enough for us: `mamba_ssm.modules.mamba_simple.Mamba` (the module ours must match) and
`selective_scan_ref` (its pure-PyTorch scan). We fetch the source distribution once, without
building it, and import those two modules with the compiled extension replaced by an empty stub;
Mamba's slow path is pointed at `selective_scan_ref`. `scripts/setup.sh` fetches it up front.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

VERSION = "2.3.2.post1"
CACHE = Path(sys.prefix) / "share" / "nnunet-ext-test"
SOURCE = CACHE / f"mamba_ssm-{VERSION}"


def fetch() -> Path:
    """Download and unpack the mamba-ssm sdist into the environment (no build, no install)."""
    if not (SOURCE / "mamba_ssm").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"}
        subprocess.run([sys.executable, "-m", "pip", "download", f"mamba-ssm=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "--no-build-isolation", "-q", "-d", str(CACHE)],
                       check=True, env=env)
        with tarfile.open(CACHE / f"mamba_ssm-{VERSION}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    return SOURCE


def load() -> types.SimpleNamespace:
    """(Mamba class, selective_scan_ref) from the real package, leaving sys.modules as it was so
    that nothing else in the process sees a mamba_ssm."""
    source = fetch()
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in {"mamba_ssm", "selective_scan_cuda"}}
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(source / "mamba_ssm")]  # skip mamba_ssm/__init__.py (imports transformers)
    sys.modules["mamba_ssm"] = package
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] in {"mamba_ssm", "selective_scan_cuda"}]:
            del sys.modules[key]
        sys.modules.update(saved)
    simple.selective_scan_fn = interface.selective_scan_ref  # the slow path's scan, on CPU
    return types.SimpleNamespace(Mamba=simple.Mamba, selective_scan_ref=interface.selective_scan_ref)
