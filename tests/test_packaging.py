"""The project as users install it: a built wheel in a fresh virtual environment.

The rest of the suite runs on the editable install, where `trainers/` is found in the checkout. Only a
wheel shows that the force-included `_trainer_search` folder ships, that `nnunet-ext env` points at it
and that nnU-Net's own lookup finds our trainer classes there. The fresh environment borrows this
environment's dependencies through a `.pth` line rather than reinstalling them (torch is gigabytes),
and nothing is fetched from the network.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from nnunet_ext.ops import cpu_kernel

REPO = Path(__file__).resolve().parents[1]
TRAINER = "nnUNetTrainerAttentionUNet"

# Runs in the fresh environment with nnUNet_extTrainer set; argv[1] is that environment's root.
LOOKUP_SCRIPT = """
import pickle, sys
from pathlib import Path

import torch
from torch import nn
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

venv = Path(sys.argv[1]).resolve()
cls = recursive_find_trainer_class_by_name("nnUNetTrainerAttentionUNet_debug")

import nnunet_ext.trainers
from nnunet_ext.registry import get_architecture
from nnunet_ext.topology import Topology

module_file = Path(sys.modules[cls.__module__].__file__).resolve()
assert cls is nnunet_ext.trainers.nnUNetTrainerAttentionUNet_debug, (cls, cls.__module__)
assert venv in module_file.parents, module_file
assert pickle.loads(pickle.dumps(cls)) is cls

topology = Topology(conv_op=nn.Conv2d, features_per_stage=(4, 8), kernel_sizes=((3, 3), (3, 3)),
                    strides=((1, 1), (2, 2)), n_blocks_per_stage=(2, 2), n_conv_per_stage_decoder=(2,),
                    patch_size=(16, 16), norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
net = get_architecture(cls.architecture).build(topology, 1, 2, deep_supervision=False)
with torch.no_grad():
    shape = tuple(net(torch.zeros(1, 1, 16, 16)).shape)
assert shape == (1, 2, 16, 16), shape
print("WHEEL_LOOKUP_OK", module_file)
"""


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` and fail with its whole output if it exits non-zero."""
    args = [str(c) for c in cmd]
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode:
        pytest.fail(f"{' '.join(args)[:300]} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}", pytrace=False)
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", REPO, "-w", out])
    (built,) = out.glob("nnunet_ext-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new venv of the base interpreter holding only the wheel. Its `.pth` file names this venv's
    site-packages: a directory line is appended to sys.path, but .pth files inside that directory are
    not read, so the editable install's path to the checkout stays out."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys._base_executable, "-m", "venv", "--without-pip", venv])
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
          "install", "--no-deps", "--no-index", wheel])
    borrowed = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (_site_packages(venv) / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return venv


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def _run_in(venv: Path, cmd: list, **env) -> subprocess.CompletedProcess:
    """Run in `venv` outside the checkout (a cwd of REPO would put the source on sys.path), with no
    PYTHONPATH or nnUNet_extTrainer inherited."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "nnUNet_extTrainer")}
    return _run(cmd, cwd=venv, env={**clean, **env})


def test_wheel_ships_the_package_and_the_trainer_search_folder(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    sources = {f"nnunet_ext/ops/csrc/{source.name}" for source in cpu_kernel.SOURCES}  # every compiled loop's
    assert {"nnunet_ext/_trainer_search/nnunet_ext_trainers.py", "nnunet_ext/trainers/__init__.py",
            "nnunet_ext/memory_models.json", *sources} <= names
    assert "nnunet-ext = nnunet_ext.tools.cli:main" in scripts.splitlines()
    # Only the package and its metadata: no top-level trainers/, tests/, plans/ or stray folders.
    assert {n.split("/")[0] for n in names} == {"nnunet_ext", entry_points.split("/")[0]}


def test_installed_package_is_the_wheel_not_the_checkout(fresh):
    out = _run_in(fresh, [fresh / "bin" / "python", "-c", "import nnunet_ext; print(nnunet_ext.__file__)"]).stdout
    assert Path(out.strip()).resolve() == (_site_packages(fresh) / "nnunet_ext" / "__init__.py").resolve()


def test_env_points_at_the_shipped_folder(fresh):
    shipped = (_site_packages(fresh) / "nnunet_ext" / "_trainer_search").resolve()
    out = _run_in(fresh, [fresh / "bin" / "nnunet-ext", "env"]).stdout
    assert out.strip() == f"export nnUNet_extTrainer={shlex.quote(str(shipped))}"


def test_list_names_the_trainers(fresh):
    assert TRAINER in _run_in(fresh, [fresh / "bin" / "nnunet-ext", "list"]).stdout


def test_nnunet_finds_the_installed_trainer(fresh):
    shipped = _site_packages(fresh) / "nnunet_ext" / "_trainer_search"
    result = _run_in(fresh, [fresh / "bin" / "python", "-c", LOOKUP_SCRIPT, fresh], nnUNet_extTrainer=str(shipped))
    assert "WHEEL_LOOKUP_OK" in result.stdout, result.stdout + result.stderr
