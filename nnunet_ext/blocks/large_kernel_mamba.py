"""LKM-UNet's large-kernel Mamba (LM) block, for 2D and 3D feature maps alike.

Wang et al., "Large Kernel Vision Mamba UNet for Medical Image Segmentation", MICCAI 2024.
An LM block is a pixel-level SSM (PiM: Mamba over the pixels of each large window) followed by a
patch-level SSM (PaM: Mamba over one average-pooled token per window); each SSM is bidirectional
(BiM). See docs/lkm_unet.md for how this relates to the official code.

Window geometry. Each spatial axis of the (padded) feature map is viewed as two factors,
`outer x inner` (`split_axes`):

- "contiguous": outer = number of windows, inner = window; a window is a contiguous block of pixels.
- "strided": outer = window, inner = number of windows; a window is a grid of pixels `number of
  windows` apart, spanning the whole map.

Two layouts use them (the `window_layout` option):

- "contiguous" (the paper): PiM scans the pixels of contiguous windows, PaM pools each window to one
  token. A map that the window does not divide is zero-padded at the end of each axis and cropped back.
- "official" (the official code, LKMUNet.py at 66157750): the window is the official base size p.
  PiM's grid is P = 5p in 2D and (5p, 7p, 6p) in 3D (`OFFICIAL_PIXEL_GRID`): where P divides the map on
  every axis, each sequence is the pixels P apart (strided, P^dim sequences), else the whole map is
  one sequence. PaM pools cells of p where p divides every axis, else every pixel is a token. These
  fallbacks to a global scan are decided on each input's size, as the official code decides them.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.blocks.mamba import Mamba
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.ops.precision import at_least_float32, autocast_off

WindowLayout = Literal["contiguous", "official"]  # see the module docstring
LAYOUTS = get_args(WindowLayout)
# PiM's grid in the official layout, in units of p: 5p per axis in 2D, and factors fixed for the
# paper's 3D patch in 3D (LKMUNet.py lines 88-91).
OFFICIAL_PIXEL_GRID = {2: (5, 5), 3: (5, 7, 6)}


class BiMamba(nn.Module):
    """LayerNorm, then a forward Mamba on the sequence plus a second Mamba on the reversed sequence
    (flipped back), summed and projected: (batch, length, C) -> (batch, length, C), no residual.

    The projection: by default each Mamba keeps its out_proj and a Linear(C, C) with bias follows the
    sum; `shared_out_proj` is the official code's, where the Mamba layers have no out_proj and one
    bias-free Linear(d_inner, C) projects the sum.

    Runs in float32 (float64 stays) even under autocast, as the official code does, because the scan's
    exponentials are the part of Mamba that fp16 cannot hold.
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 bidirectional: bool = True, shared_out_proj: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.forward_mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.backward_mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand) if bidirectional else None
        if shared_out_proj:
            width = self.forward_mamba.d_inner
            for mamba in (self.forward_mamba, self.backward_mamba):
                if mamba is not None:
                    mamba.out_proj = nn.Identity()
            self.out_proj = nn.Linear(width, channels, bias=False)
        else:
            self.out_proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast_off(tokens.device):
            x = self.norm(at_least_float32(tokens))
            y = self.forward_mamba(x)
            if self.backward_mamba is not None:
                y = y + self.backward_mamba(x.flip(1)).flip(1)
            return self.out_proj(y).to(tokens.dtype)


def split_axes(x: torch.Tensor, window: Sequence[int], geometry: str) -> torch.Tensor:
    """Zero-pad `x` (B, C, *spatial) up to whole windows on every axis and view each axis as its
    (outer, inner) factors: (B, C, o1, i1, o2, i2, ...); `geometry` "contiguous" or "strided"."""
    size = x.shape[2:]
    count = [math.ceil(s / w) for s, w in zip(size, window)]
    x = F.pad(x, [p for s, w, n in reversed(list(zip(size, window, count))) for p in (0, w * n - s)])
    factors = [(n, w) if geometry == "contiguous" else (w, n) for w, n in zip(window, count)]
    return x.view(*x.shape[:2], *[f for pair in factors for f in pair])


def merge_axes(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of `split_axes`: (B, C, o1, i1, ...) -> (B, C, *size), cropping the padding."""
    x = x.reshape(*x.shape[:2], *[x.shape[2 + 2 * a] * x.shape[3 + 2 * a] for a in range(len(size))])
    return x[(..., *(slice(0, s) for s in size))]


def _divides(grid: Sequence[int], size: Sequence[int]) -> bool:
    return all(s % g == 0 for g, s in zip(grid, size))


class _WindowedMamba(nn.Module):
    """A BiM on tokens taken from `window`-sized windows in `layout` (see the module docstring)."""

    def __init__(self, channels: int, window: Sequence[int], layout: WindowLayout, **mamba):
        super().__init__()
        self.window, self.layout = tuple(window), layout
        self.mamba = BiMamba(channels, **mamba)


class PixelMamba(_WindowedMamba):
    """PiM: x + BiM over the pixels of each window (all windows of all images as one batch)."""

    def geometry(self, size: Sequence[int]) -> tuple[tuple[int, ...], str]:
        """The window and the geometry ("contiguous" or "strided") that a map of `size` is split by."""
        if self.layout == "contiguous":
            return self.window, "contiguous"
        grid = self.pixel_grid()
        if _divides(grid, size):
            return tuple(s // g for s, g in zip(size, grid)), "strided"
        return tuple(size), "contiguous"  # the official code's global scan

    def pixel_grid(self) -> tuple[int, ...]:
        """The official layout's P, per axis."""
        return tuple(f * w for f, w in zip(OFFICIAL_PIXEL_GRID[len(self.window)], self.window))

    def tokens(self, size: Sequence[int]) -> int:
        """Length of each sequence at a map of `size`."""
        return math.prod(min(w, s) for w, s in zip(self.geometry(size)[0], size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.dim() - 2
        window, geometry = self.geometry(x.shape[2:])
        outer, inner = [2 + 2 * a for a in range(dim)], [3 + 2 * a for a in range(dim)]
        windows, pixels = (outer, inner) if geometry == "contiguous" else (inner, outer)
        order = [0, *windows, *pixels, 1]  # (B, windows..., pixels..., C)
        tokens = split_axes(x, window, geometry).permute(order)
        shape = tokens.shape
        out = self.mamba(tokens.reshape(-1, math.prod(window), shape[-1]))
        out = out.view(shape).permute([order.index(i) for i in range(len(order))])
        return x + merge_axes(out, x.shape[2:])


class PatchMamba(_WindowedMamba):
    """PaM: average-pool every window (its valid pixels only) to one token, BiM over the tokens of
    each image, nearest-unpool, residual add."""

    def geometry(self, size: Sequence[int]) -> tuple[tuple[int, ...], str]:
        if self.layout == "official" and not _divides(self.window, size):
            return (1,) * len(size), "contiguous"  # the official code's global scan: every pixel a token
        return self.window, "contiguous"

    def tokens(self, size: Sequence[int]) -> int:
        return math.prod(math.ceil(s / w) for w, s in zip(self.geometry(size)[0], size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window, geometry = self.geometry(x.shape[2:])
        view = split_axes(x, window, geometry)
        valid = split_axes(torch.ones_like(x[:1, :1]), window, geometry)
        inner = [3 + 2 * a for a in range(x.dim() - 2)]
        pooled = view.sum(inner, keepdim=True) / valid.sum(inner, keepdim=True)  # (B, C, o1, 1, o2, 1, ...)
        out = self.mamba(pooled.flatten(2).transpose(1, 2))  # tokens (B, windows, C)
        out = out.transpose(1, 2).reshape(pooled.shape).expand_as(view)
        return x + merge_axes(out, x.shape[2:])


class LMBlock(nn.Module):
    """PiM then PaM; either can be switched off (the paper's ablation).

    `size` is the feature map size the block will see (at the plans' patch size). A layer whose
    sequence would be a single token there is left out unless `single_token_layers` (the official
    code keeps it, where it maps each pixel's channels on its own): a one-token Mamba mixes nothing
    along the sequence and its A_log never gets more than a zero gradient.
    """

    def __init__(self, channels: int, window: Sequence[int], size: Sequence[int], layout: WindowLayout = "contiguous",
                 pixel_mamba: bool = True, patch_mamba: bool = True, single_token_layers: bool = False, **mamba):
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigurationError(f"must be one of {LAYOUTS}, got {layout!r}.", "window_layout")
        self.pim = PixelMamba(channels, window, layout, **mamba) if pixel_mamba else None
        self.pam = PatchMamba(channels, window, layout, **mamba) if patch_mamba else None
        if not single_token_layers:
            self.pim, self.pam = (layer if layer is not None and layer.tokens(size) > 1 else None
                                  for layer in (self.pim, self.pam))

    def global_scans(self, size: Sequence[int]) -> list[str]:
        """Where the official layout falls back to scanning the whole map of `size`, in words."""
        notes = []
        if self.pim is not None and self.pim.layout == "official" and self.pim.geometry(size)[1] == "contiguous":
            notes.append(f"PiM's grid {'x'.join(map(str, self.pim.pixel_grid()))} does not divide the map, so it "
                         f"scans all {math.prod(size)} pixels as one sequence")
        if self.pam is not None and self.pam.layout == "official" and self.pam.geometry(size)[0] != self.pam.window:
            notes.append(f"PaM's cells {'x'.join(map(str, self.pam.window))} do not divide the map, so every one of "
                         f"its {math.prod(size)} pixels is a token")
        return notes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.pim, self.pam):
            if layer is not None:
                x = layer(x)
        return x
