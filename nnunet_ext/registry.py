"""The one registry of architectures: trainers, tests, `nnunet-ext list` and benchmarks read it.

Adding an architecture is one network module, one `register(...)` call here and a few lines of
trainer in `nnunet_ext/trainers.py`. Network classes are imported only when built, so reading the
registry never imports an optional dependency.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Mapping

from nnunet_ext.memory import MemoryModel
from nnunet_ext.topology import PlansError, Topology


@dataclass(frozen=True)
class FastPath:
    """An optional accelerated code path for tensors on `device` ("cuda" or "cpu"). `probe`
    ("module:function") returns why the path is off whatever the machine, or None."""

    name: str
    probe: str
    device: str = "cuda"

    def missing(self) -> list[str]:
        """Why this path is off on this machine; empty when active."""
        module, function = self.probe.split(":")
        reason = getattr(importlib.import_module(module), function)()
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
    name: str
    trainer: str
    network: str  # "module:Class"; the class takes (topology, input_channels, num_classes, deep_supervision, **options)
    dims: tuple[int, ...]
    summary: str
    reference: str
    options: Mapping[str, Any] = field(default_factory=dict)
    fast_paths: tuple[FastPath, ...] = ()
    # Training memory per dimension, fitted by `nnunet-ext benchmark-memory --fit` (nnunet_ext.memory);
    # the planner sizes patch and batch with it.
    memory: Mapping[int, MemoryModel] = field(default_factory=dict)

    def network_class(self) -> type:
        module, cls = self.network.split(":")
        return getattr(importlib.import_module(module), cls)

    def build(self, topology: Topology, input_channels: int, num_classes: int,
              deep_supervision: bool = True, **options):
        """Build the network on `topology`; `options` override the registered defaults."""
        if topology.dim not in self.dims:
            raise PlansError(f"Architecture '{self.name}' supports {'/'.join(f'{d}D' for d in self.dims)} "
                             f"configurations, but these plans are {topology.dim}D.")
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"Unknown option(s) {sorted(unknown)} for '{self.name}'; "
                            f"known: {sorted(self.options)}.")
        return self.network_class()(topology, input_channels, num_classes,
                                    deep_supervision=deep_supervision, **{**self.options, **options})


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"Architecture '{arch.name}' is registered twice.")
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
    options={"self_attention_max_tokens": 4096, "attention_gates": True},
    memory={2: MemoryModel(8.455, 10.78, 0.0), 3: MemoryModel(9.196, 9.6, 1.709)},
))

register(Architecture(
    name="lkm_unet",
    trainer="nnUNetTrainerLKMUNet",
    network="nnunet_ext.networks.lkm_unet:LKMUNet",
    dims=(2, 3),
    summary="residual U-Net whose encoder stages end in large-kernel bidirectional Mamba: over the "
            "pixels of large windows (PiM), then over one token per window (PaM)",
    reference="Wang et al., LKM-UNet, MICCAI 2024; seed 004",
    options={"window_sizes": None, "window_layout": "contiguous", "d_state": 16, "d_conv": 4, "expand": 2,
             "pixel_mamba": True, "patch_mamba": True, "bidirectional": True, "zero_init_decoder": False},
    fast_paths=(FastPath("mamba-ssm CUDA selective scan", "nnunet_ext.ops.selective_scan:kernels_off_reason"),
                FastPath("compiled CPU Mamba loops", "nnunet_ext.ops.cpu_kernel:cpu_kernel_off_reason", "cpu")),
    memory={2: MemoryModel(47.65, 0.0, 4.342), 3: MemoryModel(56.06, 0.0, 0.225)},
))

register(Architecture(
    name="dlka_net",
    trainer="nnUNetTrainerDLKANet",
    network="nnunet_ext.networks.dlka_net:DLKANet",
    dims=(2, 3),
    summary="U-Net with deformable large-kernel attention (D-LKA) blocks at 1/4 resolution and below: "
            "in encoder and decoder (3D), in the decoder of the plans' convolutional encoder (2D)",
    reference="Azad et al., Beyond Self-Attention: Deformable Large Kernel Attention, WACV 2024; seed 001",
    options={"encoder_blocks": None, "bottleneck_blocks": None, "decoder_blocks": None, "dlka_from_stride": 4,
             "deformable": None, "position_embedding": False, "layer_scale": 1e-6},
    memory={2: MemoryModel(12.41, 0.0, 2.307), 3: MemoryModel(13.9, 0.0, 0.0)},
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
    options={"token_mixer": "kan", "token_shift": True, "kan_conv": False, "depth": 1, "drop_path_rate": 0.0,
             "grid_size": 5, "spline_order": 3},
    memory={2: MemoryModel(8.162, 8.214, 2.568), 3: MemoryModel(8.774, 9.146, 2.006)},
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
    options={"transformer_stages": None, "depth": 12, "width": 384, "heads": 6, "mlp_ratio": 4.0,
             "drop_path_rate": 0.1},
    memory={2: MemoryModel(3.021, 19.4, 4.062), 3: MemoryModel(10.08, 15.97, 1.191)},
))
