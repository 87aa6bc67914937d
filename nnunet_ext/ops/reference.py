"""Operators written out the plain way: the yardsticks for tests and benchmarks.

Deliberately naive and independent of the fast implementations in this package; they compute in
the dtype they are given (tests use float64).
- `selective_scan_loop`: a Python loop over the sequence, autograd through every step.
- `deform_conv_unfused`: the column-matrix (im2col) deformable convolution, with the bilinear or
  trilinear interpolation spelled out corner by corner instead of `grid_sample`.
- `kan_linear_per_feature`: KANLinear one input feature and one basis at a time, each basis from
  the textbook Cox-de Boor recursion (`b_spline_basis`).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same arguments as `selective_scan_fn`; returns (out, last_state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d, _ = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    B, C = (t.repeat_interleave(d // t.shape[1], dim=1) for t in (B, C))  # (batch, d, n, length)
    h = u.new_zeros(batch, d, A.shape[1])
    ys = []
    # unbind once: indexing one position per step would make backward quadratic in the length
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def deform_conv_unfused(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Same arguments and offset layout as `nnunet_ext.ops.deform_conv` (and torchvision's
    `deform_conv2d`). Builds the full (batch, channels x taps, positions) column matrix, so it holds
    one copy of the sampled input per kernel tap."""
    dim = weight.dim() - 2
    stride, padding, dilation = ((v,) * dim if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation))
    b, c_in, *size = input.shape
    c_out, c_per_group, *kernel = weight.shape
    out_size = list(offset.shape[2:])
    taps = math.prod(kernel)
    offset_groups = offset.shape[1] // (dim * taps)
    offset = offset.view(b, offset_groups, taps, dim, -1)
    values = input.reshape(b, offset_groups, c_in // offset_groups, -1)
    out_grid = torch.stack(torch.meshgrid(*(torch.arange(o) for o in out_size), indexing="ij"), 0).flatten(1)
    columns = []
    for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
        regular = torch.stack([out_grid[a] * stride[a] - padding[a] + tap[a] * dilation[a] for a in range(dim)])
        position = regular.to(input.dtype) + offset[:, :, t]  # (b, offset_groups, dim, positions)
        low = position.floor()
        sample = 0
        for corner in itertools.product((0, 1), repeat=dim):
            index, weight_c, inside = 0, 1, True
            for a in range(dim):
                i = low[:, :, a] + corner[a]
                frac = position[:, :, a] - low[:, :, a]
                weight_c = weight_c * (frac if corner[a] else 1 - frac)
                inside = inside & (i >= 0) & (i <= size[a] - 1)
                index = index * size[a] + i.clamp(0, size[a] - 1).long()
            gathered = values.gather(3, index[:, :, None].expand(-1, -1, values.shape[2], -1))
            sample = sample + gathered * (weight_c * inside)[:, :, None]
        if mask is not None:
            sample = sample * mask.view(b, offset_groups, taps, -1)[:, :, t, None]
        columns.append(sample.reshape(b, c_in, -1))
    columns = torch.stack(columns, 2)  # (b, c_in, taps, positions)
    groups = c_in // c_per_group
    columns = columns.view(b, groups, c_per_group * taps, -1)
    out = torch.einsum("gok,bgkn->bgon", weight.reshape(groups, c_out // groups, -1), columns)
    out = out.reshape(b, c_out, *out_size)
    return out if bias is None else out + bias.view(1, -1, *(1,) * dim)


def b_spline_basis(x, knots, i: int, k: int):
    """B_i,k at the points x (1-D) on the 1-D knot vector `knots`, by the recursive definition."""
    if k == 0:
        return ((knots[i] <= x) & (x < knots[i + 1])).to(x.dtype)
    value = torch.zeros_like(x)
    if knots[i + k] != knots[i]:
        value = value + (x - knots[i]) / (knots[i + k] - knots[i]) * b_spline_basis(x, knots, i, k - 1)
    if knots[i + k + 1] != knots[i + 1]:
        value = value + (knots[i + k + 1] - x) / (knots[i + k + 1] - knots[i + 1]) * b_spline_basis(x, knots, i + 1, k - 1)
    return value


def kan_linear_per_feature(x, base_weight, spline_weight, grid, spline_order: int, base_activation=F.silu):
    """KANLinear's output for x (samples, in): sum over input features i of
    base_weight[:, i] * base_activation(x_i) + sum_j spline_weight[:, i, j] * B_j(x_i), with
    `spline_weight` already scaled by any standalone scaler."""
    out = x.new_zeros(x.shape[0], base_weight.shape[0])
    for i in range(x.shape[1]):
        out = out + base_activation(x[:, i, None]) * base_weight[:, i]
        for j in range(spline_weight.shape[2]):
            out = out + b_spline_basis(x[:, i], grid[i], j, spline_order)[:, None] * spline_weight[:, i, j]
    return out
