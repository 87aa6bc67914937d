"""LKM-UNet on nnU-Net's planned topology, 2D and 3D from one implementation.

Wang et al., "Large Kernel Vision Mamba UNet for Medical Image Segmentation" (LKM-UNet),
MICCAI 2024: a U-Net whose encoder stages each end in a large-kernel Mamba (LM) block, PiM over
the pixels of large windows then PaM over one token per window, with a residual-block decoder.
docs/lkm_unet.md lists every difference from the paper and from the official code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from torch import nn

from nnunet_ext.blocks.large_kernel_mamba import LMBlock, WindowLayout
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder
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


class LKMUNet(SegmentationNetwork):
    """LKM-UNet.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`). The encoder is always residual
            (BasicBlockD); plain plans' `n_conv_per_stage` becomes the number of blocks per stage.
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        window_sizes: pixels per window for every stage (an int or one per axis); None derives
            them from the patch size (`default_windows`).
        window_layout: "contiguous" windows (the paper) or the official code's "strided" grid.
        d_state, d_conv, expand: Mamba's state size, causal conv width and inner expansion.
        pixel_mamba, patch_mamba, bidirectional: PiM, PaM and BiM switches (the paper's ablation).
        zero_init_decoder: start the decoder's residual blocks as identities too, as the official code
            does (the encoder's always do). Off by default: a decoder stage then starts as a 1x1
            projection, so the whole decoder starts without a spatial convolution, and on short
            schedules whole classes are missed (docs/lkm_unet.md, "Initialisation").
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 window_sizes: Sequence[int | Sequence[int]] | None = None, window_layout: WindowLayout = "contiguous",
                 d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 pixel_mamba: bool = True, patch_mamba: bool = True, bidirectional: bool = True,
                 zero_init_decoder: bool = False):
        super().__init__(topology)
        self.window_sizes = self._windows(topology, window_sizes)
        sizes = topology.feature_map_sizes()

        def stage(s, plans_stage):  # each residual stage ends in an LM block
            lm = LMBlock(topology.features_per_stage[s], self.window_sizes[s], sizes[s], window_layout, pixel_mamba,
                         patch_mamba, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional)
            return nn.Sequential(plans_stage(), lm)

        self.encoder = dataclasses.replace(topology, residual_encoder=True).build_encoder(input_channels, stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, residual=True, encoder=self.encoder)
        self.initialize(identity_blocks=None if zero_init_decoder else self.encoder)

    @staticmethod
    def _windows(topology: Topology, window_sizes) -> list[tuple[int, ...]]:
        if window_sizes is None:
            return default_windows(topology)
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
