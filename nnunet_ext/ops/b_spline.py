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
"""

from __future__ import annotations

import torch


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


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """All B-spline bases of order `spline_order` on the knots `grid` (features, n_knots), at
    x (..., features). Returns (..., features, n_knots - spline_order - 1) in float32, or in
    x's dtype if that is wider; differentiable in x (not in the knots)."""
    # Overridable like torch's own functions, so that a TorchFunctionMode sees each call with its
    # result: nnunet_ext.tools.memory counts the bases a network forms this way.
    if torch.overrides.has_torch_function((x, grid)):
        return torch.overrides.handle_torch_function(b_spline_bases, (x, grid), x, grid, spline_order)
    if grid.dim() != 2 or x.shape[-1] != grid.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features in its last axis but the grid has knots for "
                         f"{grid.shape[0] if grid.dim() == 2 else 'no'} features (shape {tuple(grid.shape)}).")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return _BSplineBases.apply(x.to(dtype), grid.to(dtype), spline_order)


def fit_spline_coefficients(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """Least-squares spline coefficients, per input feature, of the curves sampled as y at x.

    x: (samples, in_features); y: (samples, in_features, out_features). Returns
    (out_features, in_features, n_bases): the layout of KANLinear's `spline_weight`.
    """
    bases = b_spline_bases(x, grid, spline_order).transpose(0, 1)  # (in, samples, bases)
    solution = torch.linalg.lstsq(bases, y.transpose(0, 1).to(bases.dtype)).solution  # (in, bases, out)
    return solution.permute(2, 0, 1)
