"""`nnunet-ext make-dataset`: tiny synthetic datasets in nnU-Net v2 raw format.

``make_dataset`` writes a ``Dataset{id:03d}_{name}`` folder (``imagesTr``, ``labelsTr``, ``imagesTs``,
``dataset.json``) that the stock ``nnUNetv2_*`` commands accept as is. It exists so that the tests and the
demo can exercise the whole plan / preprocess / train / predict pipeline in seconds, without downloading
real data, and so that the awkward cases (2D data, several channels, overlapping regions, an ignore label,
anisotropic spacing, a non-zero origin) can each be switched on with one argument.

Every case holds one randomly placed and sized ellipsoid (ellipse in 2D) split into ``n_labels`` concentric
shells of about equal thickness: label 1 is the outermost shell and label ``n_labels`` the core, so every
foreground label occurs in every training case and label ``k`` surrounds label ``k + 1`` (the nesting that
BraTS-style regions expect). Images are a smooth background field plus a per-label intensity plus Gaussian
noise; each channel orders the labels' intensities differently, so the channels carry complementary contrast.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from typing import Sequence

import numpy as np
import SimpleITK as sitk

# Spacing written for the dummy (slice) axis of 2D data. nnU-Net's own readers use 999 for 2D images
# (NaturalImage2DIO, SimpleITKIO on true 2D files), and the planner relies on that axis having by far the
# largest spacing so it is never treated as a real neighbour (no pooling or resampling across it).
_DUMMY_AXIS_SPACING = 999.0
FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")  # image formats SimpleITK writes and nnU-Net reads

_MIN_EDGE = 8
# The object's centre lies in [0.4, 0.6] and its radii in [0.2, 0.3] of the image extent per axis, so it is
# large enough to be learnt after a few epochs and always stays at least 10 % of the extent away from every
# border, which keeps the ignore slab (see make_dataset) off the foreground.
_CENTRE_RANGE = (0.4, 0.6)
_RADIUS_RANGE = (0.2, 0.3)
# make_dataset's object_scale shrinks the radii (small structures), never below this: the radius of the
# smallest default object, which _guaranteed_object_voxels relies on.
_MIN_RADIUS = _RADIUS_RANGE[0] * _MIN_EDGE
_IGNORE_SLAB_FRACTION = 0.1
# Intensities in units of one "contrast step" between neighbouring labels.
_STEP = 100.0
_NOISE_STD = 0.2  # in steps: labels stay separable voxel-wise, but not trivially
_FIELD_AMPLITUDE = 0.5  # in steps: a bias-field-like variation that a threshold alone cannot undo


def make_dataset(
    raw_dir: str | os.PathLike,
    dataset_id: int = 999,
    name: str = "Synthetic",
    *,
    dim: int = 3,
    n_cases: int = 10,
    n_test_cases: int = 2,
    shape: Sequence[int] = (40, 48, 48),
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    n_channels: int = 1,
    n_labels: int = 2,
    regions: bool = False,
    ignore_label: bool = False,
    object_scale: float = 1.0,
    origin: Sequence[float] = (-12.5, 30.0, 7.25),
    seed: int = 0,
    file_ending: str = ".nii.gz",
) -> pathlib.Path:
    """Write a synthetic nnU-Net v2 raw dataset and return its folder.

    Args:
        raw_dir: the nnU-Net raw folder (usually ``$nnUNet_raw``); created if missing.
        dataset_id: nnU-Net dataset id; the folder is ``Dataset{dataset_id:03d}_{name}``.
        name: dataset name, also the prefix of every case identifier (``{name}_{i:03d}``).
        dim: 3 for volumes, 2 for images (stored as single-slice volumes, as nnU-Net expects for NIfTI).
        n_cases: number of labelled training cases (``imagesTr``/``labelsTr``).
        n_test_cases: number of unlabelled cases written to ``imagesTs``.
        shape: image size in array axis order, (z, y, x) for dim=3 and (y, x) for dim=2.
        spacing: voxel spacing in the same array axis order as ``shape``.
        n_channels: number of input channels (one file per channel and case).
        n_labels: number of foreground labels.
        regions: declare BraTS-style nested regions (region k = all labels >= k) in dataset.json.
        ignore_label: declare label ``n_labels + 1`` as nnU-Net's ignore label and mark a slab of slices
            (rows in 2D) at the low border of axis 0 of every training label map with it.
        object_scale: scales the object's radii (0.2 to 0.3 of the extent per axis), down to at least
            1.6 voxels: 0.2 on a 24x40x40 image gives objects of about 0.1 % of the voxels, the very
            small structures (lesions, metastases) that nnU-Net's foreground oversampling exists for.
        origin: world origin in array axis order. For dim=2 give either (y, x), in which case the dummy
            slice axis gets origin 0, or all three (slice, y, x) values.
        seed: seed for ``numpy.random.default_rng``; equal seeds give identical datasets.
        file_ending: one of FILE_ENDINGS; nnU-Net reads all of them with SimpleITK (Grand Challenge
            submissions use ``.mha``).

    Raises:
        ValueError: on invalid arguments, naming the offending one.
        FileExistsError: if ``raw_dir`` already holds a dataset with this id (nnU-Net cannot tell two
            datasets with one id apart, and stale cases would corrupt the new one).
    """
    shape_t, spacing_t, origin_t = _validate(
        dataset_id, name, dim, n_cases, n_test_cases, shape, spacing, n_channels, n_labels, object_scale, origin
    )

    if file_ending not in FILE_ENDINGS:
        raise ValueError(f"file_ending must be one of {', '.join(FILE_ENDINGS)}, got {file_ending!r}")
    raw_dir = pathlib.Path(raw_dir)
    clashing = sorted(raw_dir.glob(f"Dataset{dataset_id:03d}_*"))
    if clashing:
        raise FileExistsError(
            f"dataset_id {dataset_id} is already used by {clashing[0]}; remove it or pick another dataset_id"
        )
    folder = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)

    # SimpleITK wants (x, y, z); 2D data gets a leading dummy slice axis in array order first.
    if dim == 2:
        spacing_t = (_DUMMY_AXIS_SPACING, *spacing_t)
        if len(origin_t) == 2:
            origin_t = (0.0, *origin_t)
    geometry = (spacing_t[::-1], origin_t[::-1])

    rng = np.random.default_rng(seed)
    ignore_value = n_labels + 1 if ignore_label else None
    for i in range(n_cases):
        seg = _random_label_map(rng, shape_t, n_labels, object_scale)
        images = _images_for(rng, seg, n_channels, n_labels)
        if ignore_value is not None:
            # Images are made from the true labels first: the ignore label hides annotation, not anatomy.
            slab = max(1, int(_IGNORE_SLAB_FRACTION * shape_t[0]))
            seg[:slab] = ignore_value
        case = f"{name}_{i:03d}"
        _write_images(images, folder / "imagesTr", case, dim, geometry, file_ending)
        _write(seg, folder / "labelsTr" / f"{case}{file_ending}", dim, geometry)
    for i in range(n_cases, n_cases + n_test_cases):
        seg = _random_label_map(rng, shape_t, n_labels, object_scale)
        _write_images(_images_for(rng, seg, n_channels, n_labels), folder / "imagesTs", f"{name}_{i:03d}", dim,
                      geometry, file_ending)

    dataset_json = {
        "name": name,
        "description": f"Synthetic {dim}D dataset made by nnunet_ext.tools.make_dataset (seed {seed})",
        "channel_names": _channel_names(n_channels),
        "labels": _labels(n_labels, regions, ignore_label),
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    if regions:
        dataset_json["regions_class_order"] = list(range(1, n_labels + 1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
    return folder


def _validate(
    dataset_id: int,
    name: str,
    dim: int,
    n_cases: int,
    n_test_cases: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    n_channels: int,
    n_labels: int,
    object_scale: float,
    origin: Sequence[float],
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """Check the arguments of ``make_dataset``; return shape, spacing and origin as tuples."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if dataset_id < 0:
        raise ValueError(f"dataset_id must be >= 0, got {dataset_id}")
    if not name or any(sep in name for sep in ("/", "\\")):
        raise ValueError(f"name must be a non-empty string without path separators, got {name!r}")
    if len(shape) != dim:
        raise ValueError(f"shape must have dim={dim} entries (array axis order), got {tuple(shape)}")
    if len(spacing) != dim:
        raise ValueError(f"spacing must have dim={dim} entries (array axis order), got {tuple(spacing)}")
    allowed_origin_lengths = (2, 3) if dim == 2 else (3,)
    if len(origin) not in allowed_origin_lengths:
        raise ValueError(f"origin must have {' or '.join(map(str, allowed_origin_lengths))} entries for "
                         f"dim={dim}, got {tuple(origin)}")
    if any(int(s) != s or s < _MIN_EDGE for s in shape):
        raise ValueError(f"shape must be integers >= {_MIN_EDGE} in every axis, got {tuple(shape)}")
    if any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive in every axis, got {tuple(spacing)}")
    if n_cases < 2:
        # nnU-Net's 5-fold cross-validation splitting needs at least two training cases.
        raise ValueError(f"n_cases must be >= 2, got {n_cases}")
    if n_test_cases < 0:
        raise ValueError(f"n_test_cases must be >= 0, got {n_test_cases}")
    if n_channels < 1:
        raise ValueError(f"n_channels must be >= 1, got {n_channels}")
    if not 1 <= n_labels <= 254:
        # Labels are stored as uint8 and the ignore label takes n_labels + 1.
        raise ValueError(f"n_labels must be between 1 and 254, got {n_labels}")
    if not 0 < object_scale <= 1:
        raise ValueError(f"object_scale must be in (0, 1], got {object_scale}")
    if n_labels > _guaranteed_object_voxels(shape, object_scale):
        raise ValueError(f"n_labels={n_labels} nested labels do not fit into an object in shape {tuple(shape)}; "
                         f"use a larger shape or fewer labels")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing), tuple(float(o) for o in origin)


def _guaranteed_object_voxels(shape: Sequence[int], object_scale: float = 1.0) -> int:
    """A lower bound on the number of voxels inside the smallest object ``_random_label_map`` can draw.

    Every radius is at least _MIN_RADIUS = 1.6 voxels, and a ball of that radius always
    contains 4 voxel centres: the corner of the grid cell around its centre nearest to it and that corner's
    neighbours along the cell edges lie within sqrt(1.75) < 1.6 voxels (sqrt(2) for the far corner in 2D).
    For larger shapes, the box inscribed in the smallest ellipsoid (half-widths r / sqrt(dim)) gives more.
    """
    d = len(shape)
    radii = (max(_MIN_RADIUS, object_scale * _RADIUS_RANGE[0] * edge) for edge in shape)
    box = math.prod(math.ceil(2 * r / math.sqrt(d)) - 1 for r in radii)
    return max(4, box)


def _random_label_map(rng: np.random.Generator, shape: tuple[int, ...], n_labels: int,
                      object_scale: float = 1.0) -> np.ndarray:
    """One ellipsoid at a random place and size (radii scaled by ``object_scale``, at least _MIN_RADIUS),
    split into ``n_labels`` concentric shells.

    Shells are cut by rank of the normalised radius, with voxel counts proportional to shells of equal
    thickness (each 1 / n_labels of the radius) but at least one voxel each, so no label can vanish through
    discretisation however small the object.
    """
    extent = np.asarray(shape, dtype=float)
    centre = rng.uniform(*_CENTRE_RANGE, size=len(shape)) * extent
    radii = np.maximum(_MIN_RADIUS, rng.uniform(*_RADIUS_RANGE, size=len(shape)) * extent * object_scale)
    grid = np.indices(shape, dtype=float)
    rho = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))).ravel()

    inside = np.flatnonzero(rho < 1)  # at least n_labels voxels, see _guaranteed_object_voxels
    core_first = inside[np.argsort(rho[inside], kind="stable")]
    # Volume of the shell between normalised radii (j - 1) / n and j / n, for j = 1 (core) .. n (outermost).
    j = np.arange(1, n_labels + 1)
    weights = j ** len(shape) - (j - 1) ** len(shape)
    counts = 1 + (core_first.size - n_labels) * weights // weights.sum()
    counts[-1] += core_first.size - counts.sum()  # rounding remainder goes to the outermost shell
    seg = np.zeros(rho.size, dtype=np.uint8)
    seg[core_first] = np.repeat(np.arange(n_labels, 0, -1), counts)
    return seg.reshape(shape)


def _images_for(rng: np.random.Generator, seg: np.ndarray, n_channels: int, n_labels: int) -> list[np.ndarray]:
    """Channel images for the label map ``seg``: smooth background field + label intensity + noise."""
    n_classes = n_labels + 1
    grid = np.indices(seg.shape, dtype=float)
    labels = np.arange(n_classes)
    images = []
    for c in range(n_channels):
        # Cyclic shift of the label-to-intensity ladder per channel: within a channel all classes get
        # distinct intensities, across channels their order differs. The shift of n_classes // 2 puts the
        # background mid-ladder in channel 0 (for n_labels >= 2), so CT normalisation, which clips to the
        # foreground's intensity range, does not flatten it onto label 1. The gain separates channels whose
        # ordering repeats once n_channels > n_classes.
        level = (labels + c + n_classes // 2) % n_classes
        gain = 1.0 + 0.5 * c
        phases = rng.uniform(0, 2 * np.pi, size=seg.ndim)
        freqs = rng.uniform(0.5, 1.5, size=seg.ndim)
        field = np.mean(
            [np.cos(2 * np.pi * f * g / s + p) for g, s, f, p in zip(grid, seg.shape, freqs, phases)], axis=0
        )
        noise = rng.normal(0.0, _NOISE_STD, size=seg.shape)
        image = _STEP * gain * (level[seg] + _FIELD_AMPLITUDE * field + noise)
        images.append(image.astype(np.float32))
    return images


def _write_images(images: list[np.ndarray], folder: pathlib.Path, case: str, dim: int,
                  geometry: tuple[tuple[float, ...], tuple[float, ...]], file_ending: str) -> None:
    for c, image in enumerate(images):
        _write(image, folder / f"{case}_{c:04d}{file_ending}", dim, geometry)


def _write(array: np.ndarray, path: pathlib.Path, dim: int,
           geometry: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    """Write ``array`` with the given (x, y, z) spacing and origin and identity direction."""
    if dim == 2:
        array = array[None]  # nnU-Net reads 2D NIfTI data as 3D volumes with one slice
    spacing, origin = geometry
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.eye(3).ravel().tolist())
    sitk.WriteImage(image, str(path), True)


def _channel_names(n_channels: int) -> dict[str, str]:
    # "CT" selects nnU-Net's CT normalisation, which only makes sense for a single intensity-calibrated
    # channel; several channels are named like MR sequences and get the default z-score normalisation.
    if n_channels == 1:
        return {"0": "CT"}
    return {str(c): f"MR_{c}" for c in range(n_channels)}


def _labels(n_labels: int, regions: bool, ignore_label: bool) -> dict[str, int | list[int]]:
    labels: dict[str, int | list[int]] = {"background": 0}
    for k in range(1, n_labels + 1):
        if regions:
            labels[f"region_{k}"] = list(range(k, n_labels + 1))
        else:
            labels[f"label_{k}"] = k
    if ignore_label:
        labels["ignore"] = n_labels + 1
    return labels


def add_arguments(parser) -> None:
    parser.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--dataset-id", type=int, default=999)
    parser.add_argument("--name", default="Synthetic")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=3)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", help="array order, e.g. 40 48 48")
    parser.add_argument("--spacing", type=float, nargs="+", help="array order, e.g. 2 1 1")
    parser.add_argument("--regions", action="store_true")
    parser.add_argument("--ignore-label", action="store_true")
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="scale of the objects' radii (0.2 to 0.3 of the extent); 0.2 gives very small structures")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        print("error: give --raw or set nnUNet_raw", file=sys.stderr)
        return 2
    folder = make_dataset(raw, args.dataset_id, args.name, dim=args.dim, n_cases=args.cases,
                          n_channels=args.channels, n_labels=args.labels, regions=args.regions,
                          ignore_label=args.ignore_label, object_scale=args.object_scale, seed=args.seed,
                          **({"shape": args.shape} if args.shape else {}),
                          **({"spacing": args.spacing} if args.spacing else {}))
    print(folder)
    return 0
