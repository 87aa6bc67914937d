"""Large-kernel attention (LKA) and its deformable version (D-LKA) for any spatial dimension.

Azad et al., "Beyond Self-Attention: Deformable Large Kernel Attention for Medical Image
Segmentation", WACV 2024 (seed 001), building on LKA from Guo et al., "Visual Attention Network"
(2022). The dimension follows `conv_op`; docs/dlka_net.md lists the deviations from the paper and
from the official code.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, get_args

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_dropout
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from nnunet_ext.blocks import layers
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.ops.deform_conv import deform_conv
from nnunet_ext.ops.channels_last import depthwise_conv

# Where the deformation goes: "none" is plain LKA; "depthwise" makes both depthwise convolutions
# deformable (the paper's 2D D-LKA); "extra" adds one deformable 3^d convolution after them (3D).
Deformable = Literal["none", "depthwise", "extra"]
DEFORMABLE = get_args(Deformable)


class DeformableConv(nn.Module):
    """A deformable convolution whose offsets (and DCNv2 mask, if `modulated`) are predicted from
    its input by an ordinary convolution with the same kernel, stride, padding and dilation.

    The offset convolution starts at zero, so the layer starts as the ordinary convolution; call
    `reset_offsets()` again after any initialisation that touches every convolution.
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: int,
                 padding: int = 0, dilation: int = 1, groups: int = 1, stride: int = 1,
                 bias: bool = True, modulated: bool = False):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        kernel = (kernel_size,) * dim
        self.stride, self.padding, self.dilation, self.modulated = stride, padding, dilation, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = math.prod(kernel)
        self.conv_offset = conv_op(in_channels, taps * (dim + modulated), kernel_size, stride=stride,
                                   padding=padding, dilation=dilation)
        self.taps = taps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv's default initialisation, as torchvision's DeformConv2d uses.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())  # 1 / sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_offsets()

    def reset_offsets(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        mask = None
        if self.modulated:
            # DCNv2: a sigmoid mask, 0.5 where the offset convolution is still zero.
            offset, mask = offset[:, self.taps:], torch.sigmoid(offset[:, :self.taps])
        return deform_conv(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class LKA(nn.Module):
    """attention = 1x1( dilated depthwise 7 (dilation 3)( depthwise 5(x) ) ); returns x * attention
    (no softmax). `deformable` picks where the deformation goes (see `DEFORMABLE`); the official 2D code's
    deformable depthwise convolutions have no bias (`deformable_bias=False`)."""

    def __init__(self, conv_op: type[nn.Module], channels: int, deformable: Deformable = "none",
                 deformable_bias: bool = True):
        super().__init__()
        if deformable not in DEFORMABLE:
            raise ConfigurationError(f"must be one of {DEFORMABLE}, got {deformable!r}.", "deformable")

        def depthwise(kernel_size, padding, dilation=1):
            if deformable == "depthwise":
                return DeformableConv(conv_op, channels, channels, kernel_size, padding, dilation, groups=channels,
                                      bias=deformable_bias)
            return conv_op(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels)

        self.conv0 = depthwise(5, padding=2)
        self.conv_spatial = depthwise(7, padding=9, dilation=3)
        self.deform_conv = DeformableConv(conv_op, channels, channels, 3, padding=1) if deformable == "extra" else None
        self.conv1 = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 3D on the CPU: on channels-last maps, differentiated by nnunet_ext.ops.channels_last (conv_spatial's
        # backward takes a seventh of oneDNN's); the deformable ones run as they are. The extra deformable
        # convolution samples channels-last maps on the CPU (deform_conv), so the map stays in that layout.
        attention = depthwise_conv(self.conv_spatial, depthwise_conv(self.conv0, x))
        if self.deform_conv is not None:
            attention = self.deform_conv(attention)
        return x * self.conv1(attention)


class LKAAttention(nn.Module):
    """x + proj_2(LKA(GELU(proj_1(x)))): VAN's attention module around (D-)LKA."""

    def __init__(self, conv_op: type[nn.Module], channels: int, deformable: Deformable = "none",
                 deformable_bias: bool = True):
        super().__init__()
        self.proj_1 = conv_op(channels, channels, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(conv_op, channels, deformable, deformable_bias)
        self.proj_2 = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))


class DLKABlock(nn.Module):
    """The D-LKA block: y = x + gamma * LKAAttention(LayerNorm(x)) with layer scale gamma
    (initialised to `layer_scale`), then a convolutional feed-forward: out = y + 1x1(ResBlock(y)),
    ResBlock being two 3^d convolutions with norm and nonlinearity around a residual add.

    `position_embedding` (a feature-map size) adds the official code's learned positional
    embedding before the norm, zero-initialised and resampled when another size arrives. The official
    block's ResBlock convolutions have no bias (`conv_bias=False`) and channel dropout comes before its
    1x1 convolution (`dropout=0.1`).
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, deformable: Deformable, norm_op=None,
                 norm_op_kwargs=None, nonlin=None, nonlin_kwargs=None, layer_scale: float = 1e-6,
                 position_embedding: Sequence[int] | None = None, conv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.position_embedding = None if position_embedding is None else \
            nn.Parameter(torch.empty(1, channels, *position_embedding))
        dim = convert_conv_op_to_dim(conv_op)
        self.resample_mode = layers.linear_mode(dim)
        self.norm = LayerNormNd(channels, eps=1e-5)
        self.layer_scale = layer_scale
        self.gamma = nn.Parameter(torch.empty(channels))
        self.attention = LKAAttention(conv_op, channels, deformable)
        self.conv_block = BasicBlockD(conv_op, channels, channels, 3, 1, conv_bias=conv_bias, norm_op=norm_op,
                                      norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.dropout = get_matching_dropout(dimension=dim)(dropout) if dropout else nn.Identity()
        self.conv_out = conv_op(channels, channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: PyTorch's defaults for every layer, zero offsets and
        position embedding, gamma = layer_scale. (Under He initialisation, which nnU-Net gives its own
        convolutions, every feed-forward residual add doubles the variance: a network's outputs
        start in the hundreds.)"""
        # children before parents, so DeformableConv zeroes its offset convolution last
        for module in reversed(list(self.modules())[1:]):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.constant_(self.gamma, self.layer_scale)
        if self.position_embedding is not None:
            nn.init.zeros_(self.position_embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position_embedding is not None:
            embedding = self.position_embedding
            if embedding.shape[2:] != x.shape[2:]:
                embedding = nn.functional.interpolate(embedding, size=x.shape[2:], mode=self.resample_mode)
            x = x + embedding
        gamma = self.gamma.view(1, -1, *(1,) * (x.dim() - 2))
        y = x + gamma * self.attention(self.norm(x))
        return y + self.conv_out(self.dropout(self.conv_block(y)))


class DLKAMLPBlock(nn.Module):
    """The official 2D decoder's D-LKA block (`deformableLKABlock`, 2D/networks/MaxViT_deform_LKA.py):
    y = x + gamma_1 * LKAAttention(LayerNorm(x)), then out = y + gamma_2 * MLP(LayerNorm(y)), the MLP being a
    1x1 convolution to `mlp_ratio` times the channels, a depthwise 3^d convolution, GELU and a 1x1 convolution
    back; layer scales start at `layer_scale` (official: 1e-2), the deformable convolutions have no bias.

    Initialisation: the official decoder layer's (`MyDecoderLayer.init_weights`): Xavier-uniform weights
    and zero biases in every ordinary convolution, offset convolutions included (so offsets are not zero at
    start); PyTorch's (torchvision's) in the deformable convolutions.
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, deformable: Deformable = "depthwise",
                 mlp_ratio: int = 4, layer_scale: float = 1e-2):
        super().__init__()
        hidden = mlp_ratio * channels
        self.layer_scale = layer_scale
        self.norm1 = LayerNormNd(channels, eps=1e-5)
        self.attn = LKAAttention(conv_op, channels, deformable, deformable_bias=False)
        self.norm2 = LayerNormNd(channels, eps=1e-5)
        self.mlp = nn.Sequential(conv_op(channels, hidden, 1), conv_op(hidden, hidden, 3, padding=1, groups=hidden),
                                 nn.GELU(), conv_op(hidden, channels, 1))
        self.layer_scale_1 = nn.Parameter(torch.empty(channels))
        self.layer_scale_2 = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, DeformableConv):  # visited before its offset convolution, which Xavier then fills
                module.reset_parameters()
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNormNd):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.layer_scale_1, self.layer_scale)
        nn.init.constant_(self.layer_scale_2, self.layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = x + self.layer_scale_1.view(shape) * self.attn(self.norm1(x))
        return x + self.layer_scale_2.view(shape) * self.mlp(self.norm2(x))
