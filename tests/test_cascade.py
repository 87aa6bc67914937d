"""nnU-Net's cascade for every architecture through the stock commands: 3d_lowres, whose validation writes
the `predicted_next_stage` segmentations, then 3d_cascade_fullres, which takes them as extra input
channels, then prediction with `-prev_stage_predictions`.

nnU-Net plans a lowres stage only when the fullres patch covers less than a quarter of the median image;
on a tiny dataset, `-gpu_memory_target 0.02` makes the patch that small. The cascade trains on lowres
predictions of every training case, which nnU-Net writes when it validates them; instead of five folds, a
`splits_final.json` of our own has one fold that trains and validates on both cases (overlapping sets,
fine for checking the plumbing, not for accuracy). Cases are marked `matrix(architecture, "cascade")` (the
end-to-end rotation in conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import assert_prediction_fits_image, matrix
from nnunet_ext.tools.workspace import Workspace
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools.make_dataset import make_dataset

pytestmark = pytest.mark.e2e

DATASET_ID, DATASET = "996", "Dataset996_Cascade"


@pytest.fixture(scope="session")
def cascade_workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("cascade"))
    ws.dataset = DATASET
    make_dataset(ws.raw, int(DATASET_ID), "Cascade", n_cases=2, n_test_cases=1, shape=(32, 48, 48),
                 spacing=(1.0, 1.0, 1.0))
    ws.run("nnUNetv2_extract_fingerprint", "-d", DATASET_ID, "-np", "2")
    ws.run("nnUNetv2_plan_experiment", "-d", DATASET_ID, "-gpu_memory_target", "0.02")
    configurations = json.loads((ws.preprocessed / DATASET / "nnUNetPlans.json").read_text())["configurations"]
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(configurations), sorted(configurations)
    ws.run("nnUNetv2_preprocess", "-d", DATASET_ID, "-c", "3d_lowres", "3d_fullres", "-np", "2")
    cases = sorted(p.name[:-len(".nii.gz")] for p in (ws.raw / DATASET / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": cases, "val": cases}]
    (ws.preprocessed / DATASET / "splits_final.json").write_text(json.dumps(splits))
    return ws, cases


def input_channels_of_checkpoint(ws: Workspace, trainer: str, configuration: str) -> int:
    """How many input channels nnU-Net gives this configuration's network, after checking that the
    checkpoint holds a network built with that many (strict loading fails on any other)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    plans = PlansManager(str(ws.preprocessed / DATASET / "nnUNetPlans.json"))
    dataset_json = json.loads((ws.preprocessed / DATASET / "dataset.json").read_text())
    manager = plans.get_configuration(configuration)
    channels = determine_num_input_channels(plans, manager, dataset_json)
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    network = recursive_find_trainer_class_by_name(trainer).build_network_architecture(
        plans, manager, channels, heads, True)
    checkpoint = torch.load(ws.fold_dir(DATASET, trainer, configuration) / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    network.load_state_dict(checkpoint["network_weights"])
    return channels


@pytest.mark.parametrize("arch_name", [pytest.param(a, marks=matrix(a, "cascade"), id=a)
                                       for a, arch in ARCHITECTURES.items() if 3 in arch.dims])
def test_lowres_then_cascade_train_and_predict(arch_name, cascade_workspace, monkeypatch, tmp_path):
    ws, cases = cascade_workspace
    for key, value in ws.env().items():  # the trainer lookup in input_channels_of_checkpoint
        monkeypatch.setenv(key, value)
    trainer = f"{ARCHITECTURES[arch_name].trainer}_debug"
    ws.run("nnUNetv2_train", DATASET_ID, "3d_lowres", "0", "-tr", trainer, "-device", "cpu")
    next_stage = ws.fold_dir(DATASET, trainer, "3d_lowres").parent / "predicted_next_stage" / "3d_cascade_fullres"
    assert sorted({p.name.split(".")[0] for p in next_stage.iterdir()}) == cases  # every training case

    ws.run("nnUNetv2_train", DATASET_ID, "3d_cascade_fullres", "0", "-tr", trainer, "-device", "cpu")
    assert input_channels_of_checkpoint(ws, trainer, "3d_lowres") == 1
    # the image plus the lowres segmentation, one-hot over its 2 foreground labels
    assert input_channels_of_checkpoint(ws, trainer, "3d_cascade_fullres") == 3

    images = ws.raw / DATASET / "imagesTs"
    lowres, zeros = tmp_path / "lowres", tmp_path / "zeros"
    predict = ("nnUNetv2_predict", "-d", DATASET_ID, "-tr", trainer, "-device", "cpu", "--disable_tta",
               "-npp", "1", "-nps", "1")  # one worker each: nnU-Net's three cost 5 s per prediction on 2 cores
    ws.run(*predict, "-i", images, "-o", lowres, "-c", "3d_lowres", "-f", "0")
    test_cases = sorted(p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    zeros.mkdir()
    for case in test_cases:  # the same geometry, no foreground
        previous = sitk.ReadImage(str(lowres / f"{case}.nii.gz"))
        empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(previous)))
        empty.CopyInformation(previous)
        sitk.WriteImage(empty, str(zeros / f"{case}.nii.gz"))

    probabilities = {}
    for previous in (lowres, zeros):
        out = tmp_path / f"cascade_{previous.name}"
        ws.run(*predict, "-i", images, "-o", out, "-c", "3d_cascade_fullres", "-f", "0",
               "-prev_stage_predictions", previous, "--save_probabilities")
        for case in test_cases:
            assert_prediction_fits_image(out / f"{case}.nii.gz", images / f"{case}_0000.nii.gz", {0, 1, 2})
        probabilities[previous.name] = np.load(out / f"{test_cases[0]}.npz")["probabilities"]
    # the lowres segmentation is an input: another one changes the cascade's output
    assert np.abs(probabilities["lowres"] - probabilities["zeros"]).max() > 1e-4
