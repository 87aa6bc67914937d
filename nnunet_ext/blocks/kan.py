"""Kolmogorov-Arnold layers and U-KAN's tokenized KAN block, for any spatial dimension.

Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", 2024
(seed 000). `KANLinear` has efficient-kan's constructor, parameter names, shapes and
initialisation (the layer the official U-KAN code trains), so its KAN weights load into ours.
docs/ukan.md lists every deviation from the paper and the official code.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
from dynamic_network_architectures.building_blocks.regularization import DropPath

from nnunet_ext.blocks import layers
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.ops.b_spline import (b_spline_bases, b_spline_linear, equally_spaced, fit_spline_coefficients,
                                      uniform_grid)
from nnunet_ext.ops.channels_last import depthwise_conv
from nnunet_ext.ops.linear import linear

TokenMixer = Literal["kan", "mlp"]  # KANLinear, or nn.Linear (the paper's ablation)
TOKEN_MIXERS = get_args(TokenMixer)


def _init_spline_weight(weight: torch.Tensor, grid: torch.Tensor, spline_order: int, scale_noise: float,
                        scale: float) -> None:
    """efficient-kan's spline initialisation: each (input, output) spline is fitted through small
    uniform noise, +-scale_noise / (2 grid_size), at the interior knots. weight: (out, in, bases, ...).
    Nothing to fit on the meta device, where networks are built without data to count them."""
    if weight.is_meta:
        return
    out_features, in_features = weight.shape[0], weight.shape[1] * math.prod(weight.shape[3:])
    # Taps of a convolution are further inputs sharing their channel's knots.
    grid = grid.repeat_interleave(in_features // grid.shape[0], dim=0)
    interior = grid[:, spline_order:-spline_order].T  # (grid_size + 1, in)
    grid_size = interior.shape[0] - 1
    noise = (torch.rand(grid_size + 1, in_features, out_features) - 0.5) * scale_noise / grid_size
    coefficients = fit_spline_coefficients(interior, noise, grid, spline_order)  # (out, in, bases)
    coefficients = coefficients.view(out_features, weight.shape[1], *weight.shape[3:], -1).movedim(-1, 2)
    weight.copy_(scale * coefficients)


class _KnotGrid(nn.Module):
    """A layer with B-spline knots in the buffer `grid` and `uniform`, whether they are equally spaced
    (`equally_spaced`), so that its bases take the closed form. `uniform` follows the grid when a state
    dict is loaded and when the layer changes dtype or device; a grid update sets it."""

    def _register_grid(self, grid: torch.Tensor) -> None:
        self.register_buffer("grid", grid)
        self.uniform = True  # as built by uniform_grid
        self.register_load_state_dict_post_hook(_grid_loaded)

    def _check_grid(self) -> None:
        if not self.grid.is_meta:  # nothing to check on the meta device, where networks are only counted
            self.uniform = equally_spaced(self.grid)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._check_grid()  # float32 knots cast to float64 are not equally spaced in float64
        return self


def _grid_loaded(module: _KnotGrid, incompatible_keys) -> None:
    module._check_grid()


class KANLinear(_KnotGrid):
    """y = W_base base_activation(x) + sum_i spline_i(x_i): a learnable B-spline from every input
    to every output, on a grid per input feature (efficient-kan's layer).

    Parameters `base_weight` (out, in), `spline_weight` (out, in, grid_size + spline_order),
    `spline_scaler` (out, in; if `enable_standalone_scale_spline`) and buffer `grid` (in,
    grid_size + 2 spline_order + 1), as in efficient-kan.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0,
                 enable_standalone_scale_spline: bool = True, base_activation: type[nn.Module] = nn.SiLU,
                 grid_eps: float = 0.02, grid_range: Sequence[float] = (-1, 1)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.enable_standalone_scale_spline, self.grid_eps = enable_standalone_scale_spline, grid_eps
        self._register_grid(uniform_grid(in_features, grid_size, spline_order, grid_range))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features)) \
            if enable_standalone_scale_spline else None
        self.base_activation = base_activation()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        _init_spline_weight(self.spline_weight, self.grid, self.spline_order, self.scale_noise,
                            1.0 if self.enable_standalone_scale_spline else self.scale_spline)
        if self.spline_scaler is not None:
            nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        if self.spline_scaler is None:
            return self.spline_weight
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """Bases at x (samples, in_features): (samples, in_features, grid_size + spline_order)."""
        return b_spline_bases(x, self.grid, self.spline_order, self.uniform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KANLinear expects {self.in_features} features in the last axis, got {tuple(x.shape)}.")
        leading = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        base = linear(self.base_activation(x), self.base_weight)
        # Bases in float32 at least; the product then follows autocast like any linear layer.
        out = b_spline_linear(x, self.grid, self.spline_order, self.scaled_spline_weight.flatten(1), base, self.uniform)
        return out.reshape(*leading, self.out_features)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """efficient-kan's grid update: move the knots to the quantiles of x (samples, in_features),
        blended with a uniform grid by `grid_eps`, and refit the splines so that the layer computes
        the same function on x as closely as least squares allows. Unlike efficient-kan we divide
        the refitted coefficients by `spline_scaler`, so a standalone scaler is not applied twice."""
        x = x.reshape(-1, self.in_features)
        samples, k = x.shape[0], self.spline_order
        splines = self.b_splines(x).transpose(0, 1)  # (in, samples, bases)
        curves = torch.bmm(splines, self.scaled_spline_weight.permute(1, 2, 0).to(splines.dtype))  # (in, samples, out)
        x_sorted = torch.sort(x.to(splines.dtype), dim=0).values
        quantiles = x_sorted[torch.linspace(0, samples - 1, self.grid_size + 1, dtype=torch.int64, device=x.device)]
        step = (x_sorted[-1] - x_sorted[0] + 2 * margin) / self.grid_size
        steps = torch.arange(self.grid_size + 1, dtype=x_sorted.dtype, device=x.device).unsqueeze(1)
        uniform = steps * step + x_sorted[0] - margin
        knots = self.grid_eps * uniform + (1 - self.grid_eps) * quantiles
        outer = torch.arange(1, k + 1, dtype=x_sorted.dtype, device=x.device).unsqueeze(1) * step
        knots = torch.cat([knots[:1] - outer.flip(0), knots, knots[-1:] + outer])
        self.grid.copy_(knots.T)
        self._check_grid()
        coefficients = fit_spline_coefficients(x, curves.transpose(0, 1), self.grid, k)
        if self.spline_scaler is not None:
            coefficients = coefficients / self.spline_scaler.unsqueeze(-1)
        self.spline_weight.copy_(coefficients)

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        """The KAN paper's sparsity regulariser as efficient-kan approximates it: the L1 norm of each
        spline's coefficients (not of its activations) summed, plus the entropy of their distribution."""
        l1 = self.spline_weight.abs().mean(-1)
        activation = l1.sum()
        p = l1 / activation
        entropy = -torch.sum(p * p.log())
        return regularize_activation * activation + regularize_entropy * entropy


class KANConv(_KnotGrid):
    """A KAN convolution: KANLinear over each receptive field, its inputs being every channel at
    every tap, each channel's taps sharing that channel's knots (seed 000's convolution with a
    conv weight plus B-spline weights).

    Since the bases are a function of one input value, they are computed once per voxel and the
    spline term is one ordinary convolution over the (channels x bases) basis maps; the input is
    zero-padded first, so border taps see B(0) exactly as KANLinear on a zero-padded patch would.
    In training the basis maps are recomputed in backward instead of stored: autograd keeps x,
    not maps (grid_size + spline_order) times its size. No bias: a norm follows it.
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0,
                 base_activation: type[nn.Module] = nn.SiLU, grid_range: Sequence[float] = (-1, 1)):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)

        def per_axis(v):
            return tuple(v) if isinstance(v, Sequence) else (v,) * dim

        kernel, self.stride, padding = per_axis(kernel_size), per_axis(stride), per_axis(padding)
        self.pad = [p for axis in reversed(padding) for p in (axis, axis)]  # F.pad order: last axis first
        self.conv = layers.convolution(dim)
        self.spline_order, self.scale_noise = spline_order, scale_noise
        self.scale_base, self.scale_spline = scale_base, scale_spline
        self._register_grid(uniform_grid(in_channels, grid_size, spline_order, grid_range))
        self.base_weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.spline_weight = nn.Parameter(torch.empty(out_channels, in_channels, grid_size + spline_order, *kernel))
        self.spline_scaler = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.base_activation = base_activation()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """KANLinear's initialisation with in_features = channels x taps."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        _init_spline_weight(self.spline_weight, self.grid, self.spline_order, self.scale_noise, 1.0)
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def _spline(self, x: torch.Tensor) -> torch.Tensor:
        bases = b_spline_bases(x.movedim(1, -1), self.grid, self.spline_order, self.uniform)  # (b, *size, c, bases)
        bases = bases.to(x.dtype)
        bases = bases.flatten(-2).movedim(-1, 1)  # channel-major: (b, c * bases, *size)
        weight = (self.spline_weight * self.spline_scaler.unsqueeze(2)).flatten(1, 2)
        return self.conv(bases, weight, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad)
        base = self.conv(self.base_activation(x), self.base_weight, stride=self.stride)
        if torch.is_grad_enabled():
            return base + checkpoint(self._spline, x, use_reentrant=False)
        return base + self._spline(x)


def _shifted(x: torch.Tensor, axis: int, groups: int, direction: int) -> torch.Tensor:
    """x (b, c, *size) with channel group g moved by direction * (g - groups // 2) positions along spatial
    `axis`, zeros filling; written into a channels-last map, the token rows a channel mixer reads."""
    dim, length = 2 + axis, x.shape[2 + axis]
    out = x.new_zeros(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)
    for g, (target, source) in enumerate(zip(out.tensor_split(groups, 1), x.tensor_split(groups, 1))):
        s = direction * (g - groups // 2)
        if abs(s) < length:  # else everything moves out
            target.narrow(dim, max(s, 0), length - abs(s)).copy_(source.narrow(dim, max(-s, 0), length - abs(s)))
    return out


class _ShiftTokens(torch.autograd.Function):
    """One copy forward and one backward: the shift's gradient is the opposite shift."""

    @staticmethod
    def forward(ctx, x, axis, groups):
        ctx.axis, ctx.groups = axis, groups
        return _shifted(x, axis, groups, 1)

    @staticmethod
    def backward(ctx, grad):
        return _shifted(grad, ctx.axis, ctx.groups, -1), None, None


def shift_tokens(x: torch.Tensor, axis: int, groups: int = 5) -> torch.Tensor:
    """UNeXt's token shift: split the channels of x (b, c, *size) into `groups` and move group g by
    g - groups // 2 positions along spatial `axis`, filling with zeros. The result is channels-last in memory,
    so that its token rows (b, *size, c) are a view (a concatenation, then the rows, took three copies)."""
    return _ShiftTokens.apply(x, axis, groups)


def _official_linear(channels: int) -> nn.Linear:
    """The MLP ablation's token mixer with the official code's initialisation (truncated normal,
    std 0.02, zero bias)."""
    layer = nn.Linear(channels, channels)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class TokenizedKANLayer(nn.Module):
    """Three times: shift the tokens along the next spatial axis, a token-wise KANLinear (or
    nn.Linear: `token_mixer="mlp"`, the paper's ablation), a depthwise 3^d convolution, norm and
    nonlinearity. Tokens are the positions of a (b, c, *size) feature map."""

    def __init__(self, conv_op: type[nn.Module], channels: int, token_mixer: TokenMixer = "kan",
                 token_shift: bool = True, norm_op=None, norm_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 **kan_kwargs):
        super().__init__()
        if token_mixer not in TOKEN_MIXERS:
            raise ConfigurationError(f"must be one of {TOKEN_MIXERS}, got {token_mixer!r}.", "token_mixer")
        self.dim = convert_conv_op_to_dim(conv_op)
        self.token_shift = token_shift
        self.fc = nn.ModuleList(KANLinear(channels, channels, **kan_kwargs) if token_mixer == "kan"
                                else _official_linear(channels) for _ in range(3))

        def dwconv():
            return nn.Sequential(conv_op(channels, channels, 3, padding=1, groups=channels),
                                 layers.norm(norm_op, norm_op_kwargs, channels),
                                 layers.nonlinearity(nonlin, nonlin_kwargs))

        self.dwconv = nn.ModuleList(dwconv() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (fc, dwconv) in enumerate(zip(self.fc, self.dwconv)):
            if self.token_shift:
                x = shift_tokens(x, i % self.dim)
            convolve, norm_and_nonlin = dwconv[0], dwconv[1:]
            # fc's tokens moved back are a channels-last map, which depthwise_conv takes as it is (3D, CPU)
            x = norm_and_nonlin(depthwise_conv(convolve, fc(x.movedim(1, -1)).movedim(-1, 1)))
        return x


class TokenizedKANBlock(nn.Module):
    """U-KAN's KAN block: x + DropPath(TokenizedKANLayer(LayerNorm(x)))."""

    def __init__(self, conv_op: type[nn.Module], channels: int, drop_path: float = 0.0, **layer_kwargs):
        super().__init__()
        self.norm = LayerNormNd(channels, eps=1e-5)
        self.layer = TokenizedKANLayer(conv_op, channels, **layer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer(self.norm(x)))


def kan_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters U-KAN's recipe trains with the KAN learning rate: every KAN layer's and,
    as the official code selects them by name, the token mixers' in the MLP ablation too."""
    layers = [m for m in module.modules() if isinstance(m, (KANLinear, KANConv))]
    layers += [fc for m in module.modules() if isinstance(m, TokenizedKANLayer) for fc in m.fc]
    return list({id(p): p for layer in layers for p in layer.parameters()}.values())
