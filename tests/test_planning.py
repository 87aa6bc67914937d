"""`nnunet-ext plan`: plans that nnU-Net reads and trains from, sized within the memory target."""

from __future__ import annotations

import json
import shutil

import pytest

from nnunet_ext.tools.workspace import Workspace
from nnunet_ext.registry import ARCHITECTURES
from test_cli import cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workspace(planned, tmp_path_factory):
    """A copy of the tiny planned dataset (raw and preprocessed), so plans written here stay here."""
    ws = Workspace(tmp_path_factory.mktemp("planning"))
    for folder in ("raw", "preprocessed"):
        shutil.copytree(getattr(planned, folder) / planned.dataset, getattr(ws, folder) / planned.dataset)
    ws.dataset = planned.dataset
    return ws


def plan(ws, *args):
    return cli("plan", "-d", "999", *args, env=ws.env())


def plans_of(ws, name: str) -> dict:
    return json.loads((ws.preprocessed / ws.dataset / f"{name}.json").read_text())


def test_plans_validate_reuse_nnunets_data_and_train_with_the_stock_command(workspace):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ws, arch = workspace, ARCHITECTURES["attention_unet"]
    default = plans_of(ws, "nnUNetPlans")["configurations"]["3d_fullres"]
    roomy = plan(ws, "-a", arch.name, "--gpu-memory", "8")
    assert roomy.returncode == 0, roomy.stderr
    # the tiny dataset: nnU-Net's patch is its median shape, so a roomy target keeps it
    full = plans_of(ws, "nnUNetPlans_AttentionUNet_8G")
    assert full["configurations"]["3d_fullres"]["patch_size"] == default["patch_size"]
    estimate = full["nnunet_ext"]["estimated_gpu_memory_gb"]["3d_fullres"]

    target = round(estimate / 2, 3)  # half of what nnU-Net's patch needs: the patch must shrink
    out = plan(ws, "-a", arch.name, "--gpu-memory", str(target), "-c", "3d_fullres")
    assert out.returncode == 0, out.stderr
    name = f"nnUNetPlans_AttentionUNet_{target:g}G"
    manager = PlansManager(str(ws.preprocessed / ws.dataset / f"{name}.json"))
    assert manager.plans_name == name and manager.available_configurations == ["3d_fullres"]
    configuration = manager.get_configuration("3d_fullres")
    assert configuration.data_identifier == "nnUNetPlans_3d_fullres"  # same spacing: nnU-Net's data, reused
    assert all(p <= d for p, d in zip(configuration.patch_size, default["patch_size"]))
    assert configuration.patch_size != default["patch_size"] and configuration.batch_size == 2
    assert manager.plans["nnunet_ext"]["estimated_gpu_memory_gb"]["3d_fullres"] <= target
    assert "nnUNetPlans_3d_fullres (nnU-Net's)" in out.stdout and "Preprocess first" not in out.stdout
    assert f"nnUNetv2_train 999 3d_fullres 0 -tr {arch.trainer} -p {name}" in out.stdout

    trainer = f"{arch.trainer}_debug"
    ws.run("nnUNetv2_train", "999", "3d_fullres", "0", "-tr", trainer, "-p", name, "-device", "cpu")
    fold = ws.fold_dir(ws.dataset, trainer, "3d_fullres", 0, name)
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold.parent / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"] == \
        configuration.patch_size


@pytest.mark.parametrize("name", ["lkm_unet", "attention_unet"])  # the others take minutes: same code path
def test_a_target_too_small_for_any_patch_names_the_smallest_that_works(workspace, name):
    ws = workspace
    out = plan(ws, "-a", name, "--gpu-memory", "0.00001", "-c", "3d_fullres")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{name} does not fit into 1e-05 GB for 3d_fullres: the smallest patch it can be built on" in out.stderr
    smallest = out.stderr.rsplit("Use --gpu-memory ", 1)[1].split()[0]
    assert not (ws.preprocessed / ws.dataset / f"{ARCHITECTURES[name].plans_name(0.00001)}.json").exists()

    fits = plan(ws, "-a", name, "--gpu-memory", smallest, "-c", "3d_fullres")  # the target it names works
    assert fits.returncode == 0, fits.stderr
    written = plans_of(ws, ARCHITECTURES[name].plans_name(float(smallest)))
    assert written["nnunet_ext"]["estimated_gpu_memory_gb"]["3d_fullres"] <= float(smallest)


def test_without_nnunets_plans_it_says_which_preprocessing_to_run(tmp_path, planned):
    ws = Workspace(tmp_path)
    shutil.copytree(planned.raw / planned.dataset, ws.raw / planned.dataset)
    (ws.preprocessed / planned.dataset).mkdir()
    for file in ("dataset_fingerprint.json", "dataset.json"):
        shutil.copy(planned.preprocessed / planned.dataset / file, ws.preprocessed / planned.dataset)
    out = plan(ws, "-a", "ukan", "-c", "2d")
    assert out.returncode == 0, out.stderr
    command = "nnUNetv2_preprocess -d 999 -plans_name nnUNetPlans_UKAN_8G -c 2d"
    assert "its own, not preprocessed yet" in out.stdout and command in out.stdout
    ws.run(*command.split(), "-np", "1")
    assert (ws.preprocessed / planned.dataset / "nnUNetPlans_UKAN_8G_2d").is_dir()
    again = plan(ws, "-a", "ukan", "-c", "2d")
    assert "its own" in again.stdout and "not preprocessed yet" not in again.stdout


def test_bad_requests_get_the_fix(workspace, tmp_path):
    ws = workspace
    cases = {("-a", "lkm_unt", "--gpu-memory", "8"): "Did you mean lkm_unet",
             ("-a", "ukan", "-c", "3d"): "Unknown configuration(s) ['3d']; choose from 2d, 3d_fullres",
             ("-a", "ukan", "--gpu-memory", "0"): "--gpu-memory must be positive"}
    for args, message in cases.items():
        out = plan(ws, *args)
        assert out.returncode == 1 and message in out.stderr, out.stderr
    empty = Workspace(tmp_path)
    shutil.copytree(ws.raw / ws.dataset, empty.raw / ws.dataset)
    out = cli("plan", "-d", "999", "-a", "ukan", env=empty.env())
    assert out.returncode == 1 and "run nnUNetv2_extract_fingerprint -d 999 first" in out.stderr
