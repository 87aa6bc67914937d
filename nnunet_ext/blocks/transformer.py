"""A ViT on a feature map, in 2D or 3D: TransUNet's transformer (Chen et al. 2021) over the tokens of
one encoder stage, with learned positional embeddings that follow the feature-map size."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.regularization import DropPath

from nnunet_ext.blocks import layers
from nnunet_ext.errors import ConfigurationError


class MultiHeadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V per head over (batch, tokens, width), through
    `scaled_dot_product_attention`, which picks a fused, memory-efficient kernel where one exists."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigurationError(f"the transformer width ({width}) must be a multiple of its heads ({heads}).",
                                     "heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + DropPath(attention(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.norm1, self.attention = nn.LayerNorm(width, eps=1e-6), MultiHeadSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FeatureMapTransformer(nn.Module):
    """TransUNet's ViT on the feature map of one encoder stage, 2D or 3D (from `conv_op`).

    A 1x1 convolution embeds every position as a token of `width` channels (TransUNet's patch
    embedding of size 1 on CNN features), learned positional embeddings are added, `depth`
    pre-norm blocks and a LayerNorm follow, and a 3^d convolution with the plans' norm and
    nonlinearity ((op, kwargs) pairs) brings the tokens back to the stage's channels (TransUNet's
    `conv_more`).

    The positional embeddings are sized for `grid_size`, the feature map at the plans' patch size;
    another size gets them linearly interpolated (bilinear/trilinear, half-pixel centres).
    """

    def __init__(self, conv_op: type, channels: int, grid_size: Sequence[int], width: int, depth: int, heads: int,
                 mlp_ratio: float, drop_path_rate: float, norm_op=None, norm_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None):
        super().__init__()
        self.embed = conv_op(channels, width, 1)
        self.position = nn.Parameter(torch.zeros(1, width, *grid_size))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # numbers, also on the meta device
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio, r) for r in rates))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Sequential(conv_op(width, channels, 3, padding=1), layers.norm(norm_op, norm_op_kwargs, channels),
                                 layers.nonlinearity(nonlin, nonlin_kwargs))
        self.interpolation = layers.linear_mode(convert_conv_op_to_dim(conv_op))
        self._init_vit_weights()

    def _init_vit_weights(self) -> None:
        """ViT's initialisation: truncated normal (std 0.02) for the linear layers and positions."""
        nn.init.trunc_normal_(self.position, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, size: Sequence[int]) -> torch.Tensor:
        """The positional embeddings for a feature map of `size`: the parameter itself at its own size."""
        if tuple(size) == tuple(self.position.shape[2:]):
            return self.position
        return F.interpolate(self.position, size=tuple(size), mode=self.interpolation, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.position_embedding(x.shape[2:])
        b, width, *size = x.shape
        tokens = self.norm(self.blocks(x.flatten(2).transpose(1, 2)))
        return self.out(tokens.transpose(1, 2).reshape(b, width, *size))
