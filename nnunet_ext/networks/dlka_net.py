"""D-LKA Net on nnU-Net's planned topology, 2D and 3D from one implementation.

Azad et al., "Beyond Self-Attention: Deformable Large Kernel Attention for Medical Image
Segmentation", WACV 2024 (seed 001). 3D: convolutional stages at the highest resolutions, D-LKA
stages (a strided patch-merging convolution, then D-LKA blocks) from 1/4 resolution down, a
symmetric decoder with transposed convolutions and additive skips. 2D: the paper's encoder is an
ImageNet-pretrained MaxViT, which cannot be loaded here; we keep the plans' convolutional encoder
and put 2D D-LKA blocks in the decoder, as the paper's 2D decoder does. `layout="official"` builds
the official 3D network's modules (xmindflow/deformableLKA, 3D/d_lka_former) on 3D plans' stages, and
the official 2D decoder's D-LKA block on 2D plans.
docs/dlka_net.md lists every deviation.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Mapping

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import (get_matching_batchnorm, get_matching_convtransp,
                                                                  get_matching_instancenorm)
from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from nnunet_ext.blocks.deformable_lka import Deformable, DLKABlock, DLKAMLPBlock
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder, rename_state_dict
from nnunet_ext.topology import Topology

# "nnunet": the plans' convolutional stages above the D-LKA stages, the plans' norms; "official": in 3D the
# official network's modules (a residual block beside the encoder at full resolution, patch embedding from the
# input), in 2D the official 2D decoder's block (its MaxViT encoder cannot be loaded here).
Layout = Literal["nnunet", "official"]

# Per layout and dimension, the value of every option left at None: the paper's text for "nnunet", the
# official code's for "official".
LAYOUTS = {
    ("nnunet", 3): dict(encoder_blocks=3, bottleneck_blocks=2, decoder_blocks=3, deformable="extra",
                        position_embedding=False, layer_scale=1e-6),
    ("nnunet", 2): dict(encoder_blocks=0, bottleneck_blocks=0, decoder_blocks=2, deformable="depthwise",
                        position_embedding=False, layer_scale=1e-6),
    ("official", 3): dict(encoder_blocks=3, bottleneck_blocks=3, decoder_blocks=3, deformable="extra",
                          position_embedding=True, layer_scale=1e-6),
    ("official", 2): dict(encoder_blocks=0, bottleneck_blocks=0, decoder_blocks=2, deformable="depthwise",
                          position_embedding=False, layer_scale=1e-2),
}

SYNAPSE_PATCH_SIZE = (64, 128, 128)


class DLKANet(SegmentationNetwork):
    """D-LKA Net.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`).
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        encoder_blocks, bottleneck_blocks, decoder_blocks: D-LKA blocks per encoder stage, in the
            bottleneck and per decoder stage at D-LKA resolutions; 0 keeps the plans' convolutional
            stage (encoder) or one residual block (decoder). None: the layout's (`LAYOUTS`): the paper's
            3/2/3 in 3D, 0/0/2 in 2D; the official 3D network's 3/3/3.
        dlka_from_stride: stages downsampled by at least this much along some axis are D-LKA
            stages (the paper: 1/4 and below); stage 0 is always convolutional.
        deformable: "extra" (3D paper: LKA plus one deformable 3^3 convolution), "depthwise" (2D
            paper: both depthwise convolutions deformable) or "none" (plain LKA); None: the paper's.
        position_embedding: the official code's learned positional embedding in every block; None: the
            layout's (on in the official 3D layout only).
        layer_scale: initial value of the blocks' layer scales; None: the layout's (1e-6; 1e-2 in the
            official 2D block).
        layout: "nnunet" or "official". On 2D plans the official layout is the default network with the
            official 2D decoder's block (`DLKAMLPBlock`). On 3D plans it puts D-LKA stages at every stage but
            the first (`dlka_from_stride` is not used), whose patch embedding reads the input; stage 0 is a residual
            block on the input (instance norm without affine parameters), the skip of the last decoder
            stage, which is such a block too. Its D-LKA stages merge patches with a bias-free convolution
            (kernel = stride) and a GroupNorm, its blocks have BatchNorm, LeakyReLU(0.01), bias-free
            convolutions and channel dropout 0.1, its transposed convolutions no bias; every layer starts
            from PyTorch's initialisation. On `synapse()`'s stages this is the official D_LKA_Former with its
            D-LKA block, plus one more deep-supervision head than its three.
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 encoder_blocks: int | None = None, bottleneck_blocks: int | None = None,
                 decoder_blocks: int | None = None, dlka_from_stride: int = 4, deformable: Deformable | None = None,
                 position_embedding: bool | None = None, layer_scale: float | None = None,
                 layout: Layout = "nnunet"):
        super().__init__(topology)
        official_3d = layout == "official" and topology.dim == 3
        mlp_block = layout == "official" and topology.dim == 2  # the official 2D decoder's block
        given = dict(encoder_blocks=encoder_blocks, bottleneck_blocks=bottleneck_blocks, decoder_blocks=decoder_blocks,
                     deformable=deformable, position_embedding=position_embedding, layer_scale=layer_scale)
        chosen = {k: LAYOUTS[layout, topology.dim][k] if v is None else v for k, v in given.items()}
        for option in ("encoder_blocks", "bottleneck_blocks", "decoder_blocks"):
            if chosen[option] < 0:
                raise ConfigurationError(f"block counts must be >= 0, got {chosen[option]}.", option)
        encoder_blocks, bottleneck_blocks, decoder_blocks, deformable, position_embedding, layer_scale = \
            chosen.values()
        strides = topology.cumulative_strides()
        self.dlka_stages = list(range(1, topology.n_stages)) if official_3d else \
            [s for s in range(1, topology.n_stages) if max(strides[s]) >= dlka_from_stride]
        if not self.dlka_stages:
            raise ConfigurationError(f"D-LKA Net puts D-LKA blocks at stages downsampled by {dlka_from_stride} or "
                                     f"more, but these plans downsample by at most {list(strides[-1])}. Lower "
                                     "`dlka_from_stride` or plan a larger patch.")
        sizes = topology.feature_map_sizes()
        conv_op, features, n = topology.conv_op, topology.features_per_stage, topology.n_stages
        leaky = dict(nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})
        block_options = dict(norm_op=get_matching_batchnorm(conv_op), norm_op_kwargs={}, **leaky, conv_bias=False,
                             dropout=0.1) if official_3d else topology.norm_and_nonlin

        def dlka_blocks(s: int, count: int) -> nn.Sequential:
            if mlp_block:
                return nn.Sequential(*(DLKAMLPBlock(conv_op, features[s], deformable, layer_scale=layer_scale)
                                       for _ in range(count)))
            return nn.Sequential(*(DLKABlock(conv_op, features[s], deformable, layer_scale=layer_scale,
                                             position_embedding=sizes[s] if position_embedding else None,
                                             **block_options)
                                   for _ in range(count)))

        def encoder_blocks_at(s: int) -> int:
            return bottleneck_blocks if s == n - 1 else encoder_blocks

        def encoder_stage(s, plans_stage):
            if s not in self.dlka_stages or not encoder_blocks_at(s):
                return plans_stage()
            # The paper's patch merging: a convolution with kernel = stride, then a norm.
            merge = conv_op(features[s - 1], features[s], topology.strides[s], topology.strides[s])
            return nn.Sequential(merge, topology.norm(features[s]), dlka_blocks(s, encoder_blocks_at(s)))

        def decoder_stage(s, plans_stage):
            if s in self.dlka_stages and (decoder_blocks or official_3d):
                return dlka_blocks(s, decoder_blocks)
            if official_3d:
                return official_residual_block(features[0])
            return BasicBlockD(conv_op, features[s], features[s], topology.kernel_sizes[s], 1, topology.conv_bias,
                               **topology.norm_and_nonlin)

        def official_residual_block(in_channels: int) -> BasicBlockD:
            """The official UnetResBlock: bias-free convolutions, instance norm without affine parameters."""
            return BasicBlockD(conv_op, in_channels, features[0], topology.kernel_sizes[0], 1, False,
                               get_matching_instancenorm(conv_op), {"eps": 1e-5, "affine": False}, **leaky)

        def official_encoder_stage(s: int) -> nn.Module:
            """Stage 0: the residual block on the input. Then the official patch merging: a bias-free convolution
            (kernel = stride) from the input (stage 1) or the stage above, and a GroupNorm of the previous
            stage's width in groups (the greatest common divisor where the widths do not divide; 1 after the
            input, as the official encoder's `in_channels` is left at 1)."""
            if s == 0:
                return official_residual_block(input_channels)
            in_channels = input_channels if s == 1 else features[s - 1]
            groups = 1 if s == 1 else math.gcd(features[s - 1], features[s])
            merge = conv_op(in_channels, features[s], topology.strides[s], topology.strides[s], bias=False)
            return nn.Sequential(merge, nn.GroupNorm(groups, features[s]), dlka_blocks(s, encoder_blocks_at(s)))

        def official_upsample(s: int) -> nn.Module:
            return get_matching_convtransp(conv_op)(features[s + 1], features[s], topology.strides[s + 1],
                                                    topology.strides[s + 1], bias=False)

        if official_3d:
            self.encoder = InputBranchEncoder(nn.ModuleList(official_encoder_stage(s) for s in range(n)))
        else:
            self.encoder = topology.build_encoder(input_channels, encoder_stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, decoder_stage, merge="add",
                                   upsample=official_upsample if official_3d else None)
        if not official_3d:  # the official 3D code keeps PyTorch's initialisation everywhere
            # nnU-Net's for the convolutional stages; D-LKA blocks keep the official one (their reset_parameters).
            self.initialize(own_initialization=(DLKABlock, DLKAMLPBlock))

    @classmethod
    def synapse(cls, input_channels: int = 1, num_classes: int = 14, deep_supervision: bool = True,
                **options) -> "DLKANet":
        """The paper's 3D Synapse network: input 64x128x128, a full-resolution stage of two 16-channel
        convolutions, patch merging by (2, 4, 4) to 32 channels, then D-LKA stages of 32, 64, 128
        and 256 channels at 1/4, 1/8, 1/16 and 1/32 in-plane. `options` as for the constructor (the
        official network: `layout="official"`)."""
        topology = Topology(
            conv_op=nn.Conv3d, features_per_stage=(16, 32, 64, 128, 256), kernel_sizes=((3, 3, 3),) * 5,
            strides=((1, 1, 1), (2, 4, 4), (2, 2, 2), (2, 2, 2), (2, 2, 2)), n_blocks_per_stage=(2,) * 5,
            n_conv_per_stage_decoder=(2,) * 4, patch_size=SYNAPSE_PATCH_SIZE,
            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
        return cls(topology, input_channels, num_classes, deep_supervision, **options)


class InputBranchEncoder(nn.Module):
    """The official encoder's data flow: stage 0 (the full-resolution residual block) and stage 1 (the patch
    embedding) both read the input; each further stage reads the one before. Returns one skip per stage."""

    def __init__(self, stages: nn.ModuleList):
        super().__init__()
        self.stages = stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stages[0](x)]
        for stage in self.stages[1:]:
            x = stage(x)
            skips.append(x)
        return skips


# The official D_LKA_Former's state dict names (3D/d_lka_former, five levels) -> the `official` preset's on five
# stages; and the official 2D decoder block's (deformableLKABlock) -> DLKAMLPBlock's. MONAI's convolutions keep
# their weight in `<name>.conv`; decoder<k> leads up to level k - 2.
OFFICIAL_NAMES = [
    (r"^d_lka_former_encoder\.downsample_layers\.(\d)\.0\.conv\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.0."),
    (r"^d_lka_former_encoder\.downsample_layers\.(\d)\.1\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.1."),
    (r"^d_lka_former_encoder\.stages\.(\d)\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.2."),
    (r"^encoder1\.", "encoder.stages.0."),
    (r"^decoder(\d)\.transp_conv\.conv\.", lambda m: f"decoder.transpconvs.{5 - int(m[1])}."),
    (r"^decoder(\d)\.decoder_block\.0\.", lambda m: f"decoder.stages.{5 - int(m[1])}."),
    (r"^out(\d)\.conv\.conv\.", lambda m: f"decoder.seg_layers.{4 - int(m[1])}."),
    # in the D-LKA blocks
    (r"\.pos_embed$", ".position_embedding"),
    (r"\.epa_block\.", ".attention."),
    (r"\.conv51\.", ".conv_block."),
    (r"\.conv8\.1\.", ".conv_out."),
    # in the 2D decoder block (DLKAMLPBlock): torchvision's deformable convolutions behind their offset convolutions
    (r"\.(conv0|conv_spatial)\.offset_net\.", r".\1.conv_offset."),
    (r"\.(conv0|conv_spatial)\.deform_conv\.", r".\1."),
    (r"(^|\.)mlp\.fc1\.", r"\1mlp.0."),
    (r"(^|\.)mlp\.dwconv\.dwconv\.", r"\1mlp.1."),
    (r"(^|\.)mlp\.fc2\.", r"\1mlp.3."),
    # in the UnetResBlocks (BasicBlockD's names)
    (r"\.norm([12])\.", r".conv\1.norm."),
    (r"\.conv([12])\.conv\.", r".conv\1.conv."),
    (r"\.conv3\.conv\.", ".skip.0.conv."),
]
# BasicBlockD keeps each convolution and norm twice: also under `all_modules` (convolution 0, norm 1).
_ALIASES = (r"\.(conv[12]|skip\.0)\.conv\.", r".\1.all_modules.0."), (r"\.(conv[12])\.norm\.", r".\1.all_modules.1.")


def from_official(state: Mapping[str, torch.Tensor],
                  ours: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A state dict of the official D_LKA_Former (its trainer's checkpoint's `state_dict`) as the `official`
    preset's on five stages. The official positional embeddings are token sequences (1, N, C); given our
    network's state dict `ours`, each becomes the feature map (1, C, *size) of N = prod(size) positions.
    The fourth deep-supervision head, which the official network lacks, the importer adds at zero
    (`networks.base.with_zero_heads`)."""
    renamed = rename_state_dict(state, OFFICIAL_NAMES)
    for pattern, replacement in _ALIASES:
        renamed |= {re.sub(pattern, replacement, k): v for k, v in renamed.items() if re.search(pattern, k)}
    for name, tensor in renamed.items():
        target = (ours or {}).get(name)
        if name.endswith(".position_embedding") and target is not None and tensor.dim() == 3 \
                and tensor.numel() == target.numel():
            renamed[name] = tensor.transpose(1, 2).reshape(target.shape)
    return renamed
