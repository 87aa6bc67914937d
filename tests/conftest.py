"""Shared fixtures: plans topologies of the shapes nnU-Net produces, small enough for CPU tests; the
end-to-end rotation (docs/testing.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.topology import Topology


def make_topology(dim: int, strides, features, patch_size, residual: bool = False, blocks: int = 2) -> Topology:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    n = len(strides)
    kernels = [tuple(1 if s == 1 and i == 0 and dim == 3 and strides[1][0] == 1 else 3 for s in st)
               for i, st in enumerate(strides)]  # nnU-Net uses 1-wide kernels along an unpooled anisotropic axis
    return Topology(conv_op=conv, features_per_stage=tuple(features), kernel_sizes=tuple(kernels),
                    strides=tuple(tuple(s) for s in strides), n_blocks_per_stage=(blocks,) * n,
                    n_conv_per_stage_decoder=(2,) * (n - 1), patch_size=tuple(patch_size),
                    residual_encoder=residual, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


# (id, topology, input channels). Topologies nnU-Net plans: 2D/3D, 4 to 7 stages, anisotropic
# first strides, patch sizes that are not powers of two, plain and residual (ResEnc) encoders.
TOPOLOGIES = {
    "2d_4stages_1ch": (make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2)], [8, 16, 32, 32], (40, 56)), 1),
    "2d_7stages_4ch": (make_topology(2, [(1, 1)] + [(2, 2)] * 6, [4, 8, 16, 32, 32, 32, 32], (128, 192)), 4),
    "3d_5stages_aniso_4ch": (make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)],
                                           [4, 8, 16, 32, 32], (20, 48, 32)), 4),
    "3d_4stages_resenc_1ch": (make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)], [4, 8, 16, 32],
                                            (24, 40, 16), residual=True, blocks=1), 1),
    "3d_6stages_1ch": (make_topology(3, [(1, 1, 1)] + [(2, 2, 2)] * 5, [4, 8, 16, 16, 32, 32], (64, 64, 32)), 1),
}


def assert_compiles_like_eager(net: nn.Module, x: torch.Tensor) -> None:
    """torch.compile (the aot_eager backend, which runs on CPU) gives eager's outputs and gradients
    reach every parameter: what nnU-Net's compile on CUDA relies on."""
    # Start from dynamo's initial state: what earlier compiles in this process left behind made tracing D-LKA
    # Net's deformable convolution take 99 s instead of 4 s.
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    out, reference = compiled(x), net(x)
    for o, r in zip(out, reference):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    out[0].sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def assert_prediction_fits_image(prediction: Path, image: Path, labels) -> None:
    """A segmentation from nnUNetv2_predict lies on its input image's grid and holds only `labels`."""
    prediction, image = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(image))
    assert prediction.GetSize() == image.GetSize()
    np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(prediction.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(prediction.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= set(labels)


def assert_random_only_in_training(net: nn.Module, x: torch.Tensor) -> None:
    """Stochastic depth: two training passes differ, evaluation is deterministic."""
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(net.train()(x)[0], net(x)[0])
        assert torch.equal(net.eval()(x)[0], net(x)[0])


@pytest.fixture(params=list(TOPOLOGIES), ids=list(TOPOLOGIES))
def topology_case(request):
    return TOPOLOGIES[request.param]


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """A tiny synthetic 3D dataset, planned and preprocessed for 2d and 3d_fullres by the stock command,
    with ResEnc (M) plans next to the default ones. Shared by every test that needs real plans."""
    from nnunet_ext.tools.workspace import Workspace
    from nnunet_ext.tools.make_dataset import make_dataset

    ws = Workspace(tmp_path_factory.mktemp("nnunet"))
    make_dataset(ws.raw, 999, "Tiny", shape=(24, 40, 40), spacing=(3.0, 1.0, 1.0))
    ws.run("nnUNetv2_plan_and_preprocess", "-d", "999", "-c", "2d", "3d_fullres", "-np", "2",
           "--verify_dataset_integrity")
    ws.run("nnUNetv2_plan_experiment", "-d", "999", "-pl", "nnUNetPlannerResEncM")
    ws.dataset = "Dataset999_Tiny"
    return ws


CROSS_VALIDATED = ("nnUNetTrainerAttentionUNet_debug", "nnUNetTrainerUKAN_debug")
CROSS_VALIDATION_CONFIGURATION = "3d_fullres"


@pytest.fixture(scope="session")
def cross_validated(planned, tmp_path_factory):
    """A copy of the tiny planned dataset on which the first of CROSS_VALIDATED trained folds 0 and 1
    and the second fold 0 only (about three minutes on two CPU cores): real results folders for
    `nnunet-ext compare` and real checkpoints of two architectures. A workspace of its own, so no
    other test's training touches it."""
    from nnunet_ext.tools.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("cross_validated"))
    for folder in ("raw", "preprocessed"):
        shutil.copytree(getattr(planned, folder) / planned.dataset, getattr(ws, folder) / planned.dataset)
    ws.dataset = planned.dataset
    first, second = CROSS_VALIDATED
    for trainer, fold in ((first, 0), (first, 1), (second, 0)):
        ws.run("nnUNetv2_train", "999", CROSS_VALIDATION_CONFIGURATION, str(fold), "-tr", trainer, "-device", "cpu")
    return ws


@pytest.fixture
def nnunet_env(planned, monkeypatch):
    """The planned workspace's nnU-Net variables in this process's environment."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, planned.env()[key])
    return planned


def initialized_trainer(workspace, name: str, configuration: str = "2d"):
    """Trainer `name` of nnunet_ext.trainers on the planned workspace's default plans, initialised in this
    process on CPU (its network built), as nnUNetv2_train would set it up."""
    import nnunet_ext.trainers as trainers

    folder = workspace.preprocessed / workspace.dataset
    plans, dataset = (json.loads((folder / f).read_text()) for f in ("nnUNetPlans.json", "dataset.json"))
    # nnU-Net's run_training puts continue_training into the plans it hands the trainer
    trainer = getattr(trainers, name)({**plans, "continue_training": False}, configuration, 0, dataset,
                                      torch.device("cpu"))
    trainer.initialize()
    return trainer


def channels_first(t: torch.Tensor) -> torch.Tensor:
    """The values of a (batch, k, L) tensor in mamba_ssm's "d (b l)" layout, the one our Mamba layer
    hands its convolution and scan: a (batch, k, L) view of a (k, batch, L) tensor."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def assert_gradients_close(names, grads, grads_ref, rtol: float = 1e-4, atol_scale: float = 1e-5) -> None:
    """Each gradient matches its float64 reference, up to `atol_scale` times the reference's largest entry."""
    for name, got, expected in zip(names, grads, grads_ref):
        torch.testing.assert_close(got.double(), expected.double(), rtol=rtol,
                                   atol=atol_scale * expected.abs().max().item(),
                                   msg=lambda m: f"gradient of {name}: {m}")


@pytest.fixture(params=["compiled", "pytorch"])
def cpu_path(request, monkeypatch):
    """Run a test on the compiled CPU loops of a Mamba layer, which a machine with a C compiler (CI's)
    must build, and on the PyTorch paths."""
    import nnunet_ext.ops.cpu_kernel as cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_enabled", request.param == "compiled")
    if request.param == "compiled":
        assert cpu_kernel.cpu_kernel_off_reason() is None, cpu_kernel.cpu_kernel_off_reason()
    return request.param


@pytest.fixture(params=["sgemm", "onednn"])
def products(request, monkeypatch):
    """Run a test with every matrix product of nnunet_ext.ops.linear by PyTorch's (MKL's sgemm) and by oneDNN's
    convolution, whatever its size (the tests' products are smaller than the threshold)."""
    from nnunet_ext.ops import linear

    monkeypatch.setattr(linear, "MIN_MULTIPLY_ADDS", 0 if request.param == "onednn" else 2 ** 62)
    return request.param


@pytest.fixture(scope="session")
def mamba_ssm():
    """The real mamba_ssm's Mamba and selective_scan_ref, importable on CPU (tests/mamba_ssm_reference.py)."""
    import mamba_ssm_reference

    return mamba_ssm_reference.load()


# The rotations. Every end-to-end case is marked `matrix(architecture, variant)` (a variant is a
# configuration, plans or dataset kind); other slow per-architecture cases join a rotation of their own
# with `matrix(architecture, variant, group="<name>")`. A default run keeps one variant per architecture
# and group, chosen by a rotation key that advances with each commit, so successive CI runs cover every
# case while each stays inside CI's time budget; `--full-matrix` runs everything.

def matrix(architecture: str, variant: str, group: str = "end-to-end"):
    """The rotation mark of a registered architecture's case: variants of one network (the registry's `family`)
    share one turn, their cases being the family's variants, so that a family adds one case per run and group."""
    family = ARCHITECTURES[architecture].family
    if not family:
        return pytest.mark.matrix(architecture, variant, group=group)
    return pytest.mark.matrix(family, f"{architecture}-{variant}", group=group)


def pytest_addoption(parser):
    parser.addoption("--full-matrix", action="store_true",
                     help="run every case of the rotations, not one variant per architecture (docs/testing.md)")


def pytest_configure(config):
    config.addinivalue_line("markers", "matrix(architecture, variant, group='end-to-end'): a case of a rotation")


def rotation_key() -> int:
    """NNUNET_EXT_ROTATION if set (to repeat a CI run), else the checkout's commit, else 0."""
    if "NNUNET_EXT_ROTATION" in os.environ:
        return int(os.environ["NNUNET_EXT_ROTATION"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True)
    return int(head.stdout[:8], 16) if head.returncode == 0 else 0


def architectures_in_turn(count: int) -> list[str]:
    """`count` registered architectures of successive families (the registry's `family`; an architecture without
    one is its own), starting where the rotation key points, and the key's variant of each family: for a slow test
    that runs a few of them per run, successive commits taking each in turn, a family no more often than another."""
    families: dict[str, list[str]] = {}
    for name, arch in ARCHITECTURES.items():
        families.setdefault(arch.family or name, []).append(name)
    turns, key = list(families.values()), rotation_key()
    return [variants[key % len(variants)] for variants in (turns[(key + i) % len(turns)] for i in range(count))]


# Groups too slow for a case of every architecture (family) in every run: at most this many take a turn in a
# run, successive ones from where the rotation key points. Seven families of end-to-end cases at one to three
# minutes each took CI past its 40 minutes; with four, the suite grew back to 36-37 minutes of CI's 40 as the
# other tests grew, and with three one slow hour of the machine took it to 42 (2026-12-02). An end-to-end case is
# 1.5 minutes on average; LKM-UNet's fp16 and memory-model cases 40-47 s each, the others' 2-25 s.
TURNS_PER_RUN = {"end-to-end": 2, "fp16": 4, "memory": 4}


def rotation(cases: list[tuple[str, str]], key: int, turns: int | None = None) -> set[tuple[str, str]]:
    """One variant per architecture: the key picks among each architecture's variants, offset by the
    architecture's position so that one run mixes variants. With `turns`, only that many successive architectures
    take a turn, the first at the key's position; the rest of the key picks their variants, so that successive
    keys still cover every case."""
    architectures = sorted({a for a, _ in cases})
    if turns is not None and turns < len(architectures):
        first, key = key % len(architectures), key // len(architectures)
        architectures = [architectures[(first + i) % len(architectures)] for i in range(turns)]
    chosen = set()
    for i, architecture in enumerate(architectures):
        variants = sorted({v for a, v in cases if a == architecture})
        chosen.add((architecture, variants[(key + i) % len(variants)]))
    return chosen


def rotation_by_group(cases: list[tuple[str, str, str]], key: int) -> set[tuple[str, str, str]]:
    """`rotation` within each group of (group, architecture, variant) cases."""
    return {(group, a, v) for group in {g for g, _, _ in cases}
            for a, v in rotation([(a, v) for g, a, v in cases if g == group], key, TURNS_PER_RUN.get(group))}


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-matrix"):
        return
    case = {}  # item -> (group, architecture, variant)
    for item in items:
        marker = item.get_closest_marker("matrix")
        if marker:
            case[item] = (marker.kwargs.get("group", "end-to-end"), *marker.args)
    if not case:
        return
    key = rotation_key()
    chosen = rotation_by_group(list(case.values()), key)
    config.rotation_report = f"end-to-end rotation {key} (NNUNET_EXT_ROTATION={key} repeats it, " \
        f"--full-matrix runs all): " + ", ".join(f"{a}-{v}" for _, a, v in sorted(chosen))
    deselected = [item for item in items if item in case and case[item] not in chosen]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "rotation_report"):
        terminalreporter.write_line(config.rotation_report)
