"""Tests for nnunet_ext.tools.make_dataset: file layout, geometry, content and nnU-Net's acceptance."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.tools.make_dataset import _guaranteed_object_voxels, _random_label_map, make_dataset

SHAPE_3D = (16, 24, 20)
SPACING_3D = (2.5, 1.0, 0.75)
ORIGIN_3D = (-12.5, 30.0, 7.25)


def _read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _arrays(folder):
    """All image and label arrays of a dataset, keyed by path relative to the dataset folder."""
    return {str(p.relative_to(folder)): _read(p)[1] for p in sorted(folder.rglob("*.nii.gz"))}


def _verify(folder):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)


@pytest.fixture(scope="module")
def dataset_3d(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    folder = make_dataset(raw, 7, "Tiny", n_cases=3, n_test_cases=2, shape=SHAPE_3D, spacing=SPACING_3D,
                          n_labels=3, origin=ORIGIN_3D, seed=1)
    return raw, folder


def test_3d_layout_and_dataset_json(dataset_3d):
    raw, folder = dataset_3d
    assert folder == raw / "Dataset007_Tiny"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"Tiny_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"Tiny_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [f"Tiny_{i:03d}_0000.nii.gz" for i in (3, 4)]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] == "Tiny"
    assert "regions_class_order" not in meta


def test_3d_geometry_and_dtypes(dataset_3d):
    _, folder = dataset_3d
    for path in sorted(folder.rglob("*.nii.gz")):
        image, array = _read(path)
        assert array.shape == SHAPE_3D
        assert image.GetSpacing() == pytest.approx(SPACING_3D[::-1])
        assert image.GetOrigin() == pytest.approx(ORIGIN_3D[::-1])
        assert image.GetDirection() == pytest.approx(np.eye(3).ravel())
        expected = np.uint8 if path.parent.name == "labelsTr" else np.float32
        assert array.dtype == expected, path


def test_3d_labels_complete_and_valid(dataset_3d):
    _, folder = dataset_3d
    for path in sorted((folder / "labelsTr").iterdir()):
        assert set(np.unique(_read(path)[1])) == {0, 1, 2, 3}, path


def test_labels_nested_so_higher_labels_lie_inside_lower(dataset_3d):
    # Region k (all labels >= k) must be enclosed by region k - 1: no voxel of label k touches background.
    _, folder = dataset_3d
    seg = _read(folder / "labelsTr" / "Tiny_000.nii.gz")[1]
    core = seg >= 2
    padded = np.pad(seg, 1)
    for axis in range(3):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
            assert not np.any(core & (neighbour == 0))


def test_images_reflect_labels(dataset_3d):
    # A network must be able to see the objects: per-label mean intensities are clearly apart.
    _, folder = dataset_3d
    image = _read(folder / "imagesTr" / "Tiny_000_0000.nii.gz")[1]
    seg = _read(folder / "labelsTr" / "Tiny_000.nii.gz")[1]
    means = sorted(image[seg == k].mean() for k in range(4))
    noise = image[seg == 0].std()
    assert min(np.diff(means)) > noise


def test_test_images_have_same_geometry_and_content(dataset_3d):
    _, folder = dataset_3d
    _, array = _read(folder / "imagesTs" / "Tiny_003_0000.nii.gz")
    assert np.isfinite(array).all() and array.std() > 0


def test_2d_stored_as_single_slice(tmp_path):
    folder = make_dataset(tmp_path, dim=2, n_cases=2, n_test_cases=1, shape=(24, 20), spacing=(0.5, 0.8),
                          origin=(3.0, -4.0), n_labels=2)
    for path in sorted(folder.rglob("*.nii.gz")):
        image, array = _read(path)
        assert array.shape == (1, 24, 20)
        assert image.GetSpacing()[:2] == pytest.approx((0.8, 0.5))
        assert image.GetSpacing()[2] > 10 * max(image.GetSpacing()[:2])
        assert image.GetOrigin() == pytest.approx((-4.0, 3.0, 0.0))
    for path in sorted((folder / "labelsTr").iterdir()):
        assert set(np.unique(_read(path)[1])) == {0, 1, 2}


def test_2d_default_origin_accepted(tmp_path):
    folder = make_dataset(tmp_path, dim=2, n_cases=2, n_test_cases=0, shape=(16, 16), spacing=(1.0, 1.0))
    image, _ = _read(folder / "imagesTr" / "Synthetic_000_0000.nii.gz")
    assert image.GetOrigin() == pytest.approx((7.25, 30.0, -12.5))


def test_multichannel_channels_differ(tmp_path):
    folder = make_dataset(tmp_path, n_channels=4, n_cases=2, n_test_cases=1, shape=(12, 16, 16),
                          spacing=(1.0, 1.0, 1.0))
    meta = json.loads((folder / "dataset.json").read_text())
    names = list(meta["channel_names"].values())
    assert sorted(meta["channel_names"]) == ["0", "1", "2", "3"]
    assert len(set(names)) == 4
    for sub, case in (("imagesTr", "Synthetic_000"), ("imagesTs", "Synthetic_002")):
        channels = [_read(folder / sub / f"{case}_{c:04d}.nii.gz")[1] for c in range(4)]
        for a in range(4):
            for b in range(a + 1, 4):
                assert np.corrcoef(channels[a].ravel(), channels[b].ravel())[0, 1] < 0.99


def test_multichannel_contrast_differs_per_label(tmp_path):
    # Each channel orders the labels' intensities differently, so channels carry complementary information.
    folder = make_dataset(tmp_path, n_channels=2, n_labels=2, n_cases=2, n_test_cases=0, shape=(16, 16, 16))
    seg = _read(folder / "labelsTr" / "Synthetic_000.nii.gz")[1]
    orders = []
    for c in range(2):
        image = _read(folder / "imagesTr" / f"Synthetic_000_{c:04d}.nii.gz")[1]
        orders.append(tuple(np.argsort([image[seg == k].mean() for k in range(3)])))
    assert orders[0] != orders[1]


def test_regions_dataset_json(tmp_path):
    folder = make_dataset(tmp_path, n_labels=3, regions=True, n_cases=2, n_test_cases=0, shape=(12, 16, 16))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "region_1": [1, 2, 3], "region_2": [2, 3], "region_3": [3]}
    assert meta["regions_class_order"] == [1, 2, 3]


def test_ignore_label_slab(tmp_path):
    folder = make_dataset(tmp_path, n_labels=2, ignore_label=True, n_cases=3, n_test_cases=0,
                          shape=(20, 16, 16))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == 3
    for path in sorted((folder / "labelsTr").iterdir()):
        seg = _read(path)[1]
        assert set(np.unique(seg)) == {0, 1, 2, 3}, path
        ignored = seg == 3
        # A slab of whole slices at one border, not the whole image.
        slices = np.flatnonzero(ignored.all(axis=(1, 2)))
        assert len(slices) >= 1 and slices[0] == 0 and len(slices) < seg.shape[0] // 2
        assert ignored.sum() == len(slices) * seg[0].size


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dim": 2, "shape": (24, 24), "spacing": (1.0, 1.0)},
        {"n_channels": 4},
        {"regions": True, "n_labels": 3},
        {"ignore_label": True},
        {"file_ending": ".mha"},
    ],
    ids=["3d", "2d", "4ch", "regions", "ignore", "mha"],
)
def test_nnunet_verify_dataset_integrity(tmp_path, kwargs):
    # Each call spawns a worker process that imports torch (~2 s), so only one dataset per feature.
    kwargs = {"n_cases": 2, "n_test_cases": 1, "shape": (12, 16, 16), "spacing": (2.0, 1.0, 1.0), **kwargs}
    _verify(make_dataset(tmp_path, **kwargs))


def test_nnunet_label_manager_accepts_regions_with_ignore_label(tmp_path):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    folder = make_dataset(tmp_path, n_labels=3, regions=True, ignore_label=True, n_cases=2, n_test_cases=0,
                          shape=(8, 8, 8))
    meta = json.loads((folder / "dataset.json").read_text())
    manager = LabelManager(meta["labels"], regions_class_order=meta["regions_class_order"])
    assert manager.has_regions and manager.ignore_label == 4
    assert manager.foreground_regions == [(1, 2, 3), (2, 3), (3,)]


def test_nnunet_reader_sees_2d_with_dummy_axis(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = make_dataset(tmp_path, dim=2, n_cases=2, n_test_cases=0, shape=(16, 20), spacing=(0.5, 0.8),
                          n_channels=2)
    images, props = SimpleITKIO().read_images([str(folder / "imagesTr" / f"Synthetic_000_{c:04d}.nii.gz")
                                               for c in range(2)])
    assert images.shape == (2, 1, 16, 20)
    assert props["spacing"][1:] == pytest.approx([0.5, 0.8])
    assert props["spacing"][0] > 10 * max(props["spacing"][1:])


def test_small_structures_keep_every_label(tmp_path):
    small = make_dataset(tmp_path, 1, "Small", n_cases=6, n_test_cases=0, shape=(24, 40, 40), spacing=(3.0, 1.0, 1.0),
                         object_scale=0.2)
    default = make_dataset(tmp_path, 2, "Default", n_cases=6, n_test_cases=0, shape=(24, 40, 40),
                           spacing=(3.0, 1.0, 1.0))
    for path in sorted((small / "labelsTr").iterdir()):
        seg = _read(path)[1]
        assert set(np.unique(seg)) == {0, 1, 2}, path
        assert 0 < (seg > 0).mean() < 0.003, path  # about 0.1 % of the voxels
    assert min((_read(p)[1] > 0).mean() for p in (default / "labelsTr").iterdir()) > 0.02


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 8), (8, 40, 40), (24, 40, 40)])
@pytest.mark.parametrize("object_scale", [1.0, 0.2, 0.01])
def test_objects_never_have_fewer_voxels_than_the_validation_assumes(shape, object_scale):
    rng = np.random.default_rng(0)
    bound = _guaranteed_object_voxels(shape, object_scale)
    smallest = min(int((_random_label_map(rng, shape, 1, object_scale) > 0).sum()) for _ in range(300))
    assert smallest >= bound >= 4


def test_same_seed_same_data_different_seed_different_data(tmp_path):
    kwargs = {"n_cases": 2, "n_test_cases": 1, "shape": (10, 12, 12), "n_channels": 2}
    first = _arrays(make_dataset(tmp_path / "a", seed=3, **kwargs))
    again = _arrays(make_dataset(tmp_path / "b", seed=3, **kwargs))
    other = _arrays(make_dataset(tmp_path / "c", seed=4, **kwargs))
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key]), key


def test_existing_dataset_id_is_not_overwritten(tmp_path):
    make_dataset(tmp_path, 5, "First", n_cases=2, n_test_cases=0, shape=(8, 8, 8))
    with pytest.raises(FileExistsError, match="dataset_id 5"):
        make_dataset(tmp_path, 5, "Second", n_cases=2, n_test_cases=0, shape=(8, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"dim": 4}, "dim"),
        ({"dim": 2}, "shape"),
        ({"shape": (16, 16)}, "shape"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"shape": (16, 7, 16)}, "shape"),
        ({"n_labels": 0}, "n_labels"),
        ({"n_labels": 255}, "n_labels"),
        ({"n_labels": 5, "dim": 2, "shape": (8, 8), "spacing": (1.0, 1.0)}, "n_labels"),
        ({"n_cases": 1}, "n_cases"),
        ({"n_test_cases": -1}, "n_test_cases"),
        ({"n_channels": 0}, "n_channels"),
        ({"origin": (1.0, 2.0)}, "origin"),
        ({"name": ""}, "name"),
        ({"dataset_id": -1}, "dataset_id"),
        ({"file_ending": ".png"}, "file_ending"),
        ({"object_scale": 0.0}, "object_scale"),
        ({"object_scale": 1.5}, "object_scale"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing may be written before the arguments are validated"
