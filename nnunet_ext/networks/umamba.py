"""U-Mamba (U-Mamba_Bot and U-Mamba_Enc) on nnU-Net's planned topology, 2D and 3D from one implementation.

Ma, Li and Wang, "U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation", 2024
(arXiv 2401.04722): a residual U-Net with Mamba layers (LayerNorm, then Mamba over the flattened feature
map) after its bottleneck (Bot) or after every encoder stage (Enc). docs/umamba.md lists every difference
from the paper and from the official code (bowang-lab/U-Mamba at 28459e33).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from nnunet_ext.blocks.mamba import Mamba
from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder, rename_state_dict
from nnunet_ext.ops.precision import at_least_float32, autocast_off
from nnunet_ext.topology import Topology

Layout = Literal["plans", "official"]


class MambaLayer(nn.Module):
    """LayerNorm, then Mamba over the tokens of a feature map (b, c, *size), no residual: the tokens are its
    positions with their c channels as features or, with `channel_tokens`, its channels with their
    positions as features (`features` is then the number of positions, fixed by the plans' patch).

    Runs in float32 under autocast, as the official code does: the scan's exponentials are what fp16
    cannot hold."""

    def __init__(self, features: int, channel_tokens: bool = False, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2):
        super().__init__()
        self.channel_tokens = channel_tokens
        self.norm = nn.LayerNorm(features)
        self.mamba = Mamba(features, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2)  # (b, c, positions)
        if self.channel_tokens and tokens.shape[2] != self.norm.normalized_shape[0]:
            raise ValueError(
                f"this U-Mamba stage mixes its {tokens.shape[1]} channels as tokens of the "
                f"{self.norm.normalized_shape[0]} positions it has at the plans' patch size, as the official "
                f"U-Mamba_Enc does where a stage has no more positions than channels; an input of another size "
                f"gives it {tokens.shape[2]}. Predict with the plans' patch size (nnU-Net's sliding window does).")
        if not self.channel_tokens:
            tokens = tokens.transpose(1, 2)
        with autocast_off(x.device):
            y = self.mamba(self.norm(at_least_float32(tokens)))
        if not self.channel_tokens:
            y = y.transpose(1, 2)
        # Contiguous, not the channels-last view the transposed tokens give: on CPU, torch 2.14's backward of a
        # strided 1x1 convolution (the next stage's projection) crashes the process on such maps at some sizes.
        return y.reshape(x.shape).to(x.dtype).contiguous()


class ProjectedResidualBlock(nn.Module):
    """The official code's BasicResBlock: conv (stride) -> norm -> nonlinearity -> conv -> norm, plus the input
    through a 1x1 convolution of the same stride, then the nonlinearity. Its convolutions keep their bias
    whatever the plans say."""

    def __init__(self, topology: Topology, input_channels: int, output_channels: int, kernel_size, stride=1):
        super().__init__()
        conv, padding = topology.conv_op, [k // 2 for k in kernel_size]
        self.conv1 = conv(input_channels, output_channels, kernel_size, stride=stride, padding=padding)
        self.norm1, self.act1 = topology.norm(output_channels), topology.nonlinearity()
        self.conv2 = conv(output_channels, output_channels, kernel_size, padding=padding)
        self.norm2, self.act2 = topology.norm(output_channels), topology.nonlinearity()
        self.conv3 = conv(input_channels, output_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.conv3(x))


def _official_stage(topology: Topology, input_channels: int, s: int, blocks: int, stride=1) -> nn.Sequential:
    """A projected residual block into stage s's width (with `stride`), then blocks - 1 of nnU-Net's."""
    width, kernel = topology.features_per_stage[s], topology.kernel_sizes[s]
    return nn.Sequential(ProjectedResidualBlock(topology, input_channels, width, kernel, stride),
                         *(BasicBlockD(topology.conv_op, width, width, kernel, 1, topology.conv_bias,
                                       **topology.norm_and_nonlin) for _ in range(blocks - 1)))


class NearestUpsample(nn.Module):
    """The official decoder's upsampling: nearest-neighbour by the stage's stride, then a 1x1 convolution."""

    def __init__(self, conv_op: type[nn.Module], input_channels: int, output_channels: int, stride):
        super().__init__()
        self.conv = conv_op(input_channels, output_channels, kernel_size=1)
        self.stride = [float(s) for s in stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


class OfficialEncoder(nn.Module):
    """The official encoder: a stem at full resolution (a projected residual block, then nnU-Net's), stages that
    each start with a projected residual block of the stage's stride, and after each stage its Mamba layer
    (an Identity where there is none). Returns one skip per stage."""

    def __init__(self, topology: Topology, input_channels: int, blocks: list[int], mamba_layers: list[nn.Module]):
        super().__init__()
        self.stem = _official_stage(topology, input_channels, 0, blocks[0])
        widths = topology.features_per_stage
        self.stages = nn.ModuleList(_official_stage(topology, widths[max(s - 1, 0)], s, blocks[s], topology.strides[s])
                                    for s in range(topology.n_stages))
        self.mamba_layers = nn.ModuleList(mamba_layers) if mamba_layers else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, skips = self.stem(x), []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is not None:
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips


class UMamba(SegmentationNetwork):
    """U-Mamba; `UMambaBot` and `UMambaEnc` say where its Mamba layers go.

    Args:
        topology: the plans' U-Net layout (`Topology.from_plans`). The encoder is always residual; plain plans'
            `n_conv_per_stage` becomes the number of residual blocks per stage.
        input_channels, num_classes: input modalities and output heads.
        deep_supervision: return one logit map per decoder stage, highest resolution first.
        layout: "plans" (the paper on the plans' topology): nnU-Net's residual encoder and decoder (strided
            and transposed convolutions, its blocks and counts), Mamba over the positions of every map.
            "official": the official code's network (bowang-lab/U-Mamba at 28459e33): its stem and projected
            residual blocks, one block per stage in the deeper half of the encoder and in the upper half of the
            decoder, nearest-neighbour upsampling with a 1x1 convolution, He initialisation without residual
            blocks starting as identities; for U-Mamba_Enc Mamba over the channels where a stage has no more
            positions than channels, and in 2D Mamba at every other stage (the last included) and no skip at
            full resolution.
        d_state, d_conv, expand: Mamba's state size, causal convolution width and inner expansion.
    """

    mamba_at: Literal["bottleneck", "encoder"]

    def __init__(self, topology: Topology, input_channels: int, num_classes: int, deep_supervision: bool = True,
                 layout: Layout = "plans", d_state: int = 16, d_conv: int = 4, expand: float = 2):
        super().__init__(topology)
        n, official = topology.n_stages, layout == "official"
        sizes = topology.feature_map_sizes()

        def mamba(s: int) -> nn.Module:
            positions, width = math.prod(sizes[s]), topology.features_per_stage[s]
            channel_tokens = official and self.mamba_at == "encoder" and positions <= width
            return MambaLayer(positions if channel_tokens else width, channel_tokens, d_state, d_conv, expand)

        def has_mamba(s: int) -> bool:  # the official 2D U-Mamba_Enc: every other stage, ending at the last
            return not (official and topology.dim == 2) or (s % 2 == 1) != (n % 2 == 1)

        in_encoder = self.mamba_at == "encoder"
        if official:
            half = math.ceil(n / 2)  # from here on one block: encoder stages, and decoder list entries (upper stages)
            blocks = [1 if s >= half else b for s, b in enumerate(topology.n_blocks_per_stage)]
            decoder_blocks = [1 if i >= half else b for i, b in enumerate(topology.n_conv_per_stage_decoder)]
            layers = [mamba(s) if has_mamba(s) else nn.Identity() for s in range(n)] if in_encoder else []
            self.encoder = OfficialEncoder(topology, input_channels, blocks, layers)
            full_resolution_skip = topology.dim == 3
            decoder_topology = dataclasses.replace(topology, n_conv_per_stage_decoder=tuple(decoder_blocks))

            def decoder_stage(s, plans_stage):
                skip = s > 0 or full_resolution_skip
                return _official_stage(decoder_topology, (2 if skip else 1) * topology.features_per_stage[s], s,
                                       decoder_blocks[n - 2 - s])

            def upsample(s):
                return NearestUpsample(topology.conv_op, topology.features_per_stage[s + 1],
                                       topology.features_per_stage[s], topology.strides[s + 1])

            self.decoder = UNetDecoder(decoder_topology, num_classes, deep_supervision, decoder_stage,
                                       encoder=self.encoder, upsample=upsample,
                                       full_resolution_skip=full_resolution_skip)
        else:
            def stage(s, plans_stage):
                return nn.Sequential(plans_stage(), mamba(s)) if in_encoder else plans_stage()

            residual = dataclasses.replace(topology, residual_encoder=True)
            self.encoder = residual.build_encoder(input_channels, stage)
            self.decoder = UNetDecoder(residual, num_classes, deep_supervision, residual=True, encoder=self.encoder)
        self.mamba_layer = None if in_encoder else mamba(n - 1)
        # The official code initialises every convolution He's way and starts no residual block as an identity.
        self.initialize(identity_blocks=nn.ModuleList() if official else self.encoder)

    def forward_features(self, x: torch.Tensor):
        skips = self.encoder(x)
        if self.mamba_layer is not None:
            skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)


class UMambaBot(UMamba):
    __doc__ = "U-Mamba_Bot: one Mamba layer, after the encoder's last stage (the bottleneck).\n\n" + UMamba.__doc__
    mamba_at = "bottleneck"


class UMambaEnc(UMamba):
    __doc__ = "U-Mamba_Enc: a Mamba layer after every encoder stage.\n\n" + UMamba.__doc__
    mamba_at = "encoder"


def from_official(state, ours=None) -> dict[str, torch.Tensor]:
    """The official network's state dict (U-Mamba_Bot or _Enc, 2D or 3D) as the `official` preset's: the same
    names but for the decoder's upsampling, `upsample_layers` there and `transpconvs` here."""
    return rename_state_dict(state, [(r"(^|\.)decoder\.upsample_layers\.", r"\1decoder.transpconvs.")])
