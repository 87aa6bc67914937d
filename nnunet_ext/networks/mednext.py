"""MedNeXt (sizes S, B, M, L; kernel 3 or 5) on nnU-Net's planned topology, 2D and 3D from one implementation.

Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image Segmentation", MICCAI 2023
(arXiv 2303.09975): a U-Net of ConvNeXt blocks (depthwise convolution, GroupNorm, 1x1 expansion, GELU, 1x1
compression, residual) that also resamples with them, and whose skips are added, not concatenated.
docs/mednext.md lists every difference from the paper and from the official code (MIC-DKFZ/MedNeXt at 0b78ed86).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp

from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder, rename_state_dict
from nnunet_ext.ops.channels_last import depthwise_conv, group_norm, pointwise_mlp, to_channels_last
from nnunet_ext.topology import Topology

Layout = Literal["plans", "official"]

# The official sizes (create_mednext_v1.py), as (first stage, second stage, every deeper stage): expansion ratios
# and blocks per stage. The official lists of nine (four encoder stages, the bottleneck, four decoder stages) are
# these values by depth, the decoder mirroring the encoder; on other numbers of stages each stage takes its
# depth's value the same way.
SIZES = {"S": {"expansion": (2, 2, 2), "blocks": (2, 2, 2)},
         "B": {"expansion": (2, 3, 4), "blocks": (2, 2, 2)},
         "M": {"expansion": (2, 3, 4), "blocks": (3, 4, 4)},
         "L": {"expansion": (3, 4, 8), "blocks": (3, 4, 8)}}


def by_depth(values: tuple[int, int, int], s: int) -> int:
    return values[min(s, 2)]


class MedNeXtBlock(nn.Module):
    """The MedNeXt block: a depthwise convolution (with `stride`: down; `transposed`: up), GroupNorm with one
    group per channel, a 1x1 convolution to `expansion` times the channels, GELU, a 1x1 convolution to
    `output_channels`; plus the input, through a 1x1 convolution of the same stride where the block resamples
    or changes the width.

    A transposed convolution of stride s, padding k // 2, gives s * n - (s - 1) positions from n; like the
    official code, the up block pads the missing s - 1 at the start of each axis, its residual too.

    With `checkpointing` set, training keeps only the block's input for the backward pass and computes the
    rest again there (the official M and L networks' "outside_block" gradient checkpointing): the expanded
    maps are the largest the network forms."""

    def __init__(self, conv_op: type[nn.Module], input_channels: int, output_channels: int, expansion: int,
                 kernel_size, stride=1, transposed: bool = False):
        super().__init__()
        dim = len(kernel_size)
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * dim
        resample = get_matching_convtransp(conv_op) if transposed else conv_op
        self.conv1 = resample(input_channels, input_channels, kernel_size, stride=stride,
                              padding=[k // 2 for k in kernel_size], groups=input_channels)
        self.norm = nn.GroupNorm(input_channels, input_channels)
        self.conv2 = conv_op(input_channels, expansion * input_channels, 1)
        self.act = nn.GELU()
        self.conv3 = conv_op(expansion * input_channels, output_channels, 1)
        changes_shape = any(s != 1 for s in stride) or input_channels != output_channels
        self.res_conv = resample(input_channels, output_channels, 1, stride=stride) if changes_shape else None
        # F.pad's order: last axis first, (before, after) each
        self.pad = [p for s in reversed(stride) for p in (s - 1, 0)] if transposed and any(s != 1 for s in stride) \
            else None
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.compute, x, use_reentrant=False)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        # On the CPU the maps stay channels-last from here on (nnunet_ext.ops.channels_last; depthwise_conv makes 3D
        # maps so, and 2D ones are made so here): there oneDNN's 1x1 convolutions and products of the channels at
        # every position are fast. In training the expanded maps are formed a few rows at a time and not kept,
        # unless the whole block is recomputed anyway.
        if x.dim() == 4 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            x = to_channels_last(x)
        x_norm = group_norm(self.norm, depthwise_conv(self.conv1, x))
        y = (self.conv3(self.act(self.conv2(x_norm))) if self.checkpointing
             else pointwise_mlp(self.conv2, self.act, self.conv3, x_norm))
        residual = self.residual(x)
        if self.pad is not None:
            y, residual = F.pad(y, self.pad), F.pad(residual, self.pad)
        return y + residual

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's input, through `res_conv` where the block resamples or changes the width. On the CPU a
        strided 1x1 convolution runs as the 1x1 convolution of every stride-th position, the same sums: oneDNN's
        weight gradient of the strided one on channels-last maps of fewer channels than its vector holds writes
        past its buffer (oneDNN issue 6035; in torch 2.14 a heap corruption at 4 to 12 channels in 2D)."""
        conv = self.res_conv
        if conv is None:
            return x
        if x.device.type == "cpu" and not conv.transposed and any(s != 1 for s in conv.stride):
            every = (..., *(slice(None, None, s) for s in conv.stride))
            return (F.conv2d if x.dim() == 4 else F.conv3d)(x[every], conv.weight, conv.bias)
        return conv(x)


def blocks_of(conv_op: type[nn.Module], width: int, expansion: int, kernel_size, count: int) -> nn.Sequential:
    """A stage's `count` MedNeXt blocks at `width`."""
    return nn.Sequential(*(MedNeXtBlock(conv_op, width, width, expansion, kernel_size) for _ in range(count)))


class MedNeXtEncoder(nn.Module):
    """A 1x1 stem into the first width, then per stage: a down block into the stage's width with its stride
    (none at the first), then its blocks. Returns one skip per stage."""

    def __init__(self, conv_op, input_channels: int, widths: list[int], kernels: list, strides: list,
                 expansion: list[int], blocks: list[int]):
        super().__init__()
        self.stem = conv_op(input_channels, widths[0], kernel_size=strides[0], stride=strides[0])
        self.down = nn.ModuleList(MedNeXtBlock(conv_op, widths[s - 1], widths[s], expansion[s], kernels[s], strides[s])
                                  for s in range(1, len(widths)))
        self.stages = nn.ModuleList(blocks_of(conv_op, widths[s], expansion[s], kernels[s], blocks[s])
                                    for s in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stages[0](self.stem(x))]
        for down, stage in zip(self.down, self.stages[1:]):
            skips.append(stage(down(skips[-1])))
        return skips


class MedNeXt(SegmentationNetwork):
    """MedNeXt; `MedNeXtS`, `MedNeXtB`, `MedNeXtM` and `MedNeXtL` set its size.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`): stages, strides, kernel sizes, widths.
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        kernel_size: of every depthwise convolution, 3 or 5 (the paper's k3 and k5 networks; UpKern starts a
            kernel-5 network from a trained kernel-3 one: `nnunet-ext upkern`).
        layout: "plans" (the paper on the plans' topology): the plans' widths, and a kernel of 1 along the axes
            the plans convolve with 1 (anisotropic stages). "official": the official network
            (MIC-DKFZ/MedNeXt at 0b78ed86): the plans' first width doubling at every stage without nnU-Net's
            cap, the kernel along every axis, 1x1 transposed convolutions as heads, a head on the bottleneck too.
        checkpointing: gradient checkpointing of every block (`MedNeXtBlock`): the same numbers in less memory,
            each block's inside computed twice. None: as the official trainers, on for M and L only.
    Both layouts take the plans' stages and strides, GroupNorm and GELU whatever the plans' norm and
    nonlinearity, and PyTorch's initialisation, as the official code does. The size ("S", "B", "M" or "L": the
    official expansion ratios and blocks per stage, `SIZES`) is the class's: `MedNeXtS`, `MedNeXtB`, `MedNeXtM`,
    `MedNeXtL`.

    With deep supervision the official network's outputs end with the bottleneck's, which its v1 trainer
    supervises too: `output_strides` has one stride more, and the trainer (`MedNeXtRecipe`) makes a target and a
    loss weight for it.
    """

    size: Literal["S", "B", "M", "L"]
    checkpoints: bool  # the size's `checkpointing` where the option is None

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 kernel_size: int = 3, layout: Layout = "plans", checkpointing: bool | None = None):
        super().__init__(topology)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MedNeXt's kernel_size must be odd (the paper's are 3 and 5), got {kernel_size}.")
        n, official, table = topology.n_stages, layout == "official", SIZES[self.size]
        if official:
            widths = [topology.features_per_stage[0] * 2 ** s for s in range(n)]
            kernels = [(kernel_size,) * topology.dim] * n
        else:
            widths = list(topology.features_per_stage)
            kernels = [tuple(kernel_size if k > 1 else 1 for k in stage) for stage in topology.kernel_sizes]
        expansion = [by_depth(table["expansion"], s) for s in range(n)]
        blocks = [by_depth(table["blocks"], s) for s in range(n)]
        conv, strides = topology.conv_op, topology.strides
        self.encoder = MedNeXtEncoder(conv, input_channels, widths, kernels, strides, expansion, blocks)

        def decoder_stage(s, plans_stage):
            return blocks_of(conv, widths[s], expansion[s], kernels[s], blocks[s])

        def upsample(s):  # up from stage s + 1 with its kernel, as wide as stage s; the expansion of stage s
            return MedNeXtBlock(conv, widths[s + 1], widths[s], expansion[s], kernels[s + 1], strides[s + 1],
                                transposed=True)

        ours = dataclasses.replace(topology, features_per_stage=tuple(widths))
        self.decoder = UNetDecoder(ours, num_classes, deep_supervision, decoder_stage, merge="add", upsample=upsample)
        self.bottleneck_head = None
        if official:  # the official heads are 1x1 transposed convolutions (weights (in, out, 1, ..), their init)
            head = get_matching_convtransp(conv)
            self.decoder.seg_layers = nn.ModuleList(head(widths[s], num_classes, 1) for s in range(n - 2, -1, -1))
            self.bottleneck_head = head(widths[-1], num_classes, 1)
            self.output_strides = topology.cumulative_strides()

        for block in self.modules():
            if isinstance(block, MedNeXtBlock):
                block.checkpointing = self.checkpoints if checkpointing is None else checkpointing

    def forward_features(self, x: torch.Tensor):
        skips = self.encoder(x)
        out = self.decoder(skips)
        if self.bottleneck_head is None or not self.decoder.deep_supervision:
            return out
        return [*out, self.bottleneck_head(skips[-1])]


def _sized(size: str, description: str, checkpoints: bool) -> type[MedNeXt]:
    return type(f"MedNeXt{size}", (MedNeXt,), {"__module__": __name__, "__qualname__": f"MedNeXt{size}", "size": size,
                                              "checkpoints": checkpoints,
                                              "__doc__": f"MedNeXt-{size}: {description}.\n\n{MedNeXt.__doc__}"})


MedNeXtS = _sized("S", "expansion 2, two blocks per stage", checkpoints=False)
MedNeXtB = _sized("B", "expansion 2, 3, then 4; two blocks per stage", checkpoints=False)
MedNeXtM = _sized("M", "expansion 2, 3, then 4; 3, 4, then 4 blocks per stage; gradient checkpointing",
                  checkpoints=True)
MedNeXtL = _sized("L", "expansion 3, 4, then 8; 3, 4, then 8 blocks per stage; gradient checkpointing",
                  checkpoints=True)


def from_official(state, ours=None) -> dict[str, torch.Tensor]:
    """The official network's state dict (MedNeXt of any size, 2D or 3D, 5 stages) as the `official` preset's.
    Dropped: `dummy_tensor`, a parameter the official code feeds its gradient checkpointing, unused otherwise."""
    state = {k: v for k, v in state.items() if k != "dummy_tensor"}
    last = 4  # the official network's stages 0-3 and its bottleneck; its stage s is our decoder's entry 3 - s
    return rename_state_dict(state, [
        (r"^stem\.", "encoder.stem."),
        (r"^enc_block_(\d)\.", r"encoder.stages.\1."),
        (r"^bottleneck\.", f"encoder.stages.{last}."),
        (r"^down_(\d)\.", r"encoder.down.\1."),
        (r"^up_(\d)\.", lambda m: f"decoder.transpconvs.{last - 1 - int(m.group(1))}."),
        (r"^dec_block_(\d)\.", lambda m: f"decoder.stages.{last - 1 - int(m.group(1))}."),
        (rf"^out_{last}\.conv_out\.", "bottleneck_head."),
        (r"^out_(\d)\.conv_out\.", lambda m: f"decoder.seg_layers.{last - 1 - int(m.group(1))}."),
    ])
