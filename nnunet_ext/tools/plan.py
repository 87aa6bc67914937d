"""`nnunet-ext plan`: nnU-Net's experiment planner, sizing patch and batch for one architecture.

nnU-Net's ExperimentPlanner shrinks the patch until its memory estimate for PlainConvUNet fits the GPU
memory target, then spends what is left on batch size. `ArchitecturePlanner` keeps all of it
(fingerprint, spacing, normalisation, resampling, that loop) and changes only the estimate: nnU-Net's
times the architecture's memory relative to PlainConvUNet's (`nnunet_ext.memory_models`), on candidates the
architecture can be built on. nnU-Net has no hook for planners, so we run it through its Python API
and the plans land under a name of their own, which stock `nnUNetv2_train -p NAME` reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from copy import deepcopy
from pathlib import Path

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.errors import ConfigurationError
from nnunet_ext.memory_models import REFERENCE, relative_memory
from nnunet_ext.registry import Architecture, get_architecture
from nnunet_ext.tools.memory import footprint
from nnunet_ext.tools.report import progress, text_table

DEFAULT_GPU_MEMORY = 8.0  # GB, nnU-Net's own default target
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
# What a configuration's preprocessed data depends on: equal entries mean nnU-Net's data can be reused.
DATA_KEYS = ("spacing", "preprocessor_name", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
             "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")


class PlanningError(ValueError):
    """The architecture cannot be planned as asked; the message says what to change."""


class ArchitecturePlanner(ExperimentPlanner):
    """nnU-Net's default planner with the memory estimate of `architecture` (set by `planner_for`)."""

    architecture: Architecture

    def __init__(self, *args, configurations=CONFIGURATIONS, **kwargs):
        super().__init__(*args, **kwargs)
        self.configurations = set(configurations) | ({"3d_lowres"} if "3d_cascade_fullres" in configurations else set())
        self.estimates: dict[str, float] = {}  # configuration -> estimated GB at its batch size
        self.reused: dict[str, str | None] = {}  # configuration -> nnU-Net's data identifier it reuses, or None
        self.default_configurations: dict = {}  # nnU-Net's own plans (nnUNetPlans.json), read by save_plans
        self._by_patch: dict[str, float] = {}  # our estimate per candidate (patch and strides)
        self._ours_cache: dict = {}  # what nnU-Net caches for the requested configurations: our estimates
        self._smallest: tuple[float, list[int]] | None = None  # the last candidate that could be built
        self._configuration = None

    def reference_units(self, dim: int) -> tuple[float, int]:
        """nnU-Net's (units, batch size) that fill its 8 GB reference in `dim` D."""
        if dim == 2:
            return self.UNet_reference_val_2d, self.UNet_reference_val_corresp_bs_2d
        return self.UNet_reference_val_3d, self.UNet_reference_val_corresp_bs_3d

    def gigabytes(self, estimate: float, dim: int, batch: int) -> float:
        """nnU-Net's conversion of an estimate in units to GPU memory at `batch`."""
        units, reference_batch = self.reference_units(dim)
        return self.UNet_reference_val_corresp_GB * estimate * batch / (units * reference_batch)

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        # nnU-Net calls this on every candidate patch, largest first, and shrinks while it is too large.
        if self._configuration not in self.configurations:  # nnU-Net plans it anyway; it is not written
            return super().static_estimate_VRAM_usage(patch_size, input_channels, output_channels, arch_class_name,
                                                      arch_kwargs, arch_kwargs_req_import)
        entry = {"network_class_name": arch_class_name, "arch_kwargs": deepcopy(arch_kwargs),
                 "_kw_requires_import": list(arch_kwargs_req_import)}
        try:
            ours = footprint(self.architecture.name, entry, patch_size, input_channels, output_channels)
        except ConfigurationError as e:
            raise self._no_patch_fits(patch_size, e) from None
        plain = footprint(REFERENCE, entry, patch_size, input_channels, output_channels)  # units: nnU-Net's estimate
        dim = len(patch_size)
        estimate = plain.units * relative_memory(self.architecture.memory_model(dim), dim, ours, plain)
        self._smallest = (estimate, [int(p) for p in patch_size])
        self._by_patch[_key(patch_size, arch_kwargs["strides"])] = estimate
        return estimate

    def _no_patch_fits(self, patch_size, error: ConfigurationError) -> PlanningError:
        name, configuration = self.architecture.name, self._configuration
        if self._smallest is None:
            return PlanningError(f"{name} cannot be built on the {configuration} topology nnU-Net plans for this "
                                 f"dataset (patch {list(patch_size)}): {error}")
        estimate, patch = self._smallest
        needed = _round_up(self.gigabytes(estimate, len(patch), self.UNet_min_batch_size))
        return PlanningError(
            f"{name} does not fit into {self.UNet_vram_target_GB:g} GB for {configuration}: the smallest patch it can "
            f"be built on, {patch}, needs about {needed:g} GB at batch size {self.UNet_min_batch_size}. Use "
            f"--gpu-memory {needed:g} or more.")

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        self._configuration = data_identifier.removeprefix(self.plans_identifier + "_")
        self._smallest = None
        if self._configuration not in self.configurations:  # nnU-Net's estimates, cached as nnU-Net caches them
            return super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, self._ours_cache)
        # nnU-Net rounds the batch size to the nearest integer, which can overshoot the target; round down.
        dim, patch = len(plan["patch_size"]), plan["patch_size"]
        estimate = self._by_patch[_key(patch, plan["architecture"]["arch_kwargs"]["strides"])]
        fits = math.floor(self.UNet_vram_target_GB / self.gigabytes(estimate, dim, 1))
        covered = round(approximate_n_voxels_dataset * self.max_dataset_covered / math.prod(patch))
        plan["batch_size"] = max(min(fits, covered), self.UNet_min_batch_size)
        self.estimates[self._configuration] = self.gigabytes(estimate, dim, plan["batch_size"])
        return plan

    def save_plans(self, plans):
        """Keep the requested configurations, point each at nnU-Net's preprocessed data where it would be
        the same (`self.reused`), record the target and the estimates, then write as nnU-Net does."""
        planned = list(plans["configurations"])
        plans["configurations"] = {c: p for c, p in plans["configurations"].items() if c in self.configurations}
        if not plans["configurations"]:
            raise PlanningError(f"nnU-Net plans none of {sorted(self.configurations)} for {self.dataset_name}; it "
                                f"plans {', '.join(planned)}.")
        default_file = nnUNet_preprocessed_folder(self.dataset_name) / "nnUNetPlans.json"
        default = json.loads(default_file.read_text()) if default_file.is_file() else {"configurations": {}}
        self.default_configurations = default["configurations"]
        for name, configuration in plans["configurations"].items():
            if "data_identifier" not in configuration:  # 3d_cascade_fullres inherits 3d_fullres
                continue
            theirs = default["configurations"].get(name)
            same = (theirs is not None and default.get("transpose_forward") == list(plans["transpose_forward"])
                    and all(_jsonable(theirs.get(k)) == _jsonable(configuration.get(k)) for k in DATA_KEYS))
            self.reused[name] = theirs["data_identifier"] if same else None
            if same:
                configuration["data_identifier"] = theirs["data_identifier"]
        plans["nnunet_ext"] = {"architecture": self.architecture.name, "gpu_memory_target_gb": self.UNet_vram_target_GB,
                               "estimated_gpu_memory_gb": {c: self.estimates[c] for c in self.reused}}
        super().save_plans(plans)


def _round_up(value: float) -> float:
    """`value` rounded up to two significant digits."""
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step - 1e-9) * step


def _key(patch_size, strides) -> str:
    return f"{[int(p) for p in patch_size]}_{_jsonable(strides)}"


def _jsonable(value):
    """`value` as it reads back from a plans file (numpy arrays and tuples become lists)."""
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    value = {"v": deepcopy(value)}
    recursive_fix_for_json_export(value)
    return json.loads(json.dumps(value["v"]))


def nnUNet_preprocessed_folder(dataset_name: str) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / dataset_name


def planner_for(arch: Architecture) -> type[ArchitecturePlanner]:
    return type(f"ArchitecturePlanner_{arch.name}", (ArchitecturePlanner,), {"architecture": arch})


def plan(dataset, arch: Architecture, gpu_memory: float = DEFAULT_GPU_MEMORY,
         configurations: list[str] | None = None) -> dict:
    """Plan `dataset` for `arch` within `gpu_memory` GB and write the plans file next to nnU-Net's.
    Returns a summary: plans name and file, and per configuration patch, batch, estimated GB,
    nnU-Net's default patch and batch, and the reused data identifier (None: preprocessing needed)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(variable):
            raise PlanningError(f"{variable} is not set; export it (see `nnunet-ext doctor`).")
    if gpu_memory <= 0:
        raise PlanningError(f"--gpu-memory must be positive, got {gpu_memory:g}.")
    unknown = set(configurations or ()) - set(CONFIGURATIONS)
    if unknown:
        raise PlanningError(f"Unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGURATIONS)}.")
    name = maybe_convert_to_dataset_name(dataset)
    folder = nnUNet_preprocessed_folder(name)
    if not (folder / "dataset_fingerprint.json").is_file():
        raise PlanningError(f"No fingerprint for {name}; run nnUNetv2_extract_fingerprint -d {dataset} first "
                            "(nnUNetv2_plan_and_preprocess does too).")
    for dim in {2 if c == "2d" else 3 for c in configurations or CONFIGURATIONS} & set(arch.dims):
        arch.memory_model(dim)  # a missing model names the command that makes it, before nnU-Net plans anything
    identifier = arch.plans_name(gpu_memory)
    planner = planner_for(arch)(name, gpu_memory_target_in_gb=gpu_memory, plans_name=identifier,
                                configurations=configurations or CONFIGURATIONS)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every plan it considers
        planner.plan_experiment()
    written = json.loads((folder / f"{identifier}.json").read_text())
    default = planner.default_configurations
    summary = {"dataset": name, "plans": identifier, "file": str(folder / f"{identifier}.json"),
               "gpu_memory": gpu_memory, "configurations": {}}
    for c, data in planner.reused.items():
        summary["configurations"][c] = {
            "patch_size": written["configurations"][c]["patch_size"],
            "batch_size": written["configurations"][c]["batch_size"], "estimated_gb": planner.estimates[c],
            "default_patch_size": default.get(c, {}).get("patch_size"),
            "default_batch_size": default.get(c, {}).get("batch_size"), "reused_data": data,
            "preprocessed": (folder / written["configurations"][c]["data_identifier"]).is_dir()}
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="name or id (its fingerprint must exist)")
    parser.add_argument("-a", "--architecture", required=True, help="registered name (nnunet-ext list)")
    parser.add_argument("--gpu-memory", type=float, help="GB of GPU memory to plan for (default: nnU-Net's, 8)")
    parser.add_argument("-c", "--configurations", nargs="+",
                        help="configurations to write (default: all nnU-Net plans)")


def main(args) -> int:
    arch = get_architecture(args.architecture)
    gpu_memory = DEFAULT_GPU_MEMORY if args.gpu_memory is None else args.gpu_memory
    progress(f"  planning {args.dataset} for {arch.name} within {gpu_memory:g} GB ...")
    summary = plan(args.dataset, arch, gpu_memory, args.configurations)
    print(f"{summary['dataset']}: plans {summary['plans']} for {arch.name}, GPU memory target "
          f"{gpu_memory:g} GB (nnU-Net's estimate scaled by {arch.name}'s memory model)")
    table = [["configuration", "patch", "batch", "estimated GPU memory", "nnU-Net's patch", "nnU-Net's batch",
              "preprocessed data"]]
    missing = []
    for c, r in summary["configurations"].items():
        default = "x".join(map(str, r["default_patch_size"])) if r["default_patch_size"] else "-"
        data = f"{r['reused_data']} (nnU-Net's)" if r["reused_data"] else "its own"
        if not r["preprocessed"]:
            missing.append(c)
            data += ", not preprocessed yet"
        table.append([c, "x".join(map(str, r["patch_size"])), str(r["batch_size"]), f"{r['estimated_gb']:.3g} GB",
                      default, str(r["default_batch_size"] or "-"), data])
    print(text_table(table))
    print(f"Written: {summary['file']}")
    if missing:
        print(f"Preprocess first: nnUNetv2_preprocess -d {args.dataset} -plans_name {summary['plans']} -c "
              + " ".join(missing))
    configurations = summary["configurations"]
    first = "3d_fullres" if "3d_fullres" in configurations else next(iter(configurations))
    print(f"Train: nnUNetv2_train {args.dataset} {first} 0 -tr {arch.trainer} -p {summary['plans']}")
    return 0
