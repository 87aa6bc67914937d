"""Faults users run into, through the stock commands: each ends with a message that says what to do,
and nothing is lost."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import CROSS_VALIDATED, CROSS_VALIDATION_CONFIGURATION as CONFIGURATION

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("command", ["--c", "--val"])
def test_a_checkpoint_of_another_architecture_is_refused_and_kept(cross_validated, command):
    """A fold folder holding another trainer's checkpoint (copied in by hand): `--c` and `--val`
    stop before loading it, name both trainers and the fix, and leave the file as it was."""
    ws = cross_validated
    written_by, loaded_by = CROSS_VALIDATED
    source = ws.fold_dir(ws.dataset, written_by, CONFIGURATION, 0) / "checkpoint_final.pth"
    fold = 4 if command == "--c" else 3
    target = ws.fold_dir(ws.dataset, loaded_by, CONFIGURATION, fold)
    target.mkdir(parents=True)
    copied = target / ("checkpoint_latest.pth" if command == "--c" else "checkpoint_final.pth")
    shutil.copy(source, copied)
    try:
        with pytest.raises(RuntimeError) as failed:
            ws.run("nnUNetv2_train", "999", CONFIGURATION, str(fold), "-tr", loaded_by, "-device", "cpu", command)
        message = str(failed.value)  # the tail of the command's output
        assert f"was written by {written_by} and does not hold {loaded_by}'s network (ukan on these plans)" in message
        assert f"Continue or validate it with -tr {written_by}" in message and "The file is unchanged." in message
        assert filecmp.cmp(source, copied, shallow=False)
        assert sorted(p.name for p in target.iterdir() if p.suffix == ".pth") == [copied.name]
    finally:
        shutil.rmtree(target)  # the other tests see the results folders as trained


def test_pretrained_weights_of_another_architecture_are_refused(cross_validated):
    """`-pretrained_weights` goes through nnU-Net's own loader, whose check names the first missing
    tensor; no training starts and the source checkpoint is untouched."""
    ws = cross_validated
    written_by, loaded_by = CROSS_VALIDATED
    source = ws.fold_dir(ws.dataset, written_by, CONFIGURATION, 0) / "checkpoint_final.pth"
    before = source.read_bytes()
    target = ws.fold_dir(ws.dataset, loaded_by, CONFIGURATION, 2)
    try:
        with pytest.raises(RuntimeError) as failed:
            ws.run("nnUNetv2_train", "999", CONFIGURATION, "2", "-tr", loaded_by, "-device", "cpu",
                   "-pretrained_weights", source)
        assert "The pretrained weights do not seem to be compatible with your network" in str(failed.value)
        assert source.read_bytes() == before
        assert not list(target.glob("checkpoint_*.pth"))
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_plans_an_architecture_cannot_take_stop_training_at_once(cross_validated):
    """Plans of a network that is not a U-Net (here nnU-Net's Primus, under a plans name of its own that
    reuses the preprocessed data): the stock train command stops while building the network, with
    the reason and the plans to use instead, before any checkpoint is written."""
    ws = cross_validated
    _, trainer = CROSS_VALIDATED
    folder = ws.preprocessed / ws.dataset
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlans_primus"
    architecture = plans["configurations"][CONFIGURATION]["architecture"]
    architecture.update(network_class_name="dynamic_network_architectures.architectures.primus.Primus",
                        arch_kwargs={"embed_dim": 864, "patch_embed_size": [8, 8, 8]}, _kw_requires_import=[])
    (folder / "nnUNetPlans_primus.json").write_text(json.dumps(plans))
    try:
        with pytest.raises(RuntimeError) as failed:
            ws.run("nnUNetv2_train", "999", CONFIGURATION, "0", "-tr", trainer, "-device", "cpu",
                   "-p", "nnUNetPlans_primus")
        message = str(failed.value)
        assert "Primus' is not a U-Net" in message and "nnUNetPlans, nnUNetResEncUNet*Plans" in message
        assert not list(ws.fold_dir(ws.dataset, trainer, CONFIGURATION, 0, "nnUNetPlans_primus").glob("*.pth"))
    finally:
        (folder / "nnUNetPlans_primus.json").unlink()
        shutil.rmtree(ws.results / ws.dataset / f"{trainer}__nnUNetPlans_primus__{CONFIGURATION}", ignore_errors=True)


OUT_OF_MEMORY = """
import json, os, sys, torch
from nnunet_ext.trainers import nnUNetTrainerLKMUNet
folder = sys.argv[1]
plans = {**json.load(open(os.path.join(folder, "nnUNetPlans.json"))), "continue_training": False}  # as run_training
trainer = nnUNetTrainerLKMUNet(plans, "3d_fullres", 0, json.load(open(os.path.join(folder, "dataset.json"))),
                               device=torch.device("cpu"))
trainer.initialize()
def out_of_memory(x):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
trainer.network.forward = out_of_memory
cm = trainer.configuration_manager
trainer.train_step({"data": torch.zeros(cm.batch_size, 1, *cm.patch_size), "target": torch.zeros(1)})
"""


def test_out_of_memory_in_a_training_step_says_how_to_plan_for_the_gpu(planned):
    """A CUDA out-of-memory cannot be provoked on CPU: the network raises torch's OutOfMemoryError as
    the CUDA allocator does, inside nnU-Net's own training step (in a process of its own: nnU-Net
    reads its path variables at import)."""
    folder = planned.preprocessed / planned.dataset
    out = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(folder)], env=planned.env(), text=True,
                         capture_output=True)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    assert out.returncode != 0 and "torch.OutOfMemoryError: lkm_unet ran out of cpu memory training a batch of " \
        f"{plans['batch_size']} patches of {plans['patch_size']} (nnUNetPlans, 3d_fullres)" in out.stderr
    assert "nnunet-ext plan -d Dataset999_Tiny -a lkm_unet --gpu-memory <GB of your GPU> -c 3d_fullres" in out.stderr
    assert "Tried to allocate 2.00 GiB" in out.stderr  # the original error stays in the traceback


BROKEN_EXTENSION = "libcudart.so.12: cannot open shared object file: No such file or directory"


@pytest.fixture(scope="module")
def mha_lkm_unet(tmp_path_factory):
    """A tiny .mha dataset (the Grand Challenge format; SimpleITK reads NaN and Inf from it, while its
    NIfTI reader turns them into 0) on which LKM-UNet trained a short fold with both fast paths broken:
    a mamba_ssm installed without its compiled extension, as after a failed CUDA build, and a C
    compiler that fails, so the CPU scan cannot be built."""
    from nnunet_ext.tools.workspace import Workspace
    from nnunet_ext.tools.make_dataset import make_dataset

    root = tmp_path_factory.mktemp("mha")
    ops = root / "site" / "mamba_ssm" / "ops"
    ops.mkdir(parents=True)
    (ops.parent / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("")
    (ops / "selective_scan_interface.py").write_text(f"raise ImportError({BROKEN_EXTENSION!r})\n")
    ws = Workspace(root / "ws")
    make_dataset(ws.raw, 998, "Mha", shape=(16, 32, 32), spacing=(3.0, 1.0, 1.0), n_cases=5, file_ending=".mha")
    ws.dataset = "Dataset998_Mha"
    ws.run("nnUNetv2_plan_and_preprocess", "-d", "998", "-c", "3d_fullres", "-np", "2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(root / "site"), prepend=os.pathsep)
        mp.setenv("CC", "false")
        mp.setenv("NNUNET_EXT_CACHE", str(root / "no-build"))
        ws.run("nnUNetv2_train", "998", "3d_fullres", "0", "-tr", "nnUNetTrainerLKMUNet_debug", "-device", "cpu")
    return ws


def test_a_broken_fast_path_is_named_in_the_training_log_and_training_goes_on(mha_lkm_unet):
    fold = mha_lkm_unet.fold_dir(mha_lkm_unet.dataset, "nnUNetTrainerLKMUNet_debug", "3d_fullres")
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert ("compiled CPU Mamba loops: off (false failed to build mamba.c (exit status 1); install a "
            "working gcc or set CC); the PyTorch path runs instead, slower") in log
    assert "mamba-ssm" not in log  # a CPU run does not report CUDA paths
    assert (fold / "checkpoint_final.pth").is_file()


def test_nan_or_inf_in_an_image_to_predict_stops_with_a_clear_message(mha_lkm_unet, tmp_path):
    """The first case (sorted) has a NaN and an Inf: nnUNetv2_predict ends with our message alone, no
    traceback; once the image is repaired, --continue_prediction predicts every case."""
    import numpy as np
    import SimpleITK as sitk

    ws = mha_lkm_unet
    images = tmp_path / "images"
    shutil.copytree(ws.raw / ws.dataset / "imagesTs", images)
    first = sorted(images.iterdir())[0]
    image = sitk.ReadImage(str(first))
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5], array[10, 20, 30] = np.nan, np.inf
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(first))
    predict = ["nnUNetv2_predict", "-i", images, "-o", tmp_path / "out", "-d", "998", "-c", "3d_fullres", "-f", "0",
               "-tr", "nnUNetTrainerLKMUNet_debug", "-device", "cpu", "--disable_tta"]
    with pytest.raises(RuntimeError) as failed:
        ws.run(*predict)
    output = str(failed.value)
    assert "Traceback" not in output
    assert output.rstrip().endswith("the remaining cases are predicted.")
    assert re.search(r"LKMUNet: [12] of the \d+ values of an input patch are NaN or infinite", output)
    sitk.WriteImage(image, str(first))  # repaired
    ws.run(*predict, "--continue_prediction")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mha")) == ["Mha_005.mha", "Mha_006.mha"]
