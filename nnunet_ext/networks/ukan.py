"""U-KAN on nnU-Net's planned topology, 2D and 3D from one implementation.

Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", 2024
(seed 000): UNeXt's layout, convolutional stages at the high resolutions and tokenized
Kolmogorov-Arnold (KAN) stages at the two lowest, whose blocks shift the tokens, mix channels
with KANLinear and mix space with depthwise convolutions. The official code is 2D only, takes 3
input channels and has no deep supervision; here the plans give the stages, any input channels
work and every decoder stage has a head. docs/ukan.md lists every deviation.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd

from nnunet_ext.blocks.kan import KANConv, TokenizedKANBlock, TokenMixer
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder
from nnunet_ext.topology import Topology


class UKAN(SegmentationNetwork):
    """U-KAN.

    Encoder: the plans' convolutional stages, except the two lowest resolutions, which are
    tokenized KAN stages: a patch embedding (the plans' kernel and stride, then LayerNorm),
    `depth` tokenized KAN blocks and a LayerNorm. Decoder: per stage a transposed convolution and
    an additive skip (as the official code adds its skips), then `depth` tokenized KAN blocks and
    a LayerNorm at the two resolutions above the bottleneck (the official code's), the plans'
    convolutions elsewhere; a 1x1 head per stage.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`); at least 3 stages.
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
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
                 token_mixer: TokenMixer = "kan", token_shift: bool = True, kan_conv: bool = False, depth: int = 1,
                 drop_path_rate: float = 0.0, grid_size: int = 5, spline_order: int = 3):
        super().__init__(topology)
        n = topology.n_stages
        if n < 3:
            raise ConfigurationError(f"U-KAN tokenizes the two lowest-resolution stages and keeps a convolutional "
                                     f"stage above them, so it needs plans with at least 3 stages; these have {n}.")
        if depth < 1:
            raise ConfigurationError(f"must be at least 1, got {depth}.", "depth")
        self.token_stages = [n - 2, n - 1]
        self.decoder_token_stages = [n - 3, n - 2]
        conv_op, features, kernels = topology.conv_op, topology.features_per_stage, topology.kernel_sizes
        kan = dict(grid_size=grid_size, spline_order=spline_order)
        rates = torch.linspace(0, drop_path_rate, 2 * depth, device="cpu").tolist()  # numbers, also on meta

        def tokenized(s: int, rank: int) -> list[nn.Module]:
            """Stage s's blocks with the drop-path rates of the rank-th tokenized stage, then a norm."""
            return [*(TokenizedKANBlock(conv_op, features[s], rate, token_mixer=token_mixer, token_shift=token_shift,
                                        **topology.norm_and_nonlin, **kan)
                      for rate in rates[rank * depth:(rank + 1) * depth]),
                    LayerNormNd(features[s], eps=1e-5)]

        def kan_convolutions(count: int, in_channels: int, s: int, stride) -> nn.Sequential:
            layers = []
            for i in range(count):
                layers += [KANConv(conv_op, in_channels if i == 0 else features[s], features[s], kernels[s],
                                   stride if i == 0 else 1, [k // 2 for k in kernels[s]], **kan),
                           topology.norm(features[s]), topology.nonlinearity()]
            return nn.Sequential(*layers)

        def encoder_stage(s, plans_stage):
            if s in self.token_stages:
                embed = conv_op(features[s - 1], features[s], kernels[s], topology.strides[s],
                                [k // 2 for k in kernels[s]])
                return nn.Sequential(embed, LayerNormNd(features[s], eps=1e-5), *tokenized(s, s - (n - 2)))
            if kan_conv:
                in_channels = topology.stage_input_channels(s, input_channels)
                return kan_convolutions(topology.n_blocks_per_stage[s], in_channels, s, topology.strides[s])
            return plans_stage()

        def decoder_stage(s, plans_stage):
            if s in self.decoder_token_stages:
                return nn.Sequential(*tokenized(s, n - 2 - s))
            return kan_convolutions(topology.n_conv_per_stage_decoder[n - 2 - s], features[s], s, 1) if kan_conv \
                else plans_stage()

        self.encoder = topology.build_encoder(input_channels, encoder_stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, decoder_stage, merge="add")
        self.initialize()  # nnU-Net's for the convolutions; KAN layers and token mixers keep their own
