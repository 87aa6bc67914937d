"""Attention U-Net on nnU-Net's planned U-Net topology, 2D and 3D from one implementation.

Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018: an additive
attention gate on every skip connection, gated by the coarser decoder features. Seed 002 adds a
non-local self-attention (query/key/value, softmax over positions, gamma initialised to 0); we
place it on the encoder outputs of the stages whose token count at the patch size is at most
`self_attention_max_tokens`, i.e. the low-resolution stages and the bottleneck. See
docs/attention_unet.md for every deviation from the papers.
"""

from __future__ import annotations

import math

from torch import nn

from nnunet_ext.blocks.attention import AttentionGate, NonLocalSelfAttention
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder
from nnunet_ext.topology import Topology


class AttentionUNet(SegmentationNetwork):
    """Attention U-Net.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`); a ResEnc plan gives a residual encoder.
        input_channels, num_classes: input modalities and output heads (nnU-Net's segmentation heads).
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        self_attention_max_tokens: stages with at most this many positions at the patch size get
            seed 002's self-attention (0 disables it).
        attention_gates: the Oktay gates on the skips (False gives nnU-Net's plain U-Net, for ablation).
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 self_attention_max_tokens: int = 4096, attention_gates: bool = True):
        super().__init__(topology)
        self.encoder = topology.build_encoder(input_channels)
        self.self_attention_stages = [s for s, size in enumerate(topology.feature_map_sizes())
                                      if math.prod(size) <= self_attention_max_tokens]
        self.self_attention = nn.ModuleDict({
            str(s): NonLocalSelfAttention(topology.conv_op, topology.features_per_stage[s])
            for s in self.self_attention_stages})
        features, strides = topology.features_per_stage, topology.strides
        # The gate on the skip of stage s, gated by the decoder's features from stage s + 1 (deepest first).
        gates = [AttentionGate(topology.conv_op, features[s], features[s + 1], strides[s + 1])
                 for s in range(topology.n_stages - 2, -1, -1)] if attention_gates else None
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, gates=gates, encoder=self.encoder)
        self.initialize()

    def forward_features(self, x):
        skips = self.encoder(x)
        for s, attention in self.self_attention.items():
            skips[int(s)] = attention(skips[int(s)])
        return self.decoder(skips)
