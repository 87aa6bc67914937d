"""D-LKA Net on nnU-Net's planned topology, 2D and 3D from one implementation.

Azad et al., "Beyond Self-Attention: Deformable Large Kernel Attention for Medical Image
Segmentation", WACV 2024 (seed 001). 3D: convolutional stages at the highest resolutions, D-LKA
stages (a strided patch-merging convolution, then D-LKA blocks) from 1/4 resolution down, a
symmetric decoder with transposed convolutions and additive skips. 2D: the paper's encoder is an
ImageNet-pretrained MaxViT, which cannot be loaded here; we keep the plans' convolutional encoder
and put 2D D-LKA blocks in the decoder, as the paper's 2D decoder does. docs/dlka_net.md lists
every deviation.
"""

from __future__ import annotations

from torch import nn

from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from nnunet_ext.blocks.deformable_lka import Deformable, DLKABlock
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder
from nnunet_ext.topology import Topology

# The paper's layout per dimension, used for every option left at None.
PAPER_LAYOUT = {
    3: dict(encoder_blocks=3, bottleneck_blocks=2, decoder_blocks=3, deformable="extra"),
    2: dict(encoder_blocks=0, bottleneck_blocks=0, decoder_blocks=2, deformable="depthwise"),
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
            stage (encoder) or one residual block (decoder). None: the paper's 3/2/3 in 3D, 0/0/2 in 2D.
        dlka_from_stride: stages downsampled by at least this much along some axis are D-LKA
            stages (the paper: 1/4 and below); stage 0 is always convolutional.
        deformable: "extra" (3D paper: LKA plus one deformable 3^3 convolution), "depthwise" (2D
            paper: both depthwise convolutions deformable) or "none" (plain LKA); None: the paper's.
        position_embedding: the official code's learned positional embedding in every block.
        layer_scale: initial value of the blocks' layer scale gamma.
    """

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 encoder_blocks: int | None = None, bottleneck_blocks: int | None = None,
                 decoder_blocks: int | None = None, dlka_from_stride: int = 4, deformable: Deformable | None = None,
                 position_embedding: bool = False, layer_scale: float = 1e-6):
        super().__init__(topology)
        given = dict(encoder_blocks=encoder_blocks, bottleneck_blocks=bottleneck_blocks,
                     decoder_blocks=decoder_blocks, deformable=deformable)
        layout = {k: PAPER_LAYOUT[topology.dim][k] if v is None else v for k, v in given.items()}
        for option, value in layout.items():
            if option != "deformable" and value < 0:
                raise ConfigurationError(f"block counts must be >= 0, got {value}.", option)
        encoder_blocks, bottleneck_blocks, decoder_blocks, deformable = layout.values()
        strides = topology.cumulative_strides()
        self.dlka_stages = [s for s in range(1, topology.n_stages) if max(strides[s]) >= dlka_from_stride]
        if not self.dlka_stages:
            raise ConfigurationError(f"D-LKA Net puts D-LKA blocks at stages downsampled by {dlka_from_stride} or "
                                     f"more, but these plans downsample by at most {list(strides[-1])}. Lower "
                                     "`dlka_from_stride` or plan a larger patch.")
        sizes = topology.feature_map_sizes()
        conv_op, features = topology.conv_op, topology.features_per_stage

        def dlka_blocks(s: int, count: int) -> nn.Sequential:
            return nn.Sequential(*(DLKABlock(conv_op, features[s], deformable, **topology.norm_and_nonlin,
                                             layer_scale=layer_scale,
                                             position_embedding=sizes[s] if position_embedding else None)
                                   for _ in range(count)))

        def encoder_stage(s, plans_stage):
            count = bottleneck_blocks if s == topology.n_stages - 1 else encoder_blocks
            if s not in self.dlka_stages or not count:
                return plans_stage()
            # The paper's patch merging: a convolution with kernel = stride, then a norm.
            merge = conv_op(features[s - 1], features[s], topology.strides[s], topology.strides[s])
            return nn.Sequential(merge, topology.norm(features[s]), dlka_blocks(s, count))

        def decoder_stage(s, plans_stage):
            if s in self.dlka_stages and decoder_blocks:
                return dlka_blocks(s, decoder_blocks)
            return BasicBlockD(conv_op, features[s], features[s], topology.kernel_sizes[s], 1, topology.conv_bias,
                               **topology.norm_and_nonlin)

        self.encoder = topology.build_encoder(input_channels, encoder_stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision, decoder_stage, merge="add")
        # nnU-Net's for the convolutional stages; D-LKA blocks keep the official one (DLKABlock.reset_parameters).
        self.initialize(own_initialization=(DLKABlock,))

    @classmethod
    def synapse(cls, input_channels: int = 1, num_classes: int = 14, deep_supervision: bool = True,
                **options) -> "DLKANet":
        """The paper's 3D Synapse network: input 64x128x128, a full-resolution stage of two 16-channel
        convolutions, patch merging by (2, 4, 4) to 32 channels, then D-LKA stages of 32, 64, 128
        and 256 channels at 1/4, 1/8, 1/16 and 1/32 in-plane. `options` as for the constructor (the
        official code: `bottleneck_blocks=3, position_embedding=True`)."""
        topology = Topology(
            conv_op=nn.Conv3d, features_per_stage=(16, 32, 64, 128, 256), kernel_sizes=((3, 3, 3),) * 5,
            strides=((1, 1, 1), (2, 4, 4), (2, 2, 2), (2, 2, 2), (2, 2, 2)), n_blocks_per_stage=(2,) * 5,
            n_conv_per_stage_decoder=(2,) * 4, patch_size=SYNAPSE_PATCH_SIZE,
            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
        return cls(topology, input_channels, num_classes, deep_supervision, **options)
