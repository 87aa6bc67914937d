"""End to end through the stock commands, for every registered architecture in 2d and 3d_fullres, and in
3d_fullres on nnU-Net's ResEnc (M) plans:
nnUNetv2_train (short schedule, CPU) -> nnUNetv2_predict in a fresh process -> nnUNetv2_evaluate_simple,
and a `--c` resume. Each training takes one to two minutes on two CPU cores. A default run keeps one
configuration per architecture (the rotation in conftest.py); `--full-matrix` runs them all."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import assert_prediction_fits_image, matrix
from nnunet_ext.registry import ARCHITECTURES

pytestmark = pytest.mark.e2e

# variant -> (configuration, plans): nnU-Net's default plans in 2D and 3D, and its ResEnc (M) plans
VARIANTS = {"2d": ("2d", "nnUNetPlans"), "3d_fullres": ("3d_fullres", "nnUNetPlans"),
            "3d_fullres-resencM": ("3d_fullres", "nnUNetResEncUNetMPlans")}
CASES = [(arch.name, variant) for arch in ARCHITECTURES.values() for variant, (cfg, _) in VARIANTS.items()
         if (2 if cfg == "2d" else 3) in arch.dims]
LABELS = {0, 1, 2}


@pytest.fixture(scope="module", params=[pytest.param(case, marks=matrix(*case), id="-".join(case))
                                        for case in CASES])
def trained(request, planned):
    arch_name, variant = request.param
    configuration, plans = VARIANTS[variant]
    trainer = f"{ARCHITECTURES[arch_name].trainer}_debug"
    identifier = json.loads((planned.preprocessed / planned.dataset / f"{plans}.json").read_text())[
        "configurations"][configuration]["data_identifier"]
    if not (planned.preprocessed / planned.dataset / identifier).is_dir():  # the ResEnc plans' own data
        planned.run("nnUNetv2_preprocess", "-d", "999", "-plans_name", plans, "-c", configuration, "-np", "2")
    planned.run("nnUNetv2_train", "999", configuration, "0", "-tr", trainer, "-p", plans, "-device", "cpu")
    fold = planned.fold_dir(planned.dataset, trainer, configuration, plans=plans)
    return planned, trainer, configuration, plans, fold


def validation_cases(ws) -> list[str]:
    return json.loads((ws.preprocessed / ws.dataset / "splits_final.json").read_text())[0]["val"]


def test_training_finished_with_finite_losses(trained):
    ws, trainer, configuration, plans, fold = trained
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    logging = checkpoint["logging"]
    assert len(logging["train_losses"]) == 1  # the debug schedule: one epoch
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # and no test-time mirroring
    assert all(math.isfinite(v) for v in logging["train_losses"] + logging["val_losses"])
    assert math.isfinite(ws.validation_dice(ws.dataset, trainer, configuration, plans=plans)["foreground_mean"])


def test_predict_from_final_checkpoint_keeps_geometry_and_matches_validation(trained, tmp_path):
    ws, trainer, configuration, plans, fold = trained
    raw = ws.raw / ws.dataset
    cases = validation_cases(ws)
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for case in cases:
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    ws.run("nnUNetv2_predict", "-i", inputs, "-o", outputs, "-d", "999", "-c", configuration, "-p", plans, "-f", "0",
           "-tr", trainer, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1")

    for case in cases:
        assert_prediction_fits_image(outputs / f"{case}.nii.gz", inputs / f"{case}_0000.nii.gz", LABELS)

    ws.run("nnUNetv2_evaluate_simple", raw / "labelsTr", outputs, "-l", "1", "2", "-np", "1", "--chill")
    ours = json.loads((outputs / "summary.json").read_text())["foreground_mean"]["Dice"]
    nnunet_validation = ws.validation_dice(ws.dataset, trainer, configuration, plans=plans)["foreground_mean"]
    # Same network, cases and sliding window (the checkpoint's mirroring: none): the stock predictor must reproduce
    # validation.
    assert ours == pytest.approx(nnunet_validation, abs=0.01)


def test_continue_training_reloads_the_checkpoint(trained):
    """`--c` after a run that stopped before its final save: nnU-Net rebuilds our network from the
    checkpoint's trainer name, loads it strictly, writes checkpoint_final and validates again."""
    ws, trainer, configuration, plans, fold = trained
    final = fold / "checkpoint_final.pth"
    before = torch.load(final, map_location="cpu", weights_only=False)
    dice_before = ws.validation_dice(ws.dataset, trainer, configuration, plans=plans)["foreground_mean"]
    final.rename(fold / "checkpoint_latest.pth")
    shutil.rmtree(fold / "validation")

    ws.run("nnUNetv2_train", "999", configuration, "0", "-tr", trainer, "-p", plans, "-device", "cpu", "--c")

    after = torch.load(final, map_location="cpu", weights_only=False)
    assert after["current_epoch"] == before["current_epoch"]
    for key, value in before["network_weights"].items():
        assert torch.equal(after["network_weights"][key], value), key
    dice_after = ws.validation_dice(ws.dataset, trainer, configuration, plans=plans)["foreground_mean"]
    assert dice_after == pytest.approx(dice_before, abs=1e-6)
