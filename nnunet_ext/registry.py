"""The one registry of architectures: the trainers, the tools and the tests all read it.

An architecture is one network module in `nnunet_ext/networks/` and one `register(...)` entry here.
From the entry come its trainer classes (`nnunet_ext.trainers`: its trainer, one per preset, and the
short schedules of each), its rows in `nnunet-ext list`, `doctor` and `benchmark`, and the contract
tests. Its options and their defaults are the network constructor's keyword arguments; its memory
model is measured by `nnunet-ext benchmark-memory --fit --write` (nnunet_ext/memory_models.json).

Plain Python: a network class, a trainer recipe and a fast path's probe are imported only when
used, so reading the registry imports neither torch nor any optional dependency.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from nnunet_ext import memory_models
from nnunet_ext.errors import ConfigurationError

class Schedule(NamedTuple):
    """A short schedule every trainer also comes in, as `<trainer>_<name>`."""
    epochs: int
    iterations: int  # training iterations per epoch
    val_iterations: int  # validation iterations per epoch
    # Test-time mirroring in the final validation and in nnUNetv2_predict (nnU-Net's: every axis). Off,
    # a 3D patch is predicted once instead of 8 times; training's mirroring augmentation is unchanged.
    mirroring: bool = True


# `debug` proves the commands (tests), without test-time mirroring; `real` is the CPU schedule of
# `nnunet-ext real-data` (docs/results.md: 3 to 8 minutes per trainer and fold on 2 cores).
SCHEDULES = {"debug": Schedule(1, 5, 2, mirroring=False), "demo": Schedule(4, 10, 3), "real": Schedule(12, 10, 2)}

# The arguments every network class takes before its options.
NETWORK_ARGUMENTS = ("self", "topology", "input_channels", "num_classes", "deep_supervision")


def import_object(path: str, what: str):
    """The object at "module:name"; ImportError naming `what` needs it where it cannot be imported."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"{what} names '{path}', which cannot be imported: {e}") from e


@dataclass(frozen=True)
class FastPath:
    """An optional accelerated code path for tensors on `device` ("cuda" or "cpu"). `probe`
    ("module:function") returns why the path is off whatever the machine, or None."""

    name: str
    probe: str
    device: str = "cuda"

    def missing(self) -> list[str]:
        """Why this path is off on this machine; empty when active."""
        reason = import_object(self.probe, f"Fast path '{self.name}'")()
        missing = [reason] if reason else []
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                missing.append("no CUDA GPU")
        return missing


def fast_path_state(missing: list[str]) -> str:
    """How `nnunet-ext doctor` and the training log report a fast path."""
    return "active" if not missing else f"off ({'; '.join(missing)}); the PyTorch path runs instead, slower"


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    name: lower_case, used by the commands (`-a NAME`) and in file names.
    trainer: the class name nnU-Net looks up (`-tr`); it must start with nnUNetTrainer.
    network: "module:Class", taking (topology, input_channels, num_classes, deep_supervision,
        **options), every option with its default in the signature.
    dims: the spatial dimensions it is built for (2, 3).
    recipe: "module:Class" of the trainer class its trainers derive from: nnunet_ext.trainers.base's
        nnUNetExtTrainer (nnU-Net's optimiser and schedule), or a hand-written one where the
        published recipe differs (nnunet_ext/trainers/recipes.py).
    presets: named sets of options, each with a trainer of its own, `<trainer><Name>` (`official`
        gives nnUNetTrainer<...>Official).
    fast_paths: optional accelerated code paths, reported by `list`, `doctor` and the training log.
    compile_off: why nnU-Net's torch.compile (on by default on CUDA) is turned off for it, which the
        training log says; empty where it compiles.
    official_weights: "module:function" that renames a state dict written by the official code to the
        `official` preset's (`nnunet-ext import-official`), taking (state, ours), ours being the preset
        network's state dict or None; empty where there is none.
    family: the network it is a variant of (U-Mamba_Bot and _Enc are "umamba"), where there are several:
        the variants of one family take turns in the tests' slow rotations; empty for none.
    """

    name: str
    trainer: str
    network: str
    dims: tuple[int, ...]
    summary: str
    reference: str
    recipe: str = "nnunet_ext.trainers.base:nnUNetExtTrainer"
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fast_paths: tuple[FastPath, ...] = ()
    compile_off: str = ""
    official_weights: str = ""
    family: str = ""

    def __post_init__(self):
        problems = []
        if not (self.name.isidentifier() and self.name == self.name.lower()):
            problems.append(f"name '{self.name}' must be a lower-case identifier")
        if not (self.trainer.isidentifier() and self.trainer.startswith("nnUNetTrainer")):
            problems.append(f"trainer '{self.trainer}' must be an identifier starting with nnUNetTrainer")
        if not self.dims or not set(self.dims) <= {2, 3}:
            problems.append(f"dims {self.dims} must name 2, 3 or both")
        if self.official_weights and "official" not in self.presets:
            problems.append("official_weights needs an 'official' preset to load into")
        for what in ("network", "recipe", *(("official_weights",) if self.official_weights else ())):
            if ":" not in getattr(self, what):
                problems.append(f"{what} '{getattr(self, what)}' must read 'module:Class'")
        problems += [f"preset name '{p}' must be a lower-case identifier" for p in self.presets
                     if not (p.isidentifier() and p == p.lower())]
        if problems:
            raise ValueError(f"Architecture '{self.name}' cannot be registered: {'; '.join(problems)}.")

    def network_class(self) -> type:
        return import_object(self.network, f"Architecture '{self.name}'")

    def recipe_class(self) -> type:
        return import_object(self.recipe, f"Architecture '{self.name}'")

    def official_state_dict(self, state: Mapping[str, Any], ours: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A state dict written by the official code, renamed to the `official` preset's network, whose state
        dict `ours`, where given, is the layout to put tensors that the official code keeps in another one
        (the converter's second argument; renaming alone needs only names)."""
        if not self.official_weights:
            raise ConfigurationError(f"Architecture '{self.name}' has no converter for the official code's "
                                     "checkpoints.")
        return import_object(self.official_weights, f"Architecture '{self.name}'")(state, ours)

    def options(self) -> dict[str, Any]:
        """Every option and its default, read from the network constructor's signature."""
        parameters = list(inspect.signature(self.network_class().__init__).parameters.values())
        names = tuple(p.name for p in parameters[:len(NETWORK_ARGUMENTS)])
        if names != NETWORK_ARGUMENTS:
            raise TypeError(f"{self.network} must take {', '.join(NETWORK_ARGUMENTS[1:])} first, then its options; "
                            f"it takes {', '.join(names[1:])}.")
        options = parameters[len(NETWORK_ARGUMENTS):]
        without = [p.name for p in options if p.default is inspect.Parameter.empty]
        if without:
            raise TypeError(f"{self.network}: every option needs a default in the signature; {without} have none.")
        return {p.name: p.default for p in options}

    def option_values(self) -> dict[str, tuple]:
        """Every value of each option whose annotation names them: a bool, or a typing.Literal (with None
        where the option is optional). The tests build each, so every switch of the parameter set is covered."""
        hints = typing.get_type_hints(self.network_class().__init__)
        values = {}
        for name in self.options():
            hint = hints.get(name)
            members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            if bool in members:
                values[name] = (False, True, *((None,) if type(None) in members else ()))
                continue
            literals = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
            if literals:
                values[name] = (*literals, *((None,) if type(None) in members else ()))
        return values

    def build(self, topology, input_channels: int, num_classes: int, deep_supervision: bool = True, **options):
        """Build the network on `topology` (nnunet_ext.topology.Topology); `options` override the defaults."""
        if topology.dim not in self.dims:
            raise ConfigurationError(f"Architecture '{self.name}' supports "
                                     f"{'/'.join(f'{d}D' for d in self.dims)} configurations, but these plans are "
                                     f"{topology.dim}D.")
        known = self.options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigurationError(f"unknown for '{self.name}'; known: {sorted(known)}.", ", ".join(unknown))
        return self.network_class()(topology, input_channels, num_classes, deep_supervision=deep_supervision,
                                    **options)

    def preset_trainer(self, preset: str) -> str:
        """The trainer of a preset: `official` of nnUNetTrainerLKMUNet is nnUNetTrainerLKMUNetOfficial."""
        return self.trainer + "".join(part.capitalize() for part in preset.split("_"))

    def trainers(self) -> list[str]:
        """Its trainer classes: the architecture's, then one per preset."""
        return [self.trainer, *(self.preset_trainer(p) for p in self.presets)]

    def trainer_names(self) -> list[str]:
        """Every trainer class generated from this entry: `trainers()` and their short schedules."""
        return [*self.trainers(), *(f"{t}_{s}" for t in self.trainers() for s in SCHEDULES)]

    def memory_model(self, dim: int) -> memory_models.MemoryModel:
        """The training-memory model `nnunet-ext plan` sizes patches with (nnunet_ext/memory_models.json)."""
        return memory_models.memory_model(self.name, dim)

    def plans_name(self, gpu_memory: float) -> str:
        """The plans `nnunet-ext plan` writes for a GPU target: nnUNetPlans_LKMUNet_24G, for example."""
        return f"nnUNetPlans_{self.trainer.removeprefix('nnUNetTrainer')}_{gpu_memory:g}G"


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    taken = {t: a.name for a in ARCHITECTURES.values() for t in a.trainers()}
    if arch.name in ARCHITECTURES:
        raise ValueError(f"Architecture '{arch.name}' is registered twice.")
    clash = [t for t in arch.trainers() if t in taken]
    if clash:
        raise ValueError(f"Architecture '{arch.name}': trainer {clash[0]} is already {taken[clash[0]]}'s.")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown architecture '{name}'.{hint} Registered: {', '.join(ARCHITECTURES)} "
                       "(see `nnunet-ext list`).") from None


register(Architecture(
    name="attention_unet",
    trainer="nnUNetTrainerAttentionUNet",
    network="nnunet_ext.networks.attention_unet:AttentionUNet",
    dims=(2, 3),
    summary="nnU-Net's U-Net with additive attention gates on every skip and non-local "
            "self-attention at the low-resolution stages",
    reference="Oktay et al., Attention U-Net, MIDL 2018; seed 002 (self-attention)",
))

_MAMBA_FAST_PATHS = (FastPath("mamba-ssm CUDA selective scan", "nnunet_ext.ops.selective_scan:kernels_off_reason"),
                     FastPath("compiled CPU Mamba loops", "nnunet_ext.ops.cpu_kernel:cpu_kernel_off_reason", "cpu"))

register(Architecture(
    name="lkm_unet",
    trainer="nnUNetTrainerLKMUNet",
    network="nnunet_ext.networks.lkm_unet:LKMUNet",
    dims=(2, 3),
    summary="residual U-Net whose encoder stages end in large-kernel bidirectional Mamba: over the "
            "pixels of large windows (PiM), then over one token per window (PaM)",
    reference="Wang et al., LKM-UNet, MICCAI 2024; seed 004",
    presets={"official": {"window_layout": "official", "shared_out_proj": True, "single_token_layers": True,
                          "zero_init_decoder": True}},
    official_weights="nnunet_ext.networks.lkm_unet:from_official",
    fast_paths=_MAMBA_FAST_PATHS,
    compile_off="the selective scan and Mamba's convolution are C or CUDA kernels, which tracing stops at; the graph "
                "breaks fall inside the stages' loops, so the network compiles as many small frames whose "
                "recompiles make shapes dynamic, and inductor fails on them (docs/lkm_unet.md)",
))

register(Architecture(
    name="dlka_net",
    trainer="nnUNetTrainerDLKANet",
    network="nnunet_ext.networks.dlka_net:DLKANet",
    dims=(2, 3),
    summary="U-Net with deformable large-kernel attention (D-LKA) blocks at 1/4 resolution and below: "
            "in encoder and decoder (3D), in the decoder of the plans' convolutional encoder (2D)",
    reference="Azad et al., Beyond Self-Attention: Deformable Large Kernel Attention, WACV 2024; seed 001",
    compile_off="the deformable convolution samples its kernel taps in memory-bounded chunks, a loop that tracing "
                "unrolls: 25 to 49 recomputed chunks per convolution at nnU-Net-sized 2D plans, and compiling takes "
                "longer than the training gains (docs/dlka_net.md)",
    # The official 3D network's modules on 3D plans' stages, the official 2D decoder's block on 2D plans
    # (docs/dlka_net.md).
    presets={"official": {"layout": "official"}},
    official_weights="nnunet_ext.networks.dlka_net:from_official",
))

register(Architecture(
    name="ukan",
    trainer="nnUNetTrainerUKAN",
    network="nnunet_ext.networks.ukan:UKAN",
    dims=(2, 3),
    summary="U-Net whose two lowest-resolution stages are tokenized KAN blocks (token shift, "
            "B-spline KANLinear, depthwise convolution), convolutional above",
    reference="Li et al., U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation, "
              "AAAI 2025; seed 000",
    recipe="nnunet_ext.trainers.recipes:UKANRecipe",
    # The official network's modules on the plans' stages, no token shift (docs/ukan.md).
    presets={"official": {"layout": "official", "token_shift": False}},
    official_weights="nnunet_ext.networks.ukan:from_official",
    fast_paths=(FastPath("compiled CPU B-spline bases", "nnunet_ext.ops.cpu_kernel:cpu_kernel_off_reason", "cpu"),),
))

register(Architecture(
    name="vit_hybrid",
    trainer="nnUNetTrainerViTransUNet",
    network="nnunet_ext.networks.vit_hybrid:ViTransUNet",
    dims=(2, 3),
    summary="nnU-Net's U-Net with a ViT (12 pre-norm blocks, width 384, 6 heads; TransUNet's ViT-B with "
            "width=768, heads=12) over the tokens of the stride-16 encoder stage, positional embeddings "
            "sized from the patch",
    reference="Chen et al., TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation, "
              "2021; seed 003",
    recipe="nnunet_ext.trainers.recipes:TransformerRecipe",
))

# U-Mamba_Bot and U-Mamba_Enc: one network whose Mamba layers go after the bottleneck or after every stage.
for _variant, _where in (("bot", "one Mamba layer (LayerNorm, Mamba over every position) after its bottleneck"),
                         ("enc", "a Mamba layer (LayerNorm, Mamba over every position) after every encoder stage")):
    register(Architecture(
        name=f"umamba_{_variant}",
        trainer=f"nnUNetTrainerUMamba{_variant.capitalize()}",
        network=f"nnunet_ext.networks.umamba:UMamba{_variant.capitalize()}",
        dims=(2, 3),
        summary=f"residual U-Net with {_where}",
        reference="Ma, Li and Wang, U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation, 2024",
        presets={"official": {"layout": "official"}},
        official_weights="nnunet_ext.networks.umamba:from_official",
        fast_paths=_MAMBA_FAST_PATHS,
        compile_off="the selective scan and Mamba's convolution are C or CUDA kernels, which tracing stops at: the "
                    "network would compile as separate graphs around every Mamba layer, a path not proven against "
                    "eager here (docs/umamba.md)",
        family="umamba",
    ))
del _variant, _where

# MedNeXt in the paper's four sizes, each with kernel 3 (its trainer) and kernel 5 (`K5`, which `nnunet-ext upkern`
# starts from a trained kernel-3 network), on the plans' topology and as the official network.
for _size in "SBML":
    register(Architecture(
        name=f"mednext_{_size.lower()}",
        trainer=f"nnUNetTrainerMedNeXt{_size}",
        network=f"nnunet_ext.networks.mednext:MedNeXt{_size}",
        dims=(2, 3),
        summary=f"MedNeXt-{_size}: a U-Net of ConvNeXt blocks (depthwise convolution, GroupNorm, 1x1 expansion, GELU, "
                "1x1 compression) that also resample, skips added",
        reference="Roy et al., MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image Segmentation, "
                  "MICCAI 2023",
        recipe="nnunet_ext.trainers.recipes:MedNeXtRecipe",
        presets={"k5": {"kernel_size": 5}, "official": {"layout": "official"},
                 "official_k5": {"layout": "official", "kernel_size": 5}},
        official_weights="nnunet_ext.networks.mednext:from_official",
        family="mednext",
    ))
del _size
