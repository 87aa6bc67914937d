"""`nnunet-ext doctor`: checks the setup (nnU-Net's version and variables, trainer discovery, torch,
the fast paths) and, with -d, that every architecture can be built from a dataset's plans; prints fixes."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from nnunet_ext import discovery
from nnunet_ext.memory_models import MissingMemoryModel
from nnunet_ext.registry import ARCHITECTURES, fast_path_state
from nnunet_ext.tools.options import add_dataset_options
from nnunet_ext.tools.plans_io import load_configuration
from nnunet_ext.tools.report import error_text
from nnunet_ext.topology import Topology

SUPPORTED_NNUNET = ("2.8", "2.9")  # [lower, upper) of the nnunetv2 releases this version is tested on


def add_arguments(parser) -> None:
    add_dataset_options(parser, required=False, help="also check that every architecture can be built from this "
                                                     "dataset's plans (name or id)")


def _doctor_checks(args):
    """Yield (ok, what, fix) triples; ok is True, False (a problem) or None (a note)."""
    version = importlib.metadata.version("nnunetv2")
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    low, high = (tuple(int(p) for p in v.split(".")) for v in SUPPORTED_NNUNET)
    yield (low <= major_minor < high, f"nnunetv2 {version}",
           f"pip install 'nnunetv2>={SUPPORTED_NNUNET[0]},<{SUPPORTED_NNUNET[1]}'")

    import torch

    cuda = torch.cuda.is_available()
    device = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "no CUDA GPU: train and predict with -device cpu"
    yield True, f"torch {torch.__version__}, {device}", ""

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        yield (value is not None and Path(value).is_dir(), f"{var}={value or '(unset)'}",
               f"export {var}=/path/to/{var} (an existing folder; see nnU-Net's setting_up_paths.md)")

    yield (discovery.is_configured(), f"{discovery.ENV_VAR}={os.environ.get(discovery.ENV_VAR) or '(unset)'}",
           'eval "$(nnunet-ext env)"')
    if discovery.is_configured():
        import nnunet_ext.trainers as ours

        for arch in ARCHITECTURES.values():
            try:
                found = discovery.find_trainer_like_nnunet(arch.trainer)
                ok = found is getattr(ours, arch.trainer)
                what = f"nnU-Net finds {arch.trainer}" + ("" if ok else f" but as a different class ({found.__module__})")
            except Exception as e:  # any failure of the lookup is what this check reports
                ok, what = False, f"nnU-Net cannot find {arch.trainer}: {type(e).__name__}: {e}"
            yield ok, what, f"another folder on {discovery.ENV_VAR} defines {arch.trainer}, or an import fails there"

    for arch in ARCHITECTURES.values():
        for path in arch.fast_paths:
            missing = path.missing()
            yield None if missing else True, f"{arch.name}: {path.name} {fast_path_state(missing)}", ""
        for dim in arch.dims:  # training does without; `nnunet-ext plan` does not
            try:
                arch.memory_model(dim)
            except MissingMemoryModel as e:
                yield None, f"{arch.name}: {error_text(e)}", ""

    if args.dataset is not None:
        yield from _doctor_plans(args)


def _doctor_plans(args):
    """Can every architecture be built from this dataset's plans configuration?"""
    try:
        cm, num_inputs, num_heads = load_configuration(args.dataset, args.configuration, args.plans)
        topology = Topology.from_plans(cm)
    except Exception as e:  # reported with its message, which says what to do
        yield False, f"plans {args.dataset}/{args.plans}/{args.configuration}: {error_text(e)}", ""
        return
    yield True, f"plans {args.plans} '{args.configuration}': {topology.dim}D, {topology.n_stages} stages, " \
                f"patch {list(topology.patch_size)}", ""
    for arch in ARCHITECTURES.values():
        try:
            net = arch.build(topology, num_inputs, num_heads)
            yield True, f"{arch.name} builds: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", ""
        except Exception as e:
            yield False, f"{arch.name} cannot take these plans: {error_text(e)}", ""


def main(args) -> int:
    problems = 0
    for ok, what, fix in _doctor_checks(args):
        mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
        print(f"[{mark}] {what}")
        if ok is False:
            problems += 1
            if fix:
                print(f"       fix: {fix}")
    print(f"\n{problems} problem(s) found." if problems else "\nAll checks passed.")
    return 1 if problems else 0
