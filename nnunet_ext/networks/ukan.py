"""U-KAN on nnU-Net's planned topology, 2D and 3D from one implementation.

Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", 2024
(seed 000): UNeXt's layout, convolutional stages at the high resolutions and tokenized
Kolmogorov-Arnold (KAN) stages at the two lowest, whose blocks shift the tokens, mix channels
with KANLinear and mix space with depthwise convolutions. The official code is 2D only, takes 3
input channels and has no deep supervision; here the plans give the stages, any input channels
work and every decoder stage has a head. docs/ukan.md lists every deviation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from nnunet_ext.blocks.kan import KANConv, TokenizedKANBlock
from nnunet_ext.networks.base import AdditiveSkipDecoder, SegmentationNetwork
from nnunet_ext.topology import PlansError, Topology


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
                 token_mixer: str = "kan", token_shift: bool = True, kan_conv: bool = False, depth: int = 1,
                 drop_path_rate: float = 0.0, grid_size: int = 5, spline_order: int = 3):
        super().__init__(topology)
        n = topology.n_stages
        if n < 3:
            raise PlansError(f"U-KAN tokenizes the two lowest-resolution stages and keeps a convolutional stage "
                             f"above them, so it needs plans with at least 3 stages; these have {n}.")
        if depth < 1:
            raise PlansError(f"depth must be at least 1, got {depth}.")
        self.token_stages = [n - 2, n - 1]
        self.decoder_token_stages = [n - 3, n - 2]
        conv_op, features, kernels = topology.conv_op, topology.features_per_stage, topology.kernel_sizes
        norm = dict(norm_op=topology.norm_op, norm_op_kwargs=topology.norm_op_kwargs)
        act = dict(nonlin=topology.nonlin, nonlin_kwargs=topology.nonlin_kwargs)
        kan = dict(grid_size=grid_size, spline_order=spline_order)
        rates = torch.linspace(0, drop_path_rate, 2 * depth).tolist()

        def tokenized(s: int, rank: int) -> list[nn.Module]:
            """Stage s's blocks with the drop-path rates of the rank-th tokenized stage, then a norm."""
            return [*(TokenizedKANBlock(conv_op, features[s], rate, token_mixer=token_mixer, token_shift=token_shift,
                                        **norm, **act, **kan) for rate in rates[rank * depth:(rank + 1) * depth]),
                    LayerNormNd(features[s], eps=1e-5)]

        def convolutions(count: int, in_channels: int, s: int, stride) -> nn.Module:
            if not kan_conv:
                return StackedConvBlocks(count, conv_op, in_channels, features[s], kernels[s], stride,
                                         topology.conv_bias, **norm, **act)
            layers = []
            for i in range(count):
                layers += [KANConv(conv_op, in_channels if i == 0 else features[s], features[s], kernels[s],
                                   stride if i == 0 else 1, [k // 2 for k in kernels[s]], **kan),
                           topology.norm(features[s]), topology.nonlinearity()]
            return nn.Sequential(*layers)

        self.encoder = topology.build_encoder(input_channels)
        if kan_conv:
            stem = getattr(self.encoder, "stem", None)  # ResEnc plans: a convolution to features[0] first
            for s in range(n - 2):
                in_channels = features[s - 1] if s else (features[0] if stem is not None else input_channels)
                self.encoder.stages[s] = convolutions(topology.n_blocks_per_stage[s], in_channels, s,
                                                      topology.strides[s])
        for rank, s in enumerate(self.token_stages):
            embed = conv_op(features[s - 1], features[s], kernels[s], topology.strides[s],
                            [k // 2 for k in kernels[s]])
            self.encoder.stages[s] = nn.Sequential(embed, LayerNormNd(features[s], eps=1e-5), *tokenized(s, rank))
        decoder_stages = [
            nn.Sequential(*tokenized(s, n - 2 - s)) if s in self.decoder_token_stages else
            convolutions(topology.n_conv_per_stage_decoder[n - 2 - s], features[s], s, 1)
            for s in range(n - 1)]
        self.decoder = AdditiveSkipDecoder(topology, num_classes, deep_supervision, decoder_stages)
        self.initialize()
        sizes = topology.feature_map_sizes()  # the B-spline bases of the tokenized stages' KAN layers
        self.extra_elements = 0 if token_mixer != "kan" else sum(
            3 * depth * math.prod(sizes[s]) * features[s] * (grid_size + spline_order)
            for s in self.token_stages + self.decoder_token_stages)

    def initialize(self) -> None:
        """nnU-Net's initialisation for the convolutions, the official one for the MLP ablation's
        linear layers; KAN layers keep efficient-kan's."""
        super().initialize()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
