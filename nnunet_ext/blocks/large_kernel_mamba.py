"""LKM-UNet's large-kernel Mamba (LM) block, for 2D and 3D feature maps alike.

Wang et al., "Large Kernel Vision Mamba UNet for Medical Image Segmentation", MICCAI 2024.
An LM block is a pixel-level SSM (PiM: Mamba over the pixels of each large window) followed by a
patch-level SSM (PaM: Mamba over one average-pooled token per window); each SSM is bidirectional
(BiM). See docs/lkm_unet.md for how this relates to the official code.

Window geometry. Each spatial axis of the (padded) feature map is viewed as two factors,
`outer x inner`:

- layout "contiguous" (the paper): outer = number of windows, inner = window; a window is a
  contiguous block of pixels.
- layout "strided" (the official code): outer = window, inner = number of windows; a window is a
  grid of pixels `number of windows` apart, spanning the whole map.

PiM scans the window factor; PaM always pools the inner, contiguous factor: one token per window
in the paper's layout, one token per cell of `number of windows` pixels in the official one.
A map that the window does not divide is zero-padded at the end of each axis and cropped back.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.blocks.mamba import Mamba
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.ops.precision import autocast_off

WindowLayout = Literal["contiguous", "strided"]  # see the module docstring
LAYOUTS = get_args(WindowLayout)


class BiMamba(nn.Module):
    """LayerNorm, then a forward Mamba on the sequence plus a second Mamba on the reversed sequence
    (flipped back), summed and projected: (batch, length, C) -> (batch, length, C), no residual.

    Runs in float32 even under autocast, as the official code does, because the scan's
    exponentials are the part of Mamba that fp16 cannot hold.
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 bidirectional: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.forward_mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.backward_mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand) if bidirectional else None
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast_off(tokens.device):
            x = self.norm(tokens.float())
            y = self.forward_mamba(x)
            if self.backward_mamba is not None:
                y = y + self.backward_mamba(x.flip(1)).flip(1)
            return self.out_proj(y).to(tokens.dtype)


def split_axes(x: torch.Tensor, window: Sequence[int], layout: str) -> torch.Tensor:
    """Zero-pad `x` (B, C, *spatial) up to whole windows on every axis and view each axis as its
    (outer, inner) factors: (B, C, o1, i1, o2, i2, ...)."""
    size = x.shape[2:]
    count = [math.ceil(s / w) for s, w in zip(size, window)]
    x = F.pad(x, [p for s, w, n in reversed(list(zip(size, window, count))) for p in (0, w * n - s)])
    factors = [(n, w) if layout == "contiguous" else (w, n) for w, n in zip(window, count)]
    return x.view(*x.shape[:2], *[f for pair in factors for f in pair])


def merge_axes(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of `split_axes`: (B, C, o1, i1, ...) -> (B, C, *size), cropping the padding."""
    x = x.reshape(*x.shape[:2], *[x.shape[2 + 2 * a] * x.shape[3 + 2 * a] for a in range(len(size))])
    return x[(..., *(slice(0, s) for s in size))]


class _WindowedMamba(nn.Module):
    """A BiM on tokens taken from `window`-sized windows in `layout` (see the module docstring)."""

    def __init__(self, channels: int, window: Sequence[int], layout: WindowLayout, **mamba):
        super().__init__()
        self.window, self.layout = tuple(window), layout
        self.mamba = BiMamba(channels, **mamba)


class PixelMamba(_WindowedMamba):
    """PiM: x + BiM over the pixels of each window (all windows of all images as one batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.dim() - 2
        outer, inner = [2 + 2 * a for a in range(dim)], [3 + 2 * a for a in range(dim)]
        windows, pixels = (outer, inner) if self.layout == "contiguous" else (inner, outer)
        order = [0, *windows, *pixels, 1]  # (B, windows..., pixels..., C)
        tokens = split_axes(x, self.window, self.layout).permute(order)
        shape = tokens.shape
        out = self.mamba(tokens.reshape(-1, math.prod(self.window), shape[-1]))
        out = out.view(shape).permute([order.index(i) for i in range(len(order))])
        return x + merge_axes(out, x.shape[2:])


class PatchMamba(_WindowedMamba):
    """PaM: average-pool every cell (its valid pixels only) to one token, BiM over the tokens of
    each image, nearest-unpool, residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = split_axes(x, self.window, self.layout)
        valid = split_axes(torch.ones_like(x[:1, :1]), self.window, self.layout)
        inner = [3 + 2 * a for a in range(x.dim() - 2)]
        pooled = view.sum(inner, keepdim=True) / valid.sum(inner, keepdim=True)  # (B, C, o1, 1, o2, 1, ...)
        out = self.mamba(pooled.flatten(2).transpose(1, 2))  # tokens (B, cells, C)
        out = out.transpose(1, 2).reshape(pooled.shape).expand_as(view)
        return x + merge_axes(out, x.shape[2:])


class LMBlock(nn.Module):
    """PiM then PaM; either can be switched off (the paper's ablation).

    `size` is the feature map size the block will see (at the plans' patch size). A layer whose
    sequence would be a single token there is left out: a one-token Mamba mixes nothing and its
    A_log would never get a gradient (DDP rejects unused parameters).
    """

    def __init__(self, channels: int, window: Sequence[int], size: Sequence[int], layout: WindowLayout = "contiguous",
                 pixel_mamba: bool = True, patch_mamba: bool = True, **mamba):
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigurationError(f"must be one of {LAYOUTS}, got {layout!r}.", "window_layout")
        pixels = math.prod(min(w, s) for w, s in zip(window, size))
        windows = math.prod(math.ceil(s / w) for w, s in zip(window, size))
        cells = windows if layout == "contiguous" else pixels  # PaM's tokens
        self.pim = PixelMamba(channels, window, layout, **mamba) if pixel_mamba and pixels > 1 else None
        self.pam = PatchMamba(channels, window, layout, **mamba) if patch_mamba and cells > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.pim, self.pam):
            if layer is not None:
                x = layer(x)
        return x
