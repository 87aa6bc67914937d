"""ViT/CNN hybrid (TransUNet-style) on nnU-Net's planned topology, 2D and 3D from one implementation.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", 2021
(seed 003): a CNN encoder down to 1/16, a ViT over the tokens of that feature map for global
context, and a U-Net decoder with the CNN's skips for local detail. TransUNet and UNETR fix the
input size when they are built and have no deep supervision; here the plans give the encoder and
decoder, the positional embeddings are sized from the plans' patch and interpolated for other
sizes, and every decoder stage has a head. docs/vit_hybrid.md lists every deviation.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from nnunet_ext.blocks.transformer import FeatureMapTransformer
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder
from nnunet_ext.topology import Topology

TRANSUNET_STRIDE = 16  # TransUNet's ResNet-50 hands the ViT a 1/16 feature map


def default_transformer_stage(topology: Topology) -> int:
    """The deepest stage whose stride is at most TransUNet's 16 along every axis."""
    strides = topology.cumulative_strides()
    return max(s for s, stride in enumerate(strides) if max(stride) <= TRANSUNET_STRIDE)


class ViTransUNet(SegmentationNetwork):
    """ViT/CNN hybrid.

    Encoder: the plans' convolutional stages (plain or ResEnc); each stage in `transformer_stages`
    ends in a `FeatureMapTransformer` (1x1 token embedding, learned positions, `depth` pre-norm ViT
    blocks, a 3^d convolution back to the stage's channels), whose output is the stage's skip and
    the next stage's input. Decoder: nnU-Net's (transposed convolution, concatenated skip, the plans'
    convolutions, a 1x1 head per stage).

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`).
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        transformer_stages: encoder stages (negative counts from the bottleneck) that carry a
            transformer. None: the deepest stage with stride at most 16, TransUNet's place.
        depth, width, heads, mlp_ratio: each transformer's blocks, token width, attention heads and
            MLP expansion. Default 12, 384, 6, 4 (ViT-S), which keeps a 3d_fullres configuration
            within about 10% of the memory nnU-Net planned (docs/vit_hybrid.md); TransUNet's ViT-B
            is width=768, heads=12.
        drop_path_rate: stochastic depth, rising linearly over each transformer's blocks.
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 transformer_stages: Sequence[int] | None = None, depth: int = 12, width: int = 384, heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1):
        super().__init__(topology)
        self.transformer_stages = self._stages(topology, transformer_stages)
        if depth < 1:
            raise ConfigurationError(f"must be at least 1, got {depth}.", "depth")
        sizes = topology.feature_map_sizes()

        def stage(s, plans_stage):  # the stages in `transformer_stages` end in a transformer
            if s not in self.transformer_stages:
                return plans_stage()
            transformer = FeatureMapTransformer(topology.conv_op, topology.features_per_stage[s], sizes[s], width,
                                                depth, heads, mlp_ratio, drop_path_rate, **topology.norm_and_nonlin)
            return nn.Sequential(plans_stage(), transformer)

        self.encoder = topology.build_encoder(input_channels, stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, encoder=self.encoder)
        self.initialize()  # He for the convolutions; the transformers keep ViT's initialisation of linear layers

    @staticmethod
    def _stages(topology: Topology, stages: Sequence[int] | None) -> list[int]:
        if stages is None:
            return [default_transformer_stage(topology)]
        n = topology.n_stages
        if isinstance(stages, int):
            stages = [stages]
        if not stages or any(not -n <= s < n for s in stages):
            raise ConfigurationError(f"must name stages of these plans, 0 to {n - 1} (or -1 for the bottleneck down "
                                     f"to {-n}); got {list(stages)}.", "transformer_stages")
        resolved = sorted({s % n for s in stages})
        if len(resolved) != len(stages):
            raise ConfigurationError(f"names a stage twice: {list(stages)}.", "transformer_stages")
        return resolved
