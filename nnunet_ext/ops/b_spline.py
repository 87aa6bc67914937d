"""B-spline bases for Kolmogorov-Arnold layers, by the Cox-de Boor recursion, vectorised.

A KAN layer (Liu et al., "KAN: Kolmogorov-Arnold Networks", 2024) learns one spline per input
feature and output. Its splines live on a knot vector per input feature, `grid` of shape
(in_features, n_knots); the order-k bases over it are the n_knots - k - 1 functions

    B_i,0(x) = 1 if t_i <= x < t_i+1 else 0
    B_i,k(x) = w_i,k(x) B_i,k-1(x) + (1 - w_i+1,k(x)) B_i+1,k-1(x),  w_i,k(x) = (x - t_i) / (t_i+k - t_i)

(w = 0 where two knots coincide). On [t_k, t_n-k) they sum to one. `b_spline_bases` evaluates all
of them at once, in at least float32 whatever the autocast dtype, and its backward recomputes the
order-(k-1) bases from x and differentiates with dB_i,k/dx = k (B_i,k-1 / (t_i+k - t_i) -
B_i+1,k-1 / (t_i+k+1 - t_i+1)): autograd keeps only x instead of every intermediate of the recursion.

On equally spaced knots (a KAN layer's, until a grid update moves them) only the k + 1 bases of the
interval holding x are nonzero, and they are the same polynomials in x's position u within it on every
interval: [1, u, ..., u^k] times one (k + 1) x (k + 1) matrix. `b_spline_bases(..., uniform=True)`
evaluates those and places them, instead of running the recursion over every basis: the same numbers in
less than half the time (docs/ukan.md).

A KAN layer multiplies its bases by its spline weights at once. `b_spline_linear` is that product; on the
CPU it forms the bases a few rows at a time (`chunks.in_chunks`), so that they are never all held, and multiplies
them by oneDNN where that is faster than PyTorch's sgemm (`linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_ext.ops import cpu_kernel, linear
from nnunet_ext.ops.chunks import in_chunks
from nnunet_ext.ops.precision import autocast_off


def uniform_grid(features: int, grid_size: int, spline_order: int, grid_range=(-1.0, 1.0)) -> torch.Tensor:
    """Knots of `grid_size` equal intervals over `grid_range`, extended by `spline_order` intervals
    on each side so every point of the range has a full set of bases; (features, n_knots)."""
    low, high = grid_range
    step = (high - low) / grid_size
    knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + low
    return knots.expand(features, -1).contiguous()


def _inverse_spans(grid: torch.Tensor, k: int) -> torch.Tensor:
    """1 / (t_i+k - t_i), with 0 where the knots coincide (the recursion's 0/0 = 0 convention)."""
    span = grid[:, k:] - grid[:, :-k]
    return torch.where(span > 0, 1 / span.clamp_min(torch.finfo(span.dtype).tiny), torch.zeros_like(span))


def cox_de_boor(x: torch.Tensor, grid: torch.Tensor, order: int) -> torch.Tensor:
    """Order-`order` bases at x (..., features): (..., features, n_knots - order - 1). Autograd
    through this keeps every step of the recursion; `b_spline_bases` keeps only x."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for k in range(1, order + 1):
        w = (x - grid[:, :-k]) * _inverse_spans(grid, k)  # w_i,k for every i
        bases = w[..., :-1] * bases[..., :-1] + (1 - w[..., 1:]) * bases[..., 1:]
    return bases


class _BSplineBases(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, order):
        ctx.save_for_backward(x, grid)
        ctx.order = order
        return cox_de_boor(x, grid, order)

    @staticmethod
    def backward(ctx, grad):
        x, grid = ctx.saved_tensors
        k = ctx.order
        if k == 0 or not ctx.needs_input_grad[0]:  # piecewise constant: zero derivative almost everywhere
            return torch.zeros_like(x) if ctx.needs_input_grad[0] else None, None, None
        lower = cox_de_boor(x, grid, k - 1)
        scaled = k * _inverse_spans(grid, k) * lower
        derivative = scaled[..., :-1] - scaled[..., 1:]
        return (grad * derivative).sum(-1), None, None


def equally_spaced(grid: torch.Tensor) -> bool:
    """Whether the knots of every feature (row of `grid`) are equally spaced, up to the rounding of the
    grid's dtype: where `b_spline_bases(..., uniform=True)` computes what the recursion computes, to
    that rounding. (uniform_grid's float32 knots are; the same knots in float64 are not.)"""
    steps = grid.diff(dim=1)
    rounding = 8 * torch.finfo(grid.dtype).eps * grid.abs().amax(1, keepdim=True)
    return bool((steps[:, :1] > 0).all() and ((steps - steps[:, :1]).abs() <= rounding).all())


def _fit_uniform_basis_matrix(order: int) -> torch.Tensor:
    """M with [1, u, ..., u^k] @ M = the k + 1 order-k bases that are nonzero on one interval of
    equally spaced knots, at position u in [0, 1) within it (the lowest-indexed basis first): fitted
    exactly, in float64, to the recursion at k + 1 points."""
    grid = torch.arange(2 * order + 2, dtype=torch.float64).unsqueeze(0)  # bases 0..k are nonzero on [k, k+1)
    u = torch.linspace(0, 1, order + 2, dtype=torch.float64)[:-1]
    values = cox_de_boor((u + order).unsqueeze(-1), grid, order)[:, 0]  # (points, k + 1)
    powers = u.unsqueeze(-1) ** torch.arange(order + 1, dtype=torch.float64)
    return torch.linalg.solve(powers, values)


# Fitted here, once: a network compiled with torch.compile then reads constants instead of tracing the fit.
_BASIS_MATRICES = {order: _fit_uniform_basis_matrix(order) for order in range(6)}


def _uniform_basis_matrix(order: int) -> torch.Tensor:
    if order not in _BASIS_MATRICES:
        _BASIS_MATRICES[order] = _fit_uniform_basis_matrix(order)
    return _BASIS_MATRICES[order]


def _interval_positions(x: torch.Tensor, grid: torch.Tensor, order: int):
    """For x (..., features) on equally spaced knots: the powers [1, u, ..., u^k] of its position u in its
    interval m (..., features, k + 1), the indices m - k .. m of that interval's bases, clamped to the bases
    that exist, and whether each is a real basis of x's interval (1, or 0 for a clamped index and for x
    outside the knots)."""
    intervals = grid.shape[1] - 1
    position = (x - grid[:, 0]) / _step(grid)
    inside = (position >= 0) & (position < intervals)
    cell = torch.where(inside, position.floor(), intervals)  # outside (NaN included): the row of no bases
    u = position - cell
    powers = [torch.ones_like(u), u]
    while len(powers) <= order:  # products: faster than pow
        powers.append(powers[-1] * u)
    indices, valid = _interval_bases(intervals, order, x.device)
    rows = cell.long().flatten()  # index_select: advanced indexing is several times slower here
    return (torch.stack(powers[:order + 1], -1), indices.index_select(0, rows).view(*x.shape, order + 1),
            valid.to(x.dtype).index_select(0, rows).view(*x.shape, order + 1))


def _interval_bases(intervals: int, order: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per interval m, and one row more for no interval: the indices m - k .. m of its bases clamped to the
    n_knots - k - 1 that exist, and which of them exist ((intervals + 1, k + 1) each)."""
    bases = torch.arange(intervals + 1, device=device).unsqueeze(1) + torch.arange(-order, 1, device=device)
    n_bases = intervals - order
    valid = (bases >= 0) & (bases < n_bases)
    valid[-1] = False
    return bases.clamp(0, n_bases - 1), valid


def _step(grid: torch.Tensor) -> torch.Tensor:
    """The knot spacing per feature, from the whole span: closer to the exact spacing than one rounded step."""
    return (grid[:, -1] - grid[:, 0]) / (grid.shape[1] - 1)


def _compiled(x: torch.Tensor) -> bool:
    """Whether the compiled CPU loop computes the closed form for x: float32 on the CPU, where a C compiler
    built it, and not while torch.compile traces (it cannot trace a ctypes call; inductor fuses the
    PyTorch formulation instead)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and cpu_kernel.cpu_kernel_available())


def _kernel_arguments(x: torch.Tensor, grid: torch.Tensor, order: int):
    """x as (rows, features), the knots' start and spacing, the basis matrix and the number of intervals."""
    return (x.reshape(-1, x.shape[-1]).contiguous(), grid[:, 0].contiguous(), _step(grid).contiguous(),
            _uniform_basis_matrix(order).float().contiguous(), grid.shape[1] - 1)


class _UniformBSplineBases(torch.autograd.Function):
    """`cox_de_boor` on equally spaced knots, by the interval's polynomials; differentiated the same way.

    On the CPU a compiled loop (csrc/b_spline.c) writes each point's bases once and reads their gradient the
    same way. PyTorch's formulation adds the k + 1 values into zeroed bases at their clamped indices, a
    clamped index adding 0; its int64 indices are the largest arrays it forms."""

    @staticmethod
    def forward(ctx, x, grid, order):
        ctx.save_for_backward(x, grid)
        ctx.order = order
        if _compiled(x):
            return cpu_kernel.b_spline_forward(*_kernel_arguments(x, grid, order)).view(*x.shape, -1)
        with autocast_off(x.device):  # the product in x's float32, not autocast's half precision (as the loop)
            powers, indices, valid = _interval_positions(x, grid, order)
            values = (powers @ _uniform_basis_matrix(order).to(x)) * valid  # times 0, not masked: NaN stays NaN
        return x.new_zeros(*x.shape, grid.shape[1] - order - 1).scatter_add_(-1, indices, values)

    @staticmethod
    def backward(ctx, grad):
        x, grid = ctx.saved_tensors
        k = ctx.order
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if _compiled(x):
            rows = grad.reshape(-1, *grad.shape[-2:])
            return cpu_kernel.b_spline_backward(*_kernel_arguments(x, grid, k), rows).view(x.shape), None, None
        with autocast_off(x.device):
            powers, indices, valid = _interval_positions(x, grid, k)
            # d/du of [1, u, ..., u^k] is [0, 1, 2u, ..., k u^(k-1)]: only the rows of M from the second on.
            slopes = (powers[..., :-1] * torch.arange(1, k + 1, dtype=x.dtype, device=x.device)) \
                @ _uniform_basis_matrix(k)[1:].to(x)
        return (grad.gather(-1, indices) * slopes * valid).sum(-1) / _step(grid), None, None


# A chunk's loop runs on the calling thread: it is bound by the cache's bandwidth, which a second thread does not
# add to (1024 rows of 64 features: 10.4 ms on two threads, 10.6 ms on one), and each hand-off to another thread
# costs about 0.1 ms.
_LOOP_THREADS = 1


class _BSplineLinear(torch.autograd.Function):
    """`b_spline_linear` on the compiled CPU loop, the bases of a few rows at a time: they are never all held,
    and backward forms them again instead of keeping them (autograd keeps x, 1 / n_bases of their size)."""

    @staticmethod
    def forward(ctx, x, grid, order, weight, base):
        rows, *knots = _kernel_arguments(x, grid, order)
        out = torch.empty_like(base)
        for chunk, (bases,) in in_chunks(rows.shape[0], weight.shape[1]):
            cpu_kernel.b_spline_forward(rows[chunk], *knots, out=bases, threads=_LOOP_THREADS)
            linear.addmm(base[chunk], bases, weight, out=out[chunk])
        ctx.save_for_backward(rows, grid, weight)
        ctx.order = order
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, grid, weight = ctx.saved_tensors
        _, *knots = _kernel_arguments(rows, grid, ctx.order)
        grad = grad.contiguous()
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        for chunk, (bases,) in in_chunks(rows.shape[0], weight.shape[1]):
            if grad_weight is not None:
                cpu_kernel.b_spline_forward(rows[chunk], *knots, out=bases, threads=_LOOP_THREADS)  # the bases again
            grad_bases, chunk_grad_weight = linear.linear_backward(grad[chunk], bases, weight, grad_x is not None,
                                                                   grad_weight is not None)
            if grad_weight is not None:
                grad_weight += chunk_grad_weight
            if grad_x is not None:
                cpu_kernel.b_spline_backward(rows[chunk], *knots, grad_bases, out=grad_x[chunk], threads=_LOOP_THREADS)
        return grad_x, None, None, grad_weight, grad


def b_spline_linear(x: torch.Tensor, grid: torch.Tensor, spline_order: int, weight: torch.Tensor,
                    base: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """A KAN layer's spline term added to `base`: base + b_spline_bases(x, ...).flatten(1) @ weight.T, for x
    (rows, features), weight (out, features x n_bases) and base (rows, out).

    On the CPU in float32 with equally spaced knots (and no autocast, which would take the product to half
    precision) the compiled loop forms the bases of a few rows at a time for the product, in forward and again
    in backward: the same numbers, faster, and the bases are never held. Elsewhere (CUDA, torch.compile, the
    meta device where networks are counted) the bases are formed whole and multiplied in x's dtype."""
    if (uniform and _compiled(x) and weight.dtype == base.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)):
        return _BSplineLinear.apply(x, grid, spline_order, weight, base)
    return base + F.linear(b_spline_bases(x, grid, spline_order, uniform).to(x.dtype).flatten(1), weight)


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, spline_order: int, uniform: bool = False) -> torch.Tensor:
    """All B-spline bases of order `spline_order` on the knots `grid` (features, n_knots), at
    x (..., features). Returns (..., features, n_knots - spline_order - 1) in float32, or in
    x's dtype if that is wider; differentiable in x (not in the knots). `uniform`: the caller knows that
    every feature's knots are equally spaced (`equally_spaced`), and the bases come from the closed form."""
    # Overridable like torch's own functions, so that a TorchFunctionMode sees each call with its
    # result: nnunet_ext.tools.memory counts the bases a network forms this way.
    if torch.overrides.has_torch_function((x, grid)):
        return torch.overrides.handle_torch_function(b_spline_bases, (x, grid), x, grid, spline_order, uniform)
    if grid.dim() != 2 or x.shape[-1] != grid.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features in its last axis but the grid has knots for "
                         f"{grid.shape[0] if grid.dim() == 2 else 'no'} features (shape {tuple(grid.shape)}).")
    dtype = torch.promote_types(x.dtype, torch.float32)
    bases = _UniformBSplineBases if uniform else _BSplineBases
    return bases.apply(x.to(dtype), grid.to(dtype), spline_order)


def fit_spline_coefficients(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """Least-squares spline coefficients, per input feature, of the curves sampled as y at x.

    x: (samples, in_features); y: (samples, in_features, out_features). Returns
    (out_features, in_features, n_bases): the layout of KANLinear's `spline_weight`.
    """
    bases = b_spline_bases(x, grid, spline_order).transpose(0, 1)  # (in, samples, bases)
    solution = torch.linalg.lstsq(bases, y.transpose(0, 1).to(bases.dtype)).solution  # (in, bases, out)
    return solution.permute(2, 0, 1)
