"""Deformable convolution (DCNv1, and DCNv2 with a mask) in 2D and 3D, in plain PyTorch.

`deform_conv` has the calling convention of `torchvision.ops.deform_conv2d` and its offset layout:
for offset group g and kernel tap t (taps in row-major order), channels `(g * taps + t) * dim + a`
hold the displacement along spatial axis a, i.e. (dy, dx) pairs in 2D and (dz, dy, dx) in 3D. The
mask has one channel per (g, t). Each tap samples the input bilinearly (trilinearly in 3D) at
`output_position * stride - padding + tap * dilation + offset`, reading zeros outside the input,
exactly as torchvision does.

Memory: the taps are processed in chunks of at most `TAP_CHUNK_ELEMENTS` sampled values (at least
one tap), and under autograd each chunk is recomputed in the backward pass (activation
checkpointing). The peak beyond the inputs and the output is therefore one chunk's sampled values,
its sampling grid and its partial output, never a tensor replicated once per kernel tap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nnunet_ext.ops.precision import autocast_off

# Sampled values (batch x channels x taps x output positions) held at once: 2**24 float32 = 64 MB.
TAP_CHUNK_ELEMENTS = 2 ** 24


def _ntuple(value, dim: int, what: str) -> tuple[int, ...]:
    value = (int(value),) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"deform_conv: {what} {value} must be an int or {dim} ints for a {dim}D kernel.")
    return value


def deform_conv(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                stride=1, padding=0, dilation=1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Deformable convolution; the dimension (2D or 3D) is that of `weight`.

    Args:
        input: (b, c_in, *spatial).
        offset: (b, offset_groups * taps * dim, *out_spatial), `taps = prod(kernel_size)`.
        weight: (c_out, c_in // groups, *kernel_size); `groups` follows from it (depthwise included).
        bias: (c_out,) or None.
        stride, padding, dilation: an int or one per spatial axis.
        mask: (b, offset_groups * taps, *out_spatial) modulation (DCNv2), or None.
    """
    dim = weight.dim() - 2
    if dim not in (2, 3) or input.dim() != dim + 2:
        raise ValueError(f"deform_conv: expected a 2D or 3D weight and an input with the same number of spatial "
                         f"axes, got weight {tuple(weight.shape)} and input {tuple(input.shape)}.")
    stride, padding, dilation = (_ntuple(v, dim, w) for v, w in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    b, c_in, *size = input.shape
    c_out, c_per_group, *kernel = weight.shape
    if c_in % c_per_group or c_out % (c_in // c_per_group):
        raise ValueError(f"deform_conv: weight {tuple(weight.shape)} does not split input channels {c_in} "
                         f"into equal groups.")
    groups, taps = c_in // c_per_group, math.prod(kernel)
    out_size = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)]
    if min(out_size) < 1:
        raise ValueError(f"deform_conv: input {size} is smaller than the dilated kernel {kernel} (padding {padding}).")
    offset_groups = offset.shape[1] // (dim * taps)
    if offset.shape[0] != b or offset.shape[1] != offset_groups * dim * taps or offset_groups < 1 \
            or c_in % offset_groups or list(offset.shape[2:]) != out_size:
        raise ValueError(f"deform_conv: offset must be (batch {b}, offset_groups x {dim * taps}, {out_size}) with "
                         f"offset_groups dividing {c_in} channels, got {tuple(offset.shape)}.")
    if mask is not None and tuple(mask.shape) != (b, offset_groups * taps, *out_size):
        raise ValueError(f"deform_conv: mask must be {(b, offset_groups * taps, *out_size)}, got {tuple(mask.shape)}.")

    offset = offset.view(b, offset_groups, taps, dim, *out_size)
    if mask is not None:
        mask = mask.view(b, offset_groups, taps, *out_size)
    weight = weight.flatten(2)
    geometry = (tuple(size), tuple(out_size), tuple(kernel), stride, padding, dilation, groups)
    chunk = max(1, TAP_CHUNK_ELEMENTS // (b * c_in * math.prod(out_size)))
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, offset, weight, mask))
    out = None
    for start in range(0, taps, chunk):
        taps_chunk = slice(start, min(start + chunk, taps))
        args = (input, offset[:, :, taps_chunk], None if mask is None else mask[:, :, taps_chunk],
                weight[:, :, taps_chunk], taps_chunk, geometry)
        part = checkpoint(_taps, *args, use_reentrant=False) if recompute else _taps(*args)
        out = part if out is None else out + part
    if bias is not None:
        out = out + bias.view(1, -1, *(1,) * dim)
    return out


def _taps(input, offset, mask, weight, taps_chunk: slice, geometry) -> torch.Tensor:
    """The output contribution of the kernel taps in `taps_chunk`."""
    size, out_size, kernel, stride, padding, dilation, groups = geometry
    b, c_in = input.shape[:2]
    offset_groups, n_taps, dim = offset.shape[1:4]
    # Sampling positions in input pixels, (b, offset_groups, n_taps, *out_size, dim): the regular
    # grid of each tap plus its offsets, in float32 at least, so positions stay exact under autocast.
    dtype = torch.promote_types(input.dtype, torch.float32)
    tap_index = torch.arange(taps_chunk.start, taps_chunk.stop, device=input.device)
    axes = []
    for a in range(dim):
        tap = tap_index // math.prod(kernel[a + 1:]) % kernel[a]
        out = torch.arange(out_size[a], device=input.device)
        position = out * stride[a] - padding[a] + tap[:, None] * dilation[a]  # (n_taps, out_size[a])
        axes.append(position.view(n_taps, *(out_size[a] if i == a else 1 for i in range(dim))))
    regular = torch.stack(torch.broadcast_tensors(*axes), -1)
    position = regular + offset.to(dtype).movedim(3, -1)
    # grid_sample takes (x, y[, z]) scaled so that -1 and 1 are the outer edges of the input
    # (align_corners=False); bilinear sampling with zero padding then matches torchvision.
    extent = torch.tensor(size, dtype=dtype, device=input.device)
    grid = ((2 * position + 1) / extent - 1).flip(-1)
    grid = grid.reshape(b * offset_groups, n_taps * out_size[0], *out_size[1:], dim)
    with autocast_off(input.device):
        sampled = F.grid_sample(input.to(dtype).reshape(b * offset_groups, c_in // offset_groups, *size), grid,
                                mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(b, offset_groups, c_in // offset_groups, n_taps, -1)
    if mask is not None:
        sampled = sampled * mask.to(dtype).reshape(b, offset_groups, 1, n_taps, -1)
    # Contract (input channels of a group x taps) with the weight, group by group: a matmul broadcast over the
    # batch reads the samples in place (einsum moved the group axis first, a copy of every sample, and
    # back in backward: 18% of D-LKA Net's depthwise 2d training step).
    c_out = weight.shape[0]
    sampled = sampled.to(input.dtype).view(b, groups, -1, sampled.shape[-1])
    out = torch.matmul(weight.reshape(groups, c_out // groups, -1), sampled)
    return out.reshape(b, c_out, *out_size)
