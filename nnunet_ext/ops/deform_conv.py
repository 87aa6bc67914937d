"""Deformable convolution (DCNv1, and DCNv2 with a mask) in 2D and 3D: PyTorch's grid_sample, or on the CPU
(float32, outside torch.compile) compiled loops (cpu_kernel.deform, csrc/deform.c) where they apply.

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

The compiled loops sample channels-last maps, where a voxel's channels are adjacent:
- a depthwise convolution with one offset group and no mask (D-LKA Net's in 2D) adds each sample, weighed,
  straight into the output, so no sample is held and there is nothing to chunk;
- a 3D one with one offset group and one convolution group (D-LKA Net's in 3D) writes each chunk's samples as
  (position, tap, channel) rows, and one matrix product contracts them with the weight.
Both give the output channels-last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import register_flop_formula

from nnunet_ext.ops import cpu_kernel
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
    # depthwise, one offset group, no mask (D-LKA Net's 2D deformable convolutions): no sample stored
    if offset_groups == 1 and groups == c_in == c_out and mask is None and _compiled(input):
        out = _depthwise_channels_last(input, _positions(input, offset, slice(0, taps), geometry), weight)
        return out if bias is None else out + bias.view(1, -1, *(1,) * dim)
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


def _compiled(input: torch.Tensor) -> bool:
    """Whether the compiled CPU loops (cpu_kernel.deform) may take `input`: float32 on the CPU outside
    torch.compile, the library built."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and not torch.compiler.is_compiling()
            and cpu_kernel.cpu_kernel_available())


@torch.library.custom_op("nnunet_ext::deform_depthwise", mutates_args=())
def _deform_depthwise(x: torch.Tensor, position: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cpu_kernel.deform as one operator to torch, so that FlopCounterMode counts its multiply-adds."""
    return cpu_kernel.deform(x, position, weight)


@register_flop_formula(torch.ops.nnunet_ext.deform_depthwise)
def _deform_depthwise_flops(x_shape, position_shape, *_, **__) -> int:
    # what the sampling path's matrix product counts: a multiply-add per sample (position, tap, channel)
    return 2 * math.prod(position_shape[:3]) * x_shape[-1]


class _Deform(torch.autograd.Function):
    """cpu_kernel.deform, differentiated in the map, the positions and the weight. With `count`, one torch operator
    with a FLOP formula (a depthwise deformable convolution's); without, no arithmetic to the FLOP counter (the
    samples alone, which the matrix product after them counts)."""

    @staticmethod
    def forward(ctx, x, position, weight, count):
        ctx.save_for_backward(x, position, weight)
        return (_deform_depthwise if count else cpu_kernel.deform)(x, position, weight)

    @staticmethod
    def backward(ctx, grad):
        x, position, weight = ctx.saved_tensors
        return *cpu_kernel.deform_backward(x, position, weight, grad.contiguous(), ctx.needs_input_grad[:3]), None


def _to_3d(x: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2D map (b, H, W, C) and its positions (..., 2) as a 3D map of depth 1 and positions at depth 0; 3D ones
    as they are."""
    if position.shape[-1] == 3:
        return x, position
    return x.unsqueeze(1), F.pad(position, (1, 0))


def _loop_layouts(input, position, taps_per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the compiled loops take: the input channels-last (no copy for a channels-last map) and offset group
    0's positions as rows of `taps_per_row` taps, (b, positions x taps / taps_per_row, taps_per_row, dim)."""
    x = input.movedim(1, -1).contiguous()
    return x, position[:, 0].movedim(1, -2).reshape(input.shape[0], -1, taps_per_row, position.shape[-1])


def _depthwise_channels_last(input, position, weight) -> torch.Tensor:
    """The depthwise deformable convolution (no bias) of all taps at once, no sample stored: nothing to chunk or
    recompute; the output's memory channels-last."""
    b, c, n_taps, out_size = input.shape[0], input.shape[1], position.shape[2], position.shape[3:-1]
    x, position = _to_3d(*_loop_layouts(input, position, n_taps))  # a row: one output position's taps
    out = _Deform.apply(x, position.contiguous(), weight[:, 0].t().contiguous(), True)
    return out.view(b, *out_size, c).movedim(-1, 1)


def _taps_channels_last(input, position, mask, weight) -> torch.Tensor:
    """`_taps` on channels-last samples: row (p, t) of the samples holds the C channels of output position p's
    tap t, so the contraction with the weight is one matrix product, (positions, taps x C) @ (taps x C, c_out),
    whose result is the output's channels-last memory."""
    b, c_in, n_taps, out_size = input.shape[0], input.shape[1], position.shape[2], position.shape[3:-1]
    x, position = _loop_layouts(input, position, 1)  # a row: one sample
    sampled = _Deform.apply(x, position, x.new_ones(1, c_in), False).view(b, -1, n_taps, c_in)
    if mask is not None:
        sampled = sampled * mask[:, 0].flatten(2).transpose(1, 2).unsqueeze(-1).to(sampled.dtype)
    out = sampled.flatten(2) @ weight.permute(2, 1, 0).reshape(n_taps * c_in, -1)
    return out.view(b, *out_size, -1).movedim(-1, 1)


def _maps_per_group(maps: int, channels: int) -> int:
    """Into how many maps to split the `channels` of each of `maps` so that every CPU thread samples one: the
    largest divisor of `channels` up to the threads per map."""
    threads_per_map = -(-torch.get_num_threads() // maps)
    return max(d for d in range(1, min(threads_per_map, channels) + 1) if channels % d == 0)


def _positions(input, offset, taps_chunk: slice, geometry) -> torch.Tensor:
    """The sampling positions in input pixels of the taps in `taps_chunk`, (b, offset_groups, taps, *out_size, dim):
    the regular grid of each tap plus its offsets, in float32 at least, so positions stay exact under autocast."""
    size, out_size, kernel, stride, padding, dilation, groups = geometry
    n_taps, dim = offset.shape[2:4]
    dtype = torch.promote_types(input.dtype, torch.float32)
    tap_index = torch.arange(taps_chunk.start, taps_chunk.stop, device=input.device)
    axes = []
    for a in range(dim):
        tap = tap_index // math.prod(kernel[a + 1:]) % kernel[a]
        out = torch.arange(out_size[a], device=input.device)
        position = out * stride[a] - padding[a] + tap[:, None] * dilation[a]  # (n_taps, out_size[a])
        axes.append(position.view(n_taps, *(out_size[a] if i == a else 1 for i in range(dim))))
    regular = torch.stack(torch.broadcast_tensors(*axes), -1)
    return regular + offset.to(dtype).movedim(3, -1)


def _taps(input, offset, mask, weight, taps_chunk: slice, geometry) -> torch.Tensor:
    """The output contribution of the kernel taps in `taps_chunk`."""
    size, out_size, kernel, stride, padding, dilation, groups = geometry
    b, c_in = input.shape[:2]
    offset_groups, n_taps, dim = offset.shape[1:4]
    position = _positions(input, offset, taps_chunk, geometry)
    dtype = position.dtype
    if input.dim() == 5 and offset_groups == 1 and groups == 1 and _compiled(input):  # D-LKA Net's 3D one
        return _taps_channels_last(input, position, mask, weight)
    # grid_sample takes (x, y[, z]) scaled so that -1 and 1 are the outer edges of the input
    # (align_corners=False); bilinear sampling with zero padding then matches torchvision.
    extent = torch.tensor(size, dtype=dtype, device=input.device)
    grid = ((2 * position + 1) / extent - 1).flip(-1)
    grid = grid.reshape(b * offset_groups, 1, n_taps * out_size[0], *out_size[1:], dim)
    # PyTorch's CPU grid_sample works on the maps of a batch in parallel, one thread each: with fewer maps than
    # threads (an inference patch), the channels split into more maps that share one grid, so all threads sample.
    split = _maps_per_group(b * offset_groups, c_in // offset_groups) if input.device.type == "cpu" else 1
    grid = grid.expand(-1, split, *grid.shape[2:]).flatten(0, 1)
    with autocast_off(input.device):
        sampled = F.grid_sample(input.to(dtype).reshape(len(grid), c_in // offset_groups // split, *size), grid,
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
