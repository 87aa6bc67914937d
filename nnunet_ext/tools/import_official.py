"""`nnunet-ext import-official`: a checkpoint written by an architecture's official code becomes a fold
folder of its `official` preset's trainer (nnUNetTrainer<Arch>Official), which stock
`nnUNetv2_predict -tr ...` predicts with and `nnUNetv2_train ... -pretrained_weights` starts from. Where the
official code has several networks (MedNeXt's kernel 3 and 5), the presets named official_* are tried too,
and the one the checkpoint fits is written (MedNeXt's `official_k5`: nnUNetTrainerMedNeXt<X>OfficialK5).

A downloaded checkpoint is untrusted. It is read with `torch.load(weights_only=True)`, which rebuilds
tensors and plain containers only (and numpy's scalars and dtypes, which nnU-Net's training logs hold):
a file that carries anything else, such as a pickled callable, is refused without running it. Nothing
is written unless every tensor of the preset's network on the dataset's plans is in the checkpoint,
with its shape, and nothing else is.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from nnunet_ext.networks.base import mismatching_tensors, with_zero_heads
from nnunet_ext.registry import ARCHITECTURES, get_architecture
from nnunet_ext.tools.plans_io import dataset_files, load_configuration
from nnunet_ext.topology import Topology

# numpy's scalars and dtypes are data, rebuilt from bytes; nnU-Net's checkpoints carry them in 'logging'. A
# checkpoint written under numpy 1 names the scalar's constructor numpy.core.multiarray.scalar, under numpy 2
# numpy._core.multiarray.scalar: both are allowed, whichever numpy reads them.
_SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
NUMPY_DATA = [np.dtype, *((_SCALAR, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")),
              *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType"))]
# Where checkpoints keep the network's tensors: nnU-Net's ('network_weights', the LKM-UNet fork's
# checkpoint_final.pth) and common training scripts'; else the file is the state dict itself.
STATE_KEYS = ("network_weights", "state_dict", "model_state_dict", "model")


class ImportRefused(ValueError):
    """The checkpoint is not imported; the message says why and what to do. Nothing was written."""


def add_arguments(parser) -> None:
    parser.add_argument("architecture", help="registered architecture with an official preset (nnunet-ext list)")
    parser.add_argument("checkpoint", type=Path, help="the file the official code saved")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id, planned and preprocessed")
    parser.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", "--fold", required=True, help="fold to write: 0-4 or all")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint_final.pth already there")


def read_checkpoint(path: Path):
    """What a checkpoint holds, read without unpickling anything but data (tensors, plain containers, numpy's
    scalars, torch.device)."""
    if not path.is_file():
        raise ImportRefused(f"{path} does not exist.")
    try:
        with torch.serialization.safe_globals(NUMPY_DATA):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if not named:
            detail = re.search(r"WeightsUnpickler error: (.*)", str(error))
            raise ImportRefused(f"{path} is not a PyTorch checkpoint torch.load can read: "
                                f"{detail.group(1) if detail else error}") from None
        raise ImportRefused(f"{path} holds more than tensors and plain data (it names {named.group(1)}), so it was "
                            "not loaded: unpickling such objects can run any code. Load it only if you trust its "
                            "source, and save its state dict alone: torch.save(model.state_dict(), "
                            "'weights.pth').") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ImportRefused(f"{path} is not a PyTorch checkpoint torch.load can read: {error}") from None


def state_dict_of(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors in what `read_checkpoint` read from `path`."""
    if isinstance(loaded, dict):
        loaded = next((loaded[k] for k in STATE_KEYS if isinstance(loaded.get(k), dict)), loaded)
    if not (isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ImportRefused(f"{path} holds no state dict (a dict of tensors, alone or under one of {STATE_KEYS}).")
    return {k.removeprefix("module."): v for k, v in loaded.items()}  # saved from DDP


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, read without unpickling anything but data."""
    return state_dict_of(read_checkpoint(path), path)


def first_mismatch(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str | None:
    """The first tensor in which the converted checkpoint and our network disagree, in words."""
    wrong, extra = mismatching_tensors(ours, theirs)
    if wrong:
        name, shape = wrong[0], tuple(ours[wrong[0]].shape)
        if name not in theirs:
            return f"'{name}' {shape} is missing from the checkpoint"
        return f"'{name}' is {tuple(theirs[name].shape)} in the checkpoint, {shape} here"
    return f"the checkpoint has {len(extra)} tensors this network does not, first '{extra[0]}'" if extra else None


def official_presets(arch) -> list[str]:
    """The presets that build an official network: `official`, then those named official_*."""
    return [p for p in arch.presets if p == "official"] + [p for p in arch.presets if p.startswith("official_")]


def import_official(architecture: str, checkpoint: Path, dataset: str, configuration: str, plans: str = "nnUNetPlans",
                    fold: str = "0", overwrite: bool = False) -> tuple[Path, str]:
    """Write the fold folder; returns its checkpoint_final.pth and the trainer it belongs to. Raises
    ImportRefused before writing anything."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    arch = get_architecture(architecture)
    if "official" not in arch.presets or not arch.official_weights:
        have = [a.name for a in ARCHITECTURES.values() if a.official_weights]
        raise ImportRefused(f"{arch.name} has no official preset to import into yet; these have: {', '.join(have)}.")
    if fold != "all" and not fold.isdigit():
        raise ImportRefused(f"fold must be a number or 'all', got '{fold}'.")
    state = read_state_dict(checkpoint)
    manager, channels, heads = load_configuration(dataset, configuration, plans)
    mismatches = {}
    for preset in official_presets(arch):
        ours = arch.build(Topology.from_plans(manager), channels, heads, **arch.presets[preset]).state_dict()
        # nnU-Net's deep-supervision heads, where the official network has none
        converted = with_zero_heads(ours, arch.official_state_dict(state, ours))
        mismatches[preset] = first_mismatch(ours, converted)
        if mismatches[preset] is None:
            state = converted
            break
    else:
        kw = manager.network_arch_init_kwargs
        others = "".join(f" Nor does it fit {arch.preset_trainer(p)}'s: {m}." for p, m in mismatches.items()
                         if p != "official")
        raise ImportRefused(
            f"{checkpoint} does not fit {arch.preset_trainer('official')}'s network on {plans} {configuration}: "
            f"{mismatches['official']}.{others} That network has {kw['n_stages']} stages of "
            f"{list(kw['features_per_stage'])} features, "
            f"{channels} input channel(s) and {heads} output(s), on patches of "
            f"{'x'.join(map(str, manager.patch_size))}: "
            "the official network must have been trained on plans of this topology (docs/official.md). Nothing was "
            "written.")

    trainer = arch.preset_trainer(preset)
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(get_output_folder(name, trainer, plans, configuration, fold="all" if fold == "all" else int(fold)))
    target = folder / "checkpoint_final.pth"
    if target.exists() and not overwrite:
        raise ImportRefused(f"{target} exists; it is left as it is. Pass --overwrite to replace it, or import into "
                            "another fold.")
    plans_dict, dataset_json = (json.loads(f.read_text()) for f in dataset_files(name, plans))
    for file_name, content in (("plans.json", plans_dict), ("dataset.json", dataset_json)):
        existing = folder.parent / file_name
        if existing.exists() and json.loads(existing.read_text()) != content:
            raise ImportRefused(f"{existing} differs from the dataset's {file_name} in nnUNet_preprocessed; the "
                                "folds of one model share it. Import into a model folder of its own (another -p).")

    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in (("plans.json", plans_dict), ("dataset.json", dataset_json)):
        (folder.parent / file_name).write_text(json.dumps(content, indent=4))
    torch.save({
        "network_weights": {k: state[k].to(v.dtype).contiguous() for k, v in ours.items()},
        "init_args": {"plans": plans_dict, "configuration": configuration, "fold": fold,
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": trainer,
        # nnU-Net's trainer mirrors along every axis at inference (configure_rotation_dummyDA_mirroring...)
        "inference_allowed_mirroring_axes": tuple(range(len(manager.patch_size))),
        "imported_from": {"file": str(checkpoint), "architecture": arch.name},
    }, target)
    return target, trainer


def main(args) -> int:
    target, trainer = import_official(args.architecture, args.checkpoint, args.dataset, args.configuration,
                                      args.plans, args.fold, args.overwrite)
    print(f"Written: {target}\nPredict:  nnUNetv2_predict -i INPUT -o OUTPUT -d {args.dataset} -c {args.configuration} "
          f"-p {args.plans} -tr {trainer} -f {args.fold}\nFine-tune: nnUNetv2_train "
          f"{args.dataset} {args.configuration} FOLD -p {args.plans} -tr {trainer} "
          f"-pretrained_weights {target}")
    return 0
