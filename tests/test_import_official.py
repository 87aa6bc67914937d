"""`nnunet-ext import-official`: a checkpoint as the official code writes it -> a fold folder that the stock
commands predict with and fine-tune from; refusals that write nothing and run nothing.

The official checkpoints here are the goldens' state dicts (tests/data/official, made by running the
official code) in the file layout each official code saves, on a copy of the tiny dataset's plans whose
configuration is the goldens' own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_prediction_fits_image, matrix
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools.import_official import ImportRefused, import_official
from test_official import OFFICIAL, goldens, official_state, preset_network, relative_error


CLASSES = 3  # the tiny dataset's labels 0, 1, 2


def golden_case(name: str) -> dict:
    """The goldens' first configuration with the tiny dataset's input channels and classes."""
    meta, _ = goldens(name)
    return next(c for c in meta["cases"] if c["input_channels"] == 1 and c["num_classes"] == CLASSES)


def configuration_name(case: dict) -> str:
    return "2d" if len(case["patch_size"]) == 2 else "3d_fullres"


def plans_name(name: str) -> str:
    """Plans of the tiny dataset whose configuration is that of `name`'s goldens."""
    return f"nnUNetPlans_officialGoldens_{name}"


def official_checkpoint(name: str, path: Path, **extra) -> Path:
    """The goldens' state dict in the layout the official code saves. U-KAN's train.py saves the state dict
    alone. D-LKA Net's and MedNeXt's trainers save nnU-Net v1's checkpoint (the state dict under 'state_dict',
    numpy scalars in its curves). The LKM-UNet fork saves an nnU-Net checkpoint (numpy scalars in its log, a
    torch.device in its init_args), which its users pickled under numpy 1 (numpy.core.multiarray.scalar)."""
    _, arrays = goldens(name)
    state = official_state(arrays, golden_case(name))
    if name == "ukan":
        torch.save({**state, **extra}, path)
        return path
    if name == "dlka_net" or ARCHITECTURES[name].family == "mednext":
        torch.save({"epoch": 1000, "state_dict": state, "optimizer_state_dict": None, "lr_scheduler_state_dict": None,
                    "plot_stuff": ([0.9], [0.8], [0.8], [np.float64(0.5)]), "best_stuff": (900, 0.8, np.float64(0.5)),
                    **extra}, path)
        return path
    buffer = io.BytesIO()  # the legacy format: one pickle stream, whose global names can be rewritten
    torch.save({"network_weights": state, "logging": {"mean_fg_dice": [np.float64(0.5)]}, "_best_ema": np.float64(0.5),
                "current_epoch": 1000, "init_args": {"configuration": "2d", "fold": 0, "device": torch.device("cuda")},
                "trainer_name": ARCHITECTURES[name].trainer, "inference_allowed_mirroring_axes": (0, 1), **extra},
               buffer, _use_new_zipfile_serialization=False)
    pickled = buffer.getvalue()
    assert b"numpy._core.multiarray\nscalar" in pickled or b"numpy.core.multiarray\nscalar" in pickled
    path.write_bytes(pickled.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    return path


@pytest.fixture
def golden_plans(nnunet_env):
    """Per architecture with an official preset, nnUNetPlans with the configuration its goldens use set to
    the goldens' topology and patch (`plans_name`)."""
    folder = nnunet_env.preprocessed / nnunet_env.dataset
    for name in OFFICIAL:
        plans, case = json.loads((folder / "nnUNetPlans.json").read_text()), golden_case(name)
        configuration = plans["configurations"][configuration_name(case)]
        configuration["architecture"], configuration["patch_size"] = case["architecture"], case["patch_size"]
        plans["plans_name"] = plans_name(name)
        (folder / f"{plans_name(name)}.json").write_text(json.dumps(plans, indent=4))
    return nnunet_env


def fold_folder(ws, name: str, fold: str = "0") -> Path:
    case = golden_case(name)
    return ws.fold_dir(ws.dataset, ARCHITECTURES[name].preset_trainer("official"), configuration_name(case),
                       plans=plans_name(name), fold=fold)


@pytest.mark.parametrize("name", OFFICIAL)
def test_imported_fold_holds_the_official_network(name, golden_plans, tmp_path):
    case = golden_case(name)
    target, trainer = import_official(name, official_checkpoint(name, tmp_path / "official.pth"), "999",
                                      configuration_name(case), plans_name(name), "3")
    assert target == fold_folder(golden_plans, name, "3") / "checkpoint_final.pth"
    checkpoint = torch.load(target, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer == ARCHITECTURES[name].preset_trainer("official")
    network = preset_network(name, case).eval()
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    _, arrays = goldens(name)
    with torch.no_grad():
        out = network(torch.from_numpy(arrays[f"{case['name']}/input/0"]))[0]
    assert relative_error(out, torch.from_numpy(arrays[f"{case['name']}/output/0/0"])) <= 1e-5
    with pytest.raises(ImportRefused, match="exists; it is left as it is"):
        import_official(name, tmp_path / "official.pth", "999", configuration_name(case), plans_name(name), "3")
    import_official(name, tmp_path / "official.pth", "999", configuration_name(case), plans_name(name), "3",
                    overwrite=True)


def test_a_kernel5_checkpoint_goes_to_the_official_k5_trainer_and_another_kernel_to_none(golden_plans, tmp_path):
    """MedNeXt's official kernel-5 networks differ from kernel 3 in their depthwise kernels alone: the goldens'
    kernel-3 checkpoint with every 3-wide kernel replaced by a 5-wide one imports into the OfficialK5 trainer,
    its kernels as they were; with 7-wide ones it fits neither, and the refusal names both."""
    name = "mednext_b"
    state = official_state(goldens(name)[1], golden_case(name))

    def widened(k: int) -> dict:
        return {key: torch.randn(*v.shape[:2], *[k] * (v.dim() - 2)) if v.dim() > 2 and v.shape[-1] == 3 else v
                for key, v in state.items()}

    torch.save({"epoch": 1000, "state_dict": widened(5)}, tmp_path / "k5.pth")
    target, trainer = import_official(name, tmp_path / "k5.pth", "999", "2d", plans_name(name), "0")
    assert trainer == "nnUNetTrainerMedNeXtBOfficialK5" and trainer in str(target)
    weights = torch.load(target, weights_only=False)["network_weights"]
    kernel = torch.load(tmp_path / "k5.pth")["state_dict"]["enc_block_1.0.conv1.weight"]
    assert torch.equal(weights["encoder.stages.1.0.conv1.weight"], kernel)

    torch.save({"epoch": 1000, "state_dict": widened(7)}, tmp_path / "k7.pth")
    with pytest.raises(ImportRefused, match="does not fit nnUNetTrainerMedNeXtBOfficial's .* Nor does it fit "
                                            "nnUNetTrainerMedNeXtBOfficialK5's"):
        import_official(name, tmp_path / "k7.pth", "999", "2d", plans_name(name), "1")
    assert not fold_folder(golden_plans, name, "1").exists()


def test_refuses_a_checkpoint_of_another_configuration_and_writes_nothing(golden_plans, tmp_path):
    _, arrays = goldens("lkm_unet")
    meta, _ = goldens("lkm_unet")
    three_d = next(c for c in meta["cases"] if len(c["patch_size"]) == 3)
    torch.save({"network_weights": official_state(arrays, three_d)}, tmp_path / "3d.pth")
    with pytest.raises(ImportRefused) as refused:
        import_official("lkm_unet", tmp_path / "3d.pth", "999", "2d", plans_name("lkm_unet"), "4")
    message = str(refused.value)
    assert "'encoder.stem.convs.0.conv.weight' is (4, 2, 3, 3, 3) in the checkpoint, (4, 1, 3, 3) here" in message
    assert "4 stages of [4, 8, 8, 8] features, 1 input channel(s) and 3 output(s)" in message
    assert not fold_folder(golden_plans, "lkm_unet", "4").exists()


def test_refuses_an_official_ukan_of_another_configuration(golden_plans, tmp_path):
    """The official U-KAN always has six stages; on plans of four (LKM-UNet's goldens') it cannot fit."""
    checkpoint = official_checkpoint("ukan", tmp_path / "ukan.pth")
    with pytest.raises(ImportRefused) as refused:
        import_official("ukan", checkpoint, "999", "2d", plans_name("lkm_unet"), "4")
    assert "4 stages of [4, 8, 8, 8] features, 1 input channel(s) and 3 output(s)" in str(refused.value)
    assert "'encoder.stages.1.0.0.weight' is (2, 1, 3, 3) in the checkpoint, (8, 1, 3, 3) here" in str(refused.value)
    assert not fold_folder(golden_plans, "ukan", "4").exists()


def test_refuses_an_official_dlka_net_trained_on_another_patch(golden_plans, tmp_path):
    """The official D-LKA Net's positional embeddings hold one vector per position of its training patch."""
    folder = golden_plans.preprocessed / golden_plans.dataset
    plans = json.loads((folder / f"{plans_name('dlka_net')}.json").read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [16, 32, 64]
    plans["plans_name"] = "nnUNetPlans_otherPatch"
    (folder / "nnUNetPlans_otherPatch.json").write_text(json.dumps(plans))
    checkpoint = official_checkpoint("dlka_net", tmp_path / "dlka.pth")
    with pytest.raises(ImportRefused) as refused:
        import_official("dlka_net", checkpoint, "999", "3d_fullres", "nnUNetPlans_otherPatch", "0")
    assert "'encoder.stages.1.2.0.position_embedding' is (1, 512, 4) in the checkpoint, (1, 4, 8, 8, 16) here" \
        in str(refused.value)
    assert "on patches of 16x32x64" in str(refused.value)
    assert not golden_plans.fold_dir(golden_plans.dataset, "nnUNetTrainerDLKANetOfficial", "3d_fullres", fold=0,
                                     plans="nnUNetPlans_otherPatch").exists()


def test_refuses_a_pickled_callable_without_running_it(golden_plans, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    path = official_checkpoint("lkm_unet", tmp_path / "payload.pth", extra=Payload())
    refusal = r"holds more than tensors and plain data \(it names getattr\), so it was not loaded"
    with pytest.raises(ImportRefused, match=refusal):
        import_official("lkm_unet", path, "999", "2d", plans_name("lkm_unet"), "4")
    assert not marker.exists() and not fold_folder(golden_plans, "lkm_unet", "4").exists()
    torch.load(path, weights_only=False)  # what the refusal prevented: unpickling runs the payload
    assert marker.exists()


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ({"epoch": 3}, "holds no state dict"),
                                             (b"not a checkpoint", "not a PyTorch checkpoint")])
def test_refuses_what_is_not_a_checkpoint(golden_plans, tmp_path, content, message):
    path = tmp_path / "file.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ImportRefused, match=message):
        import_official("lkm_unet", path, "999", "2d", plans_name("lkm_unet"), "4")


def test_refuses_an_architecture_without_an_official_preset(tmp_path):
    without = next(name for name, arch in ARCHITECTURES.items() if not arch.official_weights)
    with pytest.raises(ImportRefused, match=f"{without} has no official preset to import into yet; these have: "):
        import_official(without, tmp_path / "x.pth", "999", "2d")


@pytest.mark.e2e
@pytest.mark.parametrize("name", [pytest.param(n, marks=matrix(n, "official-import"))
                                  for n in OFFICIAL])
def test_stock_commands_predict_with_and_fine_tune_from_an_imported_checkpoint(name, golden_plans, tmp_path):
    case = golden_case(name)
    configuration, trainer = configuration_name(case), ARCHITECTURES[name].preset_trainer("official")
    plans = plans_name(name)
    checkpoint = official_checkpoint(name, tmp_path / "official.pth")
    printed = golden_plans.run("nnunet-ext", "import-official", name, checkpoint, "-d", "999", "-c", configuration,
                               "-p", plans, "-f", "0")
    assert f"-tr {trainer}" in printed

    images = golden_plans.raw / golden_plans.dataset / "imagesTr"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in sorted(images.iterdir())[:2]:
        (inputs / image.name).symlink_to(image)
    golden_plans.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "999", "-c",
                     configuration, "-p", plans, "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta")
    for image in sorted(inputs.iterdir()):
        prediction = tmp_path / "out" / image.name.replace("_0000", "")
        assert_prediction_fits_image(prediction, image, range(CLASSES))

    golden_plans.run("nnUNetv2_train", "999", configuration, "0", "-tr", trainer, "-p", plans, "--val", "-device",
                     "cpu")
    validated = fold_folder(golden_plans, name)
    assert (validated / "validation" / "summary.json").is_file()
    assert "Weights imported by nnunet-ext import-official" in next(validated.glob("training_log_*.txt")).read_text()

    imported = fold_folder(golden_plans, name) / "checkpoint_final.pth"
    printed = golden_plans.run("nnUNetv2_train", "999", configuration, "1", "-tr", f"{trainer}_debug", "-p", plans,
                               "-pretrained_weights", str(imported), "-device", "cpu")
    assert f"Loading pretrained weights from file  {imported}" in printed
    tuned = golden_plans.fold_dir(golden_plans.dataset, f"{trainer}_debug", configuration, fold=1, plans=plans)
    assert (tuned / "checkpoint_final.pth").is_file()
    notes = preset_network(name, case).notes  # what the official code does questionably here, the log says
    assert notes or name != "lkm_unet"  # LKM-UNet: the global scans at the goldens' patch
    log = next(tuned.glob("training_log_*.txt")).read_text()
    assert all(f"{name}: {note}." in log for note in notes)
