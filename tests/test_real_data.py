"""Real-data datasets (nnunet_ext.tools.real_data): fetched with pip and checked, written as nnU-Net raw datasets
whose cases never share voxels, and a CI-sized slice of `nnunet-ext real-data` (one dataset, one
architecture chosen by the rotation key, the demo schedule) that must beat a Dice floor no constant
prediction reaches. Needs the package index (CI has it)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import architectures_in_turn
from nnunet_ext.tools import real_data
from nnunet_ext.tools.cli import main
from nnunet_ext.registry import ARCHITECTURES

# Nuclei cover ~20 % of each crop, so predicting "all nucleus" scores a Dice of ~0.33 and an untrained
# network (near-constant output) no more; the slice must clear this (checked against the data below).
DICE_FLOOR = 0.6


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_data_cache")


@pytest.fixture(scope="session")
def raw(tmp_path_factory, cache):
    """Every dataset written once into one nnU-Net raw folder."""
    folder = tmp_path_factory.mktemp("real_raw")
    for dataset in real_data.DATASETS.values():
        real_data.write_raw(dataset, folder, cache)
    return folder


@pytest.mark.parametrize("shape, counts", [((512, 512), (4, 4)), ((73, 47, 73), (2, 3, 1)), ((7, 5), (3, 2))])
def test_tiles_cover_every_element_exactly_once(shape, counts):
    hits = np.zeros(shape, int)
    boxes = real_data.tiles(shape, counts)
    for box in boxes:
        hits[box] += 1
    assert len(boxes) == np.prod(counts) and (hits == 1).all()


def test_files_are_checked_and_a_damaged_copy_is_replaced(cache):
    files = real_data.STARDIST.extract(cache)
    image = files["stardist/data/images/img2d.tif"]
    image.write_bytes(b"damaged")
    assert real_data._sha256(real_data.STARDIST.extract(cache)["stardist/data/images/img2d.tif"]) == \
        real_data.STARDIST.files["stardist/data/images/img2d.tif"]

    wrong = replace(real_data.STARDIST, files={"stardist/data/images/img2d.tif": "0" * 64})
    with pytest.raises(RuntimeError, match="SHA-256 .* expected 0{64}"):
        wrong.extract(cache / "other")


def test_a_damaged_archive_is_named(tmp_path):
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "stardist-0.9.2-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"cut short")
    with pytest.raises(RuntimeError, match="stardist-0.9.2-.*whl is damaged .*; delete it and retry"):
        real_data.STARDIST.extract(tmp_path)


@pytest.mark.parametrize("name", list(real_data.DATASETS))
def test_each_dataset_is_a_valid_nnunet_raw_dataset(raw, name):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    dataset = real_data.DATASETS[name]
    folder = raw / dataset.folder_name
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any inconsistency
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    seen = set()
    for path in (folder / "labelsTr").iterdir():
        seen |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())
    assert seen == set(labels.values()), "every declared label occurs, and nothing else"
    assert dataset.package.requirement in (folder / "README.md").read_text()


@pytest.mark.parametrize("name, source", [
    ("Nuclei2D", "stardist/data/images/img2d.tif"),
    ("SpineCT", "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz"),
    ("SpineMR", "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz"),
])
def test_cases_cut_from_one_image_tile_it_without_sharing_a_voxel(raw, cache, name, source):
    """Pasting every case back at its world position rebuilds the source image with each voxel once, so
    no split can put the same voxels into a training and a validation case."""
    dataset = real_data.DATASETS[name]
    original = sitk.ReadImage(str(dataset.package.extract(cache)[source]), sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(original)
    rebuilt, hits = np.zeros_like(expected), np.zeros(expected.shape, int)
    for path in sorted((raw / dataset.folder_name / "imagesTr").iterdir()):
        case = sitk.ReadImage(str(path))
        start = original.TransformPhysicalPointToIndex(case.GetOrigin()[:original.GetDimension()])[::-1]
        array = sitk.GetArrayFromImage(case).reshape(case.GetSize()[::-1][-expected.ndim:])
        box = tuple(slice(s, s + n) for s, n in zip(start, array.shape))
        rebuilt[box] = array
        hits[box] += 1
    assert (hits == 1).all()
    np.testing.assert_array_equal(rebuilt, expected)


def test_lesion_crops_keep_the_whole_lesion(raw, cache):
    files = real_data.PYRADIOMICS.extract(cache)
    folder = raw / real_data.DATASETS["Lesions"].folder_name
    for name in real_data._LESION_CASES:
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(files[f"data/{name}_label.nrrd"])))
        crop = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{name}.nii.gz")))
        assert crop.shape[1:] == tuple(min(real_data._LESION_CROP, n) for n in source.shape[1:])
        assert crop.sum() == (source > 0).sum() > 0


def test_unknown_dataset_is_a_clear_error(capsys):
    assert main(["real-data", "Nuclei3D", "--fetch-only"]) == 2
    assert "unknown dataset(s) Nuclei3D; choose from Nuclei2D, SpineCT, SpineMR, Lesions" in capsys.readouterr().err


@pytest.mark.e2e
def test_ci_slice_trains_an_architecture_above_a_floor_no_constant_prediction_reaches(tmp_path, raw, cache):
    trainers = [f"{ARCHITECTURES[name].trainer}_demo" for name in architectures_in_turn(1)]
    dataset = real_data.DATASETS["Nuclei2D"]
    shutil.copytree(raw / dataset.folder_name, tmp_path / "nnUNet_raw" / dataset.folder_name)

    reports = real_data.run(tmp_path, ["Nuclei2D"], trainers, cache, folds=[0])

    ws = real_data.Workspace(tmp_path)
    split = json.loads((ws.preprocessed / dataset.folder_name / "splits_final.json").read_text())[0]
    all_foreground = []
    for case in split["val"]:
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.raw / dataset.folder_name / "labelsTr" / f"{case}.nii.gz")))
        all_foreground.append(2 * label.mean() / (1 + label.mean()))
    assert max(all_foreground) < DICE_FLOOR - 0.1
    for trainer in trainers:
        dice = ws.validation_dice(dataset.folder_name, trainer, dataset.configuration)["foreground_mean"]
        # The demo schedule's 40 iterations leave a slow recipe on its steepest slope: U-KAN's (Adam at 1e-4)
        # ended at 0.75-0.85 in ten runs on one machine and at 0.46 once in CI (pseudo Dice after the first
        # epoch: 0.38-0.66). So a trainer below the floor trains once more from scratch; a network that
        # cannot learn stays near a constant prediction's Dice both times.
        if dice <= DICE_FLOOR:
            shutil.rmtree(ws.fold_dir(dataset.folder_name, trainer, dataset.configuration, 0))
            real_data.run(tmp_path, ["Nuclei2D"], [trainer], cache, folds=[0])
            dice = ws.validation_dice(dataset.folder_name, trainer, dataset.configuration)["foreground_mean"]
        assert dice > DICE_FLOOR, f"{trainer} reached Dice {dice:.3f} on real nuclei, twice below {DICE_FLOOR}"
        fold = ws.fold_dir(dataset.folder_name, trainer, dataset.configuration, 0)
        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1)  # the demo schedule mirrors as nnU-Net
    assert any(reports["Nuclei2D"].glob("compare_*.md"))
