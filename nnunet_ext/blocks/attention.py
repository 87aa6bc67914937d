"""Attention blocks for any spatial dimension (the dimension follows `conv_op`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunet_ext.blocks import layers
from nnunet_ext.ops.precision import autocast_off


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., "Attention U-Net: Learning Where to Look for the
    Pancreas", MIDL 2018, eq. 1-2).

    alpha = sigmoid(psi(ReLU(W_x x + W_g g))) is computed at the gating signal's (coarser)
    resolution, W_x being a convolution with kernel = stride = the scale factor between the two,
    then resampled linearly to the skip's size; the gate returns x * alpha.
    """

    def __init__(self, conv_op: type[nn.Module], skip_channels: int, gating_channels: int,
                 stride: Sequence[int], inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(skip_channels // 2, 1)
        stride = tuple(stride)
        self.theta = conv_op(skip_channels, inter, kernel_size=stride, stride=stride, bias=False)
        self.phi = conv_op(gating_channels, inter, kernel_size=1, bias=True)
        self.psi = conv_op(inter, 1, kernel_size=1, bias=True)
        self.mode = layers.linear_mode(convert_conv_op_to_dim(conv_op))

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients alpha in (0, 1), one channel, at the size of the skip `x`."""
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        return F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(x, g)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v over the last two axes, unscaled; v may be wider than q and k.

    scaled_dot_product_attention's fused kernels never hold the position-by-position matrix. On CUDA its
    memory-efficient kernel takes a v wider than q and k; on CPU its flash kernel needs equal widths, and the
    fallback it takes otherwise writes the matrix out and checks every row for masking. So on CPU q and k are
    padded with zero channels to v's width: q k^T is unchanged, and the flash kernel runs (Attention U-Net's
    2d self-attention: forward 10x, forward and backward 2x faster than the written-out products). Where the
    flash kernel is switched off (sdpa_kernel), nothing is padded: the FLOP count sees the products as defined.
    Nor under torch.compile, which picks its own kernel (and cannot trace the switch's query into its graph)."""
    # flash_sdp_enabled: the switch covers the CPU kernel too
    if not q.is_cuda and not torch.compiler.is_compiling() and torch.backends.cuda.flash_sdp_enabled():
        # the flash kernel also needs each row of channels contiguous, or it falls back as well
        width = max(v.shape[-1] - q.shape[-1], 0)
        q, k, v = F.pad(q, (0, width)).contiguous(), F.pad(k, (0, width)).contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


class NonLocalSelfAttention(nn.Module):
    """Self-attention over all positions of a feature map (seed 002; the SAGAN/non-local block).

    Query and key are 1x1 convolutions to channels // reduction, value keeps the channels; the
    attention is softmax(Q K^T) V over positions, unscaled as in the seed, and the block returns
    x + gamma * attention with gamma initialised to 0, so it starts as the identity.

    It computes in float32 (at least) under autocast: unscaled logits reach thousands, where float16 resolves
    only whole units, and the softmax of such logits is off by several percent (tests/
    test_mixed_precision.py). It runs at low resolutions only, where float32 costs little.
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, reduction: int = 8):
        super().__init__()
        qk = max(channels // reduction, 1)
        self.query = conv_op(channels, qk, kernel_size=1)
        self.key = conv_op(channels, qk, kernel_size=1)
        self.value = conv_op(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def tokens(t):  # (b, c, *spatial) -> (b, 1 head, positions, c)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        with autocast_off(x.device):
            wide = x.to(torch.promote_types(x.dtype, torch.float32))
            out = softmax_attention(tokens(self.query(wide)), tokens(self.key(wide)), tokens(self.value(wide)))
            return (wide + self.gamma * out.squeeze(1).transpose(1, 2).reshape(x.shape)).to(x.dtype)
