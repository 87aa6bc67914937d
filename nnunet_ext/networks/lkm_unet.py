"""LKM-UNet on nnU-Net's planned topology, 2D and 3D from one implementation.

Wang et al., "Large Kernel Vision Mamba UNet for Medical Image Segmentation" (LKM-UNet),
MICCAI 2024: a U-Net whose encoder stages each end in a large-kernel Mamba (LM) block, PiM over
the pixels of large windows then PaM over one token per window, with a residual-block decoder.
docs/lkm_unet.md lists every difference from the paper and from the official code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_ext.blocks.large_kernel_mamba import OFFICIAL_PIXEL_GRID, LMBlock, WindowLayout
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder, rename_state_dict
from nnunet_ext.topology import Topology


def default_windows(topology: Topology) -> list[tuple[int, ...]]:
    """Window size per stage, from the feature map sizes at the plans' patch size.

    Stage s of n is cut into 2**(ceil((n - s) / 2) - 1) windows per axis (fewer where the axis is
    shorter): the official code's schedule, which on the paper's patches gives 40x40 windows in
    2D and 20x28x24 in 3D at the first stages, halving every second stage.
    """
    windows = []
    for s, size in enumerate(topology.feature_map_sizes()):
        count = 2 ** (math.ceil((topology.n_stages - s) / 2) - 1)
        windows.append(tuple(math.ceil(a / min(count, a)) for a in size))
    return windows


def official_windows(topology: Topology) -> list[tuple[int, ...]]:
    """The official code's base size p per stage, 2**(ceil((n - s) / 2) - 1) for stage s of n
    (LKMUNet.py lines 363-364): PaM pools p, PiM's grid is a multiple of it."""
    return [(2 ** (math.ceil((topology.n_stages - s) / 2) - 1),) * topology.dim for s in range(topology.n_stages)]


class LKMUNet(SegmentationNetwork):
    """LKM-UNet.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`). The encoder is always residual
            (BasicBlockD); plain plans' `n_conv_per_stage` becomes the number of blocks per stage.
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        window_sizes: for every stage (an int or one per axis), the pixels per window ("contiguous") or
            the official base size p ("official"); None derives them from the patch size
            (`default_windows`) or takes the official code's schedule (`official_windows`).
        window_layout: "contiguous" windows (the paper) or the "official" code's two grids
            (`nnunet_ext.blocks.large_kernel_mamba`).
        d_state, d_conv, expand: Mamba's state size, causal conv width and inner expansion.
        pixel_mamba, patch_mamba, bidirectional: PiM, PaM and BiM switches (the paper's ablation).
        shared_out_proj: BiM's projection as in the official code: the Mamba layers without out_proj,
            one bias-free Linear(d_inner, C) after the sum (else each keeps its out_proj, then a
            Linear(C, C) with bias).
        single_token_layers: keep PiM and PaM layers whose sequences are one token at the patch size,
            as the official code does (they map each pixel's channels on their own).
        zero_init_decoder: start the decoder's residual blocks as identities too, as the official code
            does (the encoder's always do). Off by default: a decoder stage then starts as a 1x1
            projection, so the whole decoder starts without a spatial convolution, and on short
            schedules whole classes are missed (docs/lkm_unet.md, "Initialisation").
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 window_sizes: Sequence[int | Sequence[int]] | None = None, window_layout: WindowLayout = "contiguous",
                 d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 pixel_mamba: bool = True, patch_mamba: bool = True, bidirectional: bool = True,
                 shared_out_proj: bool = False, single_token_layers: bool = False, zero_init_decoder: bool = False):
        super().__init__(topology)
        self.window_sizes = self._windows(topology, window_sizes, window_layout)
        sizes = topology.feature_map_sizes()
        blocks = []

        def stage(s, plans_stage):  # each residual stage ends in an LM block
            blocks.append(LMBlock(topology.features_per_stage[s], self.window_sizes[s], sizes[s], window_layout,
                                  pixel_mamba, patch_mamba, single_token_layers, d_state=d_state, d_conv=d_conv,
                                  expand=expand, bidirectional=bidirectional, shared_out_proj=shared_out_proj))
            return nn.Sequential(plans_stage(), blocks[-1])

        self.encoder = dataclasses.replace(topology, residual_encoder=True).build_encoder(input_channels, stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, residual=True, encoder=self.encoder)
        self.initialize(identity_blocks=None if zero_init_decoder else self.encoder)
        if window_layout == "official" and topology.dim == 3:
            self.notes.append(f"PiM's grids are the official code's {'p x '.join(map(str, OFFICIAL_PIXEL_GRID[3]))}p "
                              "per axis, factors fixed for the paper's 3D patch, whatever the plans' patch")
        self.notes += [f"stage {s} ({'x'.join(map(str, sizes[s]))} at the patch size): {note} (the official code's "
                       "global scan)" for s, block in enumerate(blocks) for note in block.global_scans(sizes[s])]

    @staticmethod
    def _windows(topology: Topology, window_sizes, layout: str) -> list[tuple[int, ...]]:
        if window_sizes is None:
            return official_windows(topology) if layout == "official" else default_windows(topology)
        if len(window_sizes) != topology.n_stages:
            raise ConfigurationError(f"needs one entry per stage ({topology.n_stages}), got {len(window_sizes)}.",
                                     "window_sizes")
        windows = []
        for w in window_sizes:
            w = (w,) * topology.dim if isinstance(w, int) else tuple(int(a) for a in w)
            if len(w) != topology.dim or min(w) < 1:
                raise ConfigurationError(f"each window size must be a positive int or {topology.dim} positive ints, "
                                         f"got {w}.", "window_sizes")
            windows.append(w)
        return windows


# The official code's state-dict names (LKMUNet.py at 66157750) -> the `official` preset's. Its encoder
# keeps the residual stages and the PiM and PaM layers in three lists; ours ends each stage in an LM
# block. The decoder (and its copy of the encoder) has the same names.
OFFICIAL_NAMES = [
    (r"(^|\.)encoder\.stages\.(\d+)\.", r"\1encoder.stages.\2.0."),
    (r"(^|\.)encoder\.mamba_layers\.(\d+)\.", r"\1encoder.stages.\2.1.pim.mamba."),
    (r"(^|\.)encoder\.w_mamba_layers\.(\d+)\.", r"\1encoder.stages.\2.1.pam.mamba."),
    (r"\.mamba_forw\.", ".forward_mamba."),
    (r"\.mamba_backw\.", ".backward_mamba."),
]


def from_official(state: Mapping[str, torch.Tensor],
                  ours: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A state dict of the official LKMUNet (its fork's `checkpoint_final.pth`, "network_weights")
    as the `official` preset's. Every tensor keeps its shape: `ours` is not needed."""
    return rename_state_dict(state, OFFICIAL_NAMES)
