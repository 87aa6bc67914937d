"""Dataset kinds nnU-Net users bring, for every architecture through the stock commands: several input
channels, BraTS-style overlapping regions, an ignore label, strongly anisotropic spacing, very small
structures (about 0.1 % of the voxels). Each case trains the debug schedule on 3d_fullres, checks
nnU-Net's validation, and predicts unseen images.
Cases are marked `matrix(architecture, "kind-<kind>")`: the end-to-end rotation (conftest.py) runs
some of them in each CI run, `--full-matrix` all."""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_prediction_fits_image, matrix
from nnunet_ext.tools.workspace import Workspace
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools.make_dataset import make_dataset

pytestmark = pytest.mark.e2e

BASE = dict(shape=(24, 40, 40), spacing=(3.0, 1.0, 1.0), n_cases=6, n_test_cases=1)
KINDS = {
    "4ch": dict(n_channels=4),
    "regions": dict(n_labels=3, regions=True),
    "ignore": dict(ignore_label=True),
    "aniso": dict(shape=(12, 48, 48), spacing=(6.0, 0.8, 0.8)),  # nnU-Net pools in-plane only at first
    "small": dict(object_scale=0.2),  # objects of a few voxels: nnU-Net's foreground oversampling finds them
}


@pytest.fixture(scope="session")
def kind_workspace(tmp_path_factory):
    """kind -> a workspace with that kind of dataset (id 997), planned and preprocessed; made on first use,
    so a run builds only the kinds its rotation selected."""
    made = {}

    def get(kind: str) -> Workspace:
        if kind not in made:
            ws = Workspace(tmp_path_factory.mktemp(f"kind_{kind}"))
            make_dataset(ws.raw, 997, f"Kind{kind}", **{**BASE, **KINDS[kind]})
            ws.run("nnUNetv2_plan_and_preprocess", "-d", "997", "-c", "3d_fullres", "-np", "2")
            ws.dataset = f"Dataset997_Kind{kind}"
            made[kind] = ws
        return made[kind]

    return get


@pytest.mark.parametrize("arch_name,kind", [
    pytest.param(a, k, marks=matrix(a, f"kind-{k}"), id=f"{a}-{k}")
    for a, arch in ARCHITECTURES.items() if 3 in arch.dims for k in KINDS])
def test_trains_validates_and_predicts(arch_name, kind, kind_workspace, tmp_path):
    ws = kind_workspace(kind)
    options = {**BASE, **KINDS[kind]}
    trainer = f"{ARCHITECTURES[arch_name].trainer}_debug"
    ws.run("nnUNetv2_train", "997", "3d_fullres", "0", "-tr", trainer, "-device", "cpu")

    summary = json.loads((ws.fold_dir(ws.dataset, trainer, "3d_fullres") / "validation" / "summary.json").read_text())
    labels = options.get("n_labels", 2)
    assert len(summary["mean"]) == labels  # one entry per label or region, the ignore label excluded
    assert all(math.isfinite(m["Dice"]) for m in summary["mean"].values())

    images = ws.raw / ws.dataset / "imagesTs"
    ws.run("nnUNetv2_predict", "-i", images, "-o", tmp_path, "-d", "997", "-c", "3d_fullres", "-f", "0",
           "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")
    cases = sorted({p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz")})
    assert len(list(images.glob("*.nii.gz"))) == len(cases) * options.get("n_channels", 1)
    for case in cases:
        # regions come back as labels (regions_class_order); the ignore label is never predicted
        assert_prediction_fits_image(tmp_path / f"{case}.nii.gz", images / f"{case}_0000.nii.gz", range(labels + 1))
