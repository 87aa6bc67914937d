"""The rest of nnU-Net's workflow on our trainers, through the stock commands: `--val --npz`, ensembling,
`nnUNetv2_find_best_configuration`, export to a zip and install elsewhere, `-pretrained_weights`, and
`--c` after the training process was killed mid-epoch. On a copy of the cross-validated workspace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CROSS_VALIDATED, CROSS_VALIDATION_CONFIGURATION as CONFIGURATION
from nnunet_ext.tools.workspace import Workspace, stock_command

pytestmark = pytest.mark.e2e
FIRST, SECOND = CROSS_VALIDATED  # FIRST trained folds 0 and 1, SECOND fold 0


@pytest.fixture(scope="module")
def ws(cross_validated, tmp_path_factory):
    copy = Workspace(tmp_path_factory.mktemp("workflow"))
    for folder in ("raw", "preprocessed", "results"):
        shutil.copytree(getattr(cross_validated, folder) / cross_validated.dataset,
                        getattr(copy, folder) / cross_validated.dataset)
    copy.dataset = cross_validated.dataset
    return copy


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_val_npz_ensemble_and_find_best_configuration(ws):
    """`--val --npz` rewrites the validation with probabilities and the same Dice;
    nnUNetv2_find_best_configuration ranks our two trainers and their ensemble with those Dice, and the
    ensemble's segmentations are the argmax of the two trainers' mean probabilities."""
    validation = {t: ws.fold_dir(ws.dataset, t, CONFIGURATION, 0) / "validation" for t in CROSS_VALIDATED}
    dice = {t: ws.validation_dice(ws.dataset, t, CONFIGURATION)["foreground_mean"] for t in CROSS_VALIDATED}
    for trainer in CROSS_VALIDATED:
        ws.run("nnUNetv2_train", "999", CONFIGURATION, "0", "-tr", trainer, "-device", "cpu", "--val", "--npz")
        assert ws.validation_dice(ws.dataset, trainer, CONFIGURATION)["foreground_mean"] == pytest.approx(dice[trainer])
    cases = sorted(p.name[:-len(".npz")] for p in validation[FIRST].glob("*.npz"))
    assert cases and cases == sorted(p.name[:-len(".npz")] for p in validation[SECOND].glob("*.npz"))

    ws.run("nnUNetv2_find_best_configuration", "999", "-c", CONFIGURATION, "-tr", FIRST, SECOND, "-f", "0", "-np", "2")
    info = json.loads((ws.results / ws.dataset / "inference_information.json").read_text())
    for trainer in CROSS_VALIDATED:
        assert info["all_results"][f"{trainer}__nnUNetPlans__{CONFIGURATION}"] == pytest.approx(dice[trainer])
    ensemble = f"ensemble___{FIRST}__nnUNetPlans__{CONFIGURATION}___{SECOND}__nnUNetPlans__{CONFIGURATION}___0"
    assert ensemble in info["all_results"]
    best = max(info["all_results"], key=info["all_results"].get)
    assert info["best_model_or_ensemble"]["result_on_crossval_pre_pp"] == pytest.approx(info["all_results"][best])

    for case in cases:
        mean = sum(np.load(validation[t] / f"{case}.npz")["probabilities"] for t in CROSS_VALIDATED) / 2
        ensembled = read(ws.results / ws.dataset / "ensembles" / ensemble / f"{case}.nii.gz")
        np.testing.assert_array_equal(ensembled, mean.argmax(0))


def test_export_to_zip_install_elsewhere_and_predict_the_same(ws, tmp_path):
    """A model exported with nnUNetv2_export_model_to_zip and installed into an empty nnUNet_results
    (fresh variables, as on another machine with nnunet-ext installed) predicts what it predicted before."""
    images = ws.raw / ws.dataset / "imagesTs"
    archive = tmp_path / "model.zip"
    ws.run("nnUNetv2_export_model_to_zip", "-d", "999", "-o", archive, "-c", CONFIGURATION, "-tr", FIRST,
           "-f", "0", "1")
    elsewhere = Workspace(tmp_path / "elsewhere")
    elsewhere.run("nnUNetv2_install_pretrained_model_from_zip", archive)
    predict = ["-i", images, "-d", "999", "-c", CONFIGURATION, "-f", "0", "1", "-tr", FIRST, "-device", "cpu",
               "--disable_tta"]
    ws.run("nnUNetv2_predict", *predict, "-o", tmp_path / "here")
    elsewhere.run("nnUNetv2_predict", *predict, "-o", tmp_path / "there")
    names = sorted(p.name for p in (tmp_path / "here").glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in (tmp_path / "there").glob("*.nii.gz"))
    for name in names:
        np.testing.assert_array_equal(read(tmp_path / "here" / name), read(tmp_path / "there" / name))


def test_pretrained_weights_of_the_same_architecture_are_loaded(ws):
    source = ws.fold_dir(ws.dataset, SECOND, CONFIGURATION, 0) / "checkpoint_final.pth"
    out = ws.run("nnUNetv2_train", "999", CONFIGURATION, "1", "-tr", SECOND, "-device", "cpu",
                 "-pretrained_weights", source)
    loaded = out[out.index("Loading pretrained weights"):out.index("################### Done")]
    weights = torch.load(source, map_location="cpu", weights_only=False)["network_weights"]
    expected = [k for k in weights if ".seg_layers." not in k]  # nnU-Net never transfers the heads
    assert expected and all(f"{k} shape" in loaded for k in expected)
    assert (ws.fold_dir(ws.dataset, SECOND, CONFIGURATION, 1) / "checkpoint_final.pth").is_file()


def test_continue_after_the_training_process_was_killed_mid_epoch(ws):
    """SIGKILL to the whole training (main process and data-loading workers) during epoch 2 of a
    4-epoch run, then `--c`: nnU-Net resumes from checkpoint_latest (short schedules save it every
    epoch), keeps the epochs already logged and finishes."""
    trainer = FIRST.replace("_debug", "_demo")
    fold = ws.fold_dir(ws.dataset, trainer, CONFIGURATION, 2)
    command = [stock_command("nnUNetv2_train"), "999", CONFIGURATION, "2", "-tr", trainer, "-device", "cpu"]
    process = subprocess.Popen(command, env=ws.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any("Epoch 2 " in log.read_text() for log in fold.glob("training_log_*.txt")):
            assert process.poll() is None and time.time() < deadline, "the training ended before epoch 2"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert not (fold / "checkpoint_final.pth").exists() and latest["current_epoch"] == 2

    ws.run("nnUNetv2_train", "999", CONFIGURATION, "2", "-tr", trainer, "-device", "cpu", "--c")
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4
    assert final["logging"]["train_losses"][:2] == latest["logging"]["train_losses"][:2]
    assert len(final["logging"]["train_losses"]) == 4
