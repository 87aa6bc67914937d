"""U-KAN on nnU-Net's planned topology, 2D and 3D from one implementation.

Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", 2024
(seed 000): UNeXt's layout, convolutional stages at the high resolutions and tokenized
Kolmogorov-Arnold (KAN) stages at the two lowest, whose blocks shift the tokens, mix channels
with KANLinear and mix space with depthwise convolutions. The official code (CUHK-AIM-Group/U-KAN,
Seg_UKAN/archs.py) is 2D only, takes 3 input channels and has no deep supervision; here the plans
give the stages, any input channels work and every decoder stage has a head. `layout="official"`
builds the official network's modules on the plans' stages. docs/ukan.md lists every deviation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm, get_matching_pool_op
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd

from nnunet_ext.blocks import layers
from nnunet_ext.blocks.kan import KANConv, TokenizedKANBlock, TokenizedKANLayer, TokenMixer
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder, rename_state_dict
from nnunet_ext.topology import Topology

# "nnunet": the plans' convolutional stages, transposed convolutions up; "official": the official code's
# modules (convolutions then max pooling down, convolutions then linear interpolation up, BatchNorm).
Layout = Literal["nnunet", "official"]


def _fan_out_normal(conv: nn.Module) -> None:
    """The official code's initialisation of its patch embeddings and depthwise convolutions
    (archs.py `_init_weights`): normal with std sqrt(2 / fan_out), zero bias."""
    fan_out = math.prod(conv.kernel_size) * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    nn.init.zeros_(conv.bias)


class UKAN(SegmentationNetwork):
    """U-KAN.

    Encoder: the plans' convolutional stages, except the two lowest resolutions, which are
    tokenized KAN stages: a patch embedding (the plans' kernel and stride, then LayerNorm),
    `depth` tokenized KAN blocks and a LayerNorm. Decoder: per stage a transposed convolution and
    an additive skip (as the official code adds its skips), then `depth` tokenized KAN blocks and
    a LayerNorm at the two resolutions above the bottleneck (the official code's), the plans'
    convolutions elsewhere; a 1x1 head per stage.

    With `layout="official"` the stages are the official code's modules, on the plans' stages, widths,
    kernels and strides: encoder stage s (below the tokenized ones) is two convolutions with BatchNorm
    and ReLU at stage s - 1's resolution, then max pooling (no skip at full resolution); the way up to
    decoder stage s is two such convolutions at stage s + 1 (widths s + 1, then s), then linear
    interpolation, then the skip added; the tokenized blocks' depthwise convolutions have BatchNorm and
    ReLU; PyTorch's initialisation but the official one in patch embeddings and token mixers. On six
    stages of widths e0/8, e0/8, e0/4, e0, e1, e2 this is the official UKAN(embed_dims=[e0, e1, e2]), plus
    nnU-Net's deep-supervision heads.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`); at least 3 stages (4 for the official
            layout).
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        layout: "nnunet" (the plans' convolutional stages and transposed convolutions) or "official".
        token_mixer: "kan" (KANLinear) or "mlp" (nn.Linear) in the tokenized blocks: the paper's ablation.
        token_shift: shift the tokens along each spatial axis in turn before each channel mixer, as
            seed 000 describes (the official code does not shift: False).
        kan_conv: KAN convolutions instead of the convolutions of the convolutional stages (seed
            000's variant).
        depth: tokenized KAN blocks per tokenized stage (official: 1).
        drop_path_rate: stochastic depth, rising linearly over the encoder's tokenized blocks and
            mirrored in the decoder (official default: 0).
        grid_size, spline_order: the B-spline grid of every KAN layer (official: 5 and 3).
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 layout: Layout = "nnunet", token_mixer: TokenMixer = "kan", token_shift: bool = True,
                 kan_conv: bool = False, depth: int = 1, drop_path_rate: float = 0.0, grid_size: int = 5,
                 spline_order: int = 3):
        super().__init__(topology)
        n, official = topology.n_stages, layout == "official"
        if n < (4 if official else 3):
            raise ConfigurationError(
                f"U-KAN tokenizes the two lowest-resolution stages and keeps a convolutional stage above them"
                f"{' whose output it pools' if official else ''}, so {'its official layout' if official else 'it'} "
                f"needs plans with at least {4 if official else 3} stages; these have {n}.")
        if depth < 1:
            raise ConfigurationError(f"must be at least 1, got {depth}.", "depth")
        if official and kan_conv:
            raise ConfigurationError("KAN convolutions replace the plans' convolutional stages, which the official "
                                     "layout does not build: use kan_conv with layout='nnunet'.", "kan_conv")
        self.token_stages = [n - 2, n - 1]
        self.decoder_token_stages = [n - 3, n - 2]
        conv_op, features, kernels = topology.conv_op, topology.features_per_stage, topology.kernel_sizes
        kan = dict(grid_size=grid_size, spline_order=spline_order)
        # The official code spaces the rates over sum(depths) = 3 stages' blocks, of which the two tokenized
        # stages use the first two thirds.
        rates = torch.linspace(0, drop_path_rate, (3 if official else 2) * depth, device="cpu").tolist()
        # The official layout's norm and nonlinearity, everywhere but in the LayerNorms: BatchNorm and ReLU.
        batchnorm = get_matching_batchnorm(conv_op)
        block_norm = dict(norm_op=batchnorm, norm_op_kwargs={}, nonlin=nn.ReLU, nonlin_kwargs={"inplace": True}) \
            if official else topology.norm_and_nonlin

        def tokenized(s: int, rank: int) -> list[nn.Module]:
            """Stage s's blocks with the drop-path rates of the rank-th tokenized stage, then a norm."""
            return [*(TokenizedKANBlock(conv_op, features[s], rate, token_mixer=token_mixer, token_shift=token_shift,
                                        **block_norm, **kan)
                      for rate in rates[rank * depth:(rank + 1) * depth]),
                    LayerNormNd(features[s], eps=1e-5)]

        def official_convolutions(in_channels: int, out_channels: Sequence[int], level: int) -> nn.Sequential:
            """The official ConvLayer / D_ConvLayer: two convolutions (the plans' kernel at `level`, where they
            run; 3x3 in the official code), each followed by BatchNorm and ReLU."""
            modules = []
            for c_in, c_out in zip([in_channels, *out_channels[:-1]], out_channels):
                modules += [conv_op(c_in, c_out, kernels[level], padding=[k // 2 for k in kernels[level]]),
                            batchnorm(c_out), nn.ReLU(inplace=True)]
            return nn.Sequential(*modules)

        def kan_convolutions(count: int, in_channels: int, s: int, stride) -> nn.Sequential:
            modules = []
            for i in range(count):
                modules += [KANConv(conv_op, in_channels if i == 0 else features[s], features[s], kernels[s],
                                    stride if i == 0 else 1, [k // 2 for k in kernels[s]], **kan),
                            topology.norm(features[s]), topology.nonlinearity()]
            return nn.Sequential(*modules)

        def encoder_stage(s, plans_stage):
            if s in self.token_stages:
                embed = conv_op(features[s - 1], features[s], kernels[s], topology.strides[s],
                                [k // 2 for k in kernels[s]])
                return nn.Sequential(embed, LayerNormNd(features[s], eps=1e-5), *tokenized(s, s - (n - 2)))
            if official:
                # Convolutions at the level above, then max pooling: the official encoder keeps no skip at full
                # resolution. (Its ReLU after each pooling is left out: the pooled values are not negative.)
                if s == 0:
                    return nn.Identity()
                pool = get_matching_pool_op(conv_op, pool_type="max")(topology.strides[s], topology.strides[s])
                in_channels = input_channels if s == 1 else features[s - 1]
                return nn.Sequential(official_convolutions(in_channels, [features[s]] * 2, s - 1), pool)
            if kan_conv:
                in_channels = topology.stage_input_channels(s, input_channels)
                return kan_convolutions(topology.n_blocks_per_stage[s], in_channels, s, topology.strides[s])
            return plans_stage()

        def decoder_stage(s, plans_stage):
            if s in self.decoder_token_stages:
                return nn.Sequential(*tokenized(s, n - 2 - s))
            if official:
                return nn.Identity()
            return kan_convolutions(topology.n_conv_per_stage_decoder[n - 2 - s], features[s], s, 1) if kan_conv \
                else plans_stage()

        def official_upsample(s: int) -> nn.Module:
            """The official decoder's way up to stage s: convolutions at stage s + 1, then linear interpolation.
            (Its ReLU after the interpolation is left out: interpolated ReLU outputs are not negative.)"""
            up = nn.Upsample(scale_factor=topology.strides[s + 1], mode=layers.linear_mode(topology.dim))
            return nn.Sequential(official_convolutions(features[s + 1], [features[s + 1], features[s]], s + 1), up)

        # The official layout builds every stage itself: from the plain encoder, whose input is the image (a
        # ResEnc encoder would put its stem in front).
        plain = dataclasses.replace(topology, residual_encoder=False) if official else topology
        self.encoder = plain.build_encoder(input_channels, encoder_stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, decoder_stage, merge="add",
                                   upsample=official_upsample if official else None, full_resolution_skip=not official)
        if official:  # PyTorch's initialisation, but the official code's in its patch embeddings and token mixers
            for s in self.token_stages:
                _fan_out_normal(self.encoder.stages[s][0])
            for layer in self.modules():
                if isinstance(layer, TokenizedKANLayer):
                    for dwconv in layer.dwconv:
                        _fan_out_normal(dwconv[0])
        else:
            self.initialize()  # nnU-Net's for the convolutions; KAN layers and token mixers keep their own


# The official UKAN's state dict names (archs.py; one block per tokenized stage) -> the `official` preset's on
# six stages: ConvLayer encoder<s> is encoder stage s, D_ConvLayer decoder<i> the way up of decoder stage i - 1.
OFFICIAL_NAMES = [
    (r"^encoder(\d)\.conv\.", r"encoder.stages.\1.0."),
    (r"^decoder(\d)\.conv\.", lambda m: f"decoder.transpconvs.{int(m[1]) - 1}.0."),
    (r"^patch_embed(\d)\.proj\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.0."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.1."),
    (r"^block(\d)\.0\.", lambda m: f"encoder.stages.{int(m[1]) + 3}.2."),
    (r"^norm(\d)\.", lambda m: f"encoder.stages.{int(m[1]) + 1}.3."),
    (r"^dblock(\d)\.0\.", lambda m: f"decoder.stages.{int(m[1]) - 1}.0."),
    (r"^dnorm(\d)\.", lambda m: f"decoder.stages.{int(m[1]) - 3}.1."),
    (r"^final\.", "decoder.seg_layers.4."),
    (r"\.norm2\.", ".norm."),
    (r"\.layer\.fc(\d)\.", lambda m: f".layer.fc.{int(m[1]) - 1}."),
    (r"\.layer\.dwconv_(\d)\.dwconv\.", lambda m: f".layer.dwconv.{int(m[1]) - 1}.0."),
    (r"\.layer\.dwconv_(\d)\.bn\.", lambda m: f".layer.dwconv.{int(m[1]) - 1}.1."),
]


def from_official(state: Mapping[str, torch.Tensor],
                  ours: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A state dict of the official UKAN (`torch.save(model.state_dict())` in its train.py) as the `official`
    preset's on six stages. The official network has no deep-supervision heads; the importer adds them
    at zero (`networks.base.with_zero_heads`). Every tensor keeps its shape: `ours` is not needed."""
    return rename_state_dict(state, OFFICIAL_NAMES)
