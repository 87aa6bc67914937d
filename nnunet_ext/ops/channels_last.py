"""Depthwise 3D convolutions (MedNeXt's, LKA's, U-KAN's; strided and transposed: MedNeXt's down and up blocks) at
oneDNN's forward speed on the CPU, backward too; a GroupNorm (MedNeXt's, one group per channel) that stays
exact on the channels-last maps they give, 2D ones too; and MedNeXt's pointwise MLP (1x1 expansion, GELU, 1x1
compression), which in training on such maps keeps no expanded map (`pointwise_mlp`).

On the CPU, oneDNN's depthwise 3D convolution is fast forward on channels-last maps (3.3 ms against 44 ms on
channels-first ones at 2x32x40x48x48, kernel 3) but its backward is not: the input gradient takes some ten
times the forward and the weight gradient twenty. `depthwise_conv` runs such a convolution on channels-last maps
and, in training on float32 CPU tensors, differentiates it itself (`_DepthwiseConv`): the input gradient of a
convolution is the transposed convolution of the output gradient, and that of a transposed convolution the
convolution; the weight gradient is the compiled loop `cpu_kernel.depthwise_grad_weight` (9 ms at that shape,
against oneDNN's 72). A transposed convolution is computed as a convolution of stride 1 with the kernel flipped,
over its input spread onto a zero map at the stride: oneDNN's fast forward again. The numbers are the
convolution's up to the order of the sums (tests/test_channels_last.py checks both gradients against float64).
In 2D oneDNN's kernels are fast on either layout (its weight gradient beat the loop, 0.15 ms against 0.42 at
2x32x96x80): 2D convolutions run as they are.

PyTorch's CPU GroupNorm loses the variance of a channels-last map to cancellation (torch 2.14): on channels of
mean 3 and deviation 0.01 its output is off by up to 17 from float64's, against 7e-5 on the channels-first map.
`group_norm` normalises such maps itself (one group per channel: `_ChannelNorm`, the variance in two passes),
or a channels-first copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from nnunet_ext.ops import chunks, cpu_kernel, linear


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 2D or 3D map in channels-last memory (itself if it is)."""
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _strided(x, weight, bias, stride, padding, dilation):
    """The depthwise convolution of x: oneDNN's fast channels-last forward."""
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


@torch.library.custom_op("nnunet_ext::depthwise_conv_transpose3d", mutates_args=())
def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], size: list[int]) -> torch.Tensor:
    """The depthwise transposed convolution of x with output positions `size`: x spread onto a zero map at
    `stride`, convolved at stride 1 with the kernel flipped. One operator to torch, so that FlopCounterMode
    counts the transposed convolution's arithmetic (`_transposed_flops`), not the spread map's."""
    kernel = weight.shape[2:]
    outer = [d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation)]  # the padding around the spread map
    spread_size = [n - 2 * o + d * (k - 1) for n, o, d, k in zip(size, outer, dilation, kernel)]
    spread = x
    if any(s != 1 for s in stride) or spread_size != list(x.shape[2:]):
        spread = x.new_zeros(x.shape[0], *spread_size, x.shape[1]).permute(0, 4, 1, 2, 3)  # channels-last
        spread[(..., *(slice(0, (n - 1) * s + 1, s) for n, s in zip(x.shape[2:], stride)))] = x
    return _strided(spread, weight.flip([2, 3, 4]), bias, 1, outer, dilation)


def _forward(x, weight, bias, stride, padding, dilation, size):
    """The depthwise convolution of x, or with `size` (its output positions) the transposed one."""
    if size is None:
        return _strided(x, weight, bias, stride, padding, dilation)
    return _transposed(x, weight, bias, stride, padding, dilation, size)


@register_flop_formula(torch.ops.nnunet_ext.depthwise_conv_transpose3d)
def _transposed_flops(x_shape, w_shape, *_, out_shape, **__) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=True)


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise 3D convolution of a channels-last float32 CPU map x, or with `size` (its output positions) the
    transposed one, differentiated as the module docstring says: the input gradient of the one is the other,
    the weight gradient the compiled loop."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, size):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.transposed, ctx.bias = (stride, padding, dilation), size is not None, bias is not None
        return _forward(x, weight, bias, stride, padding, dilation, size)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = to_channels_last(grad)
        geometry, kernel = ctx.geometry, tuple(weight.shape[2:])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (_strided(grad, weight, None, *geometry) if ctx.transposed
                      else _transposed(grad, weight, None, *geometry, list(x.shape[2:])))
        if ctx.needs_input_grad[1]:
            larger, smaller = (grad, x) if ctx.transposed else (x, grad)
            grad_weight = cpu_kernel.depthwise_grad_weight(larger, smaller, kernel, *geometry)
        if ctx.bias and ctx.needs_input_grad[2]:
            grad_bias = _rows(grad).sum((0, 1))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def depthwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a depthwise nn.Conv3d or nn.ConvTranspose3d (as many groups as channels, in and out) with zero
    padding; on the CPU on channels-last maps, the result channels-last too. Any other convolution or device,
    and any convolution under torch.compile, is conv(x)."""
    transposed = isinstance(conv, nn.ConvTranspose3d)
    depthwise = (isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) and conv.padding_mode == "zeros"
                 and conv.groups == conv.in_channels == conv.out_channels and not isinstance(conv.padding, str))
    if not depthwise or x.device.type != "cpu" or torch.compiler.is_compiling():  # inductor picks its own layouts
        return conv(x)
    x = to_channels_last(x)
    # float32 outside autocast, and a flipped kernel that needs no negative padding
    if not (x.dtype == conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and all(p <= d * (k - 1) for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))):
        return conv(x)
    size = None
    if transposed:
        size = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                zip(x.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size, conv.output_padding)]
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation))
    if not torch.is_grad_enabled():
        return _forward(x, conv.weight, conv.bias, *geometry, size)
    if cpu_kernel.cpu_kernel_available():
        return _DepthwiseConv.apply(x, conv.weight, conv.bias, *geometry, size)
    return conv(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last map (N, C, *spatial) as the (N, positions, C) matrix its memory is, without a copy."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`_rows`' inverse: (N, positions, C) back to a channels-last map shaped as `like`."""
    n, c, *spatial = like.shape
    return rows.view(n, *spatial, c).movedim(-1, 1)


class _ChannelNorm(torch.autograd.Function):
    """GroupNorm with one group per channel (affine) of a channels-last float32 3D map, channels-last out: the
    mean, then the variance as the mean of squared deviations (two passes: no cancellation), then x * scale +
    shift; backward with the sums of PyTorch's own GroupNorm backward. It reduces over the positions of the
    (N, positions, C) matrix the map's memory is: PyTorch's reductions over a channels-last map's spatial axes
    take four times as long."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = _rows(x)
        mean = rows.mean(1, keepdim=True)
        rstd = ((rows - mean).square().mean(1, keepdim=True) + eps).rsqrt()
        scale = rstd * weight
        ctx.save_for_backward(x, weight, mean, rstd)
        return _map(torch.addcmul(bias - mean * scale, rows, scale), x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        rows, grad_rows = _rows(x), _rows(to_channels_last(grad))
        sum_grad = grad_rows.sum(1, keepdim=True)
        sum_grad_normalised = ((grad_rows * rows).sum(1, keepdim=True) - mean * sum_grad) * rstd  # of grad * x-hat
        # grad_x = a grad + b x + c per sample and channel (the GroupNorm backward written out)
        count = rows.shape[1]
        a = rstd * weight
        b = -a * rstd * sum_grad_normalised / count
        c = -a * sum_grad / count - b * mean
        grad_x = torch.addcmul(c, rows, b).addcmul_(grad_rows, a)
        return _map(grad_x, x), sum_grad_normalised.sum((0, 1)), sum_grad.sum((0, 1)), None


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x), exact on channels-last CPU maps, 2D or 3D (module docstring): with one group per channel,
    `_ChannelNorm` for float32 outside autocast and torch.compile; else the norm of a channels-first copy. Any
    other map: norm(x)."""
    channels_last = (x.device.type == "cpu" and x.dim() in (4, 5) and not x.is_contiguous()
                     and x.movedim(1, -1).is_contiguous())
    if not channels_last:
        return norm(x)
    if (norm.num_groups == norm.num_channels and norm.affine and x.dtype == norm.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return _ChannelNorm.apply(x, norm.weight, norm.bias, norm.eps)
    return norm(x.contiguous())


class _PointwiseMLP(torch.autograd.Function):
    """`pointwise_mlp` on the (positions, channels) rows of a channels-last map, `chunks.slices` at a time: each
    chunk's expanded rows are formed, activated in place and compressed from the cache, the products by oneDNN
    where it is faster (`linear`). Autograd keeps the input rows; backward forms each chunk's expanded rows again,
    one product more than the layers' backward (seven in all instead of six, on rows that stay in the cache)."""

    @staticmethod
    def forward(ctx, rows, weight_in, bias_in, weight_out, bias_out):
        out = rows.new_empty(rows.shape[0], weight_out.shape[0])
        for chunk in chunks.slices(rows.shape[0], weight_in.shape[0]):
            hidden = torch.ops.aten.gelu_(linear.addmm(bias_in, rows[chunk], weight_in))
            linear.addmm(bias_out, hidden, weight_out, out=out[chunk])
        ctx.save_for_backward(rows, weight_in, bias_in, weight_out)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, weight_in, bias_in, weight_out = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight_in, grad_bias_in, grad_weight_out = map(torch.zeros_like, (weight_in, bias_in, weight_out))
        width = weight_in.shape[0]
        for chunk in chunks.slices(rows.shape[0], width, width):
            hidden = linear.addmm(bias_in, rows[chunk], weight_in)  # the expanded rows again
            activated = torch.ops.aten.gelu(hidden)
            grad_activated, chunk_grad_weight = linear.linear_backward(grad[chunk], activated, weight_out)
            grad_weight_out += chunk_grad_weight
            grad_hidden = torch.ops.aten.gelu_backward.grad_input(grad_activated, hidden, grad_input=hidden)
            chunk_grad_rows, chunk_grad_weight = linear.linear_backward(grad_hidden, rows[chunk], weight_in,
                                                                        grad_rows is not None)
            grad_weight_in += chunk_grad_weight
            grad_bias_in += grad_hidden.sum(0)
            if grad_rows is not None:
                grad_rows[chunk] = chunk_grad_rows
        return grad_rows, grad_weight_in, grad_bias_in, grad_weight_out, grad.sum(0)


def _pointwise(conv: nn.Module) -> bool:
    """Whether `conv` is a plain 1x1 convolution with a bias: a matrix product over every position's channels."""
    return (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and conv.bias is not None and conv.groups == 1
            and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
            and not isinstance(conv.padding, str) and all(p == 0 for p in conv.padding))


def pointwise_mlp(expand: nn.Module, act: nn.Module, compress: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """compress(act(expand(x))) for 1x1 convolutions around an exact GELU: MedNeXt's block after its norm.

    In training on a channels-last float32 CPU map (outside autocast and torch.compile, with the CPU paths
    allowed: `cpu_kernel.cpu_paths_enabled`) the expanded maps, `expand`'s channels at every position before and
    after the GELU, are not kept for backward: `_PointwiseMLP` forms them a few rows at a time in the cache, in
    forward and again in backward (the chunks module's docstring says why). The same numbers up to the order of
    the sums, the result channels-last. Anything else, inference included (where nothing is kept and the
    layers measured as fast): the modules."""
    fused = (torch.is_grad_enabled() and x.device.type == "cpu"
             and x.dtype == expand.weight.dtype == compress.weight.dtype == torch.float32
             and x.dim() == expand.weight.dim() and x.movedim(1, -1).is_contiguous()
             and isinstance(act, nn.GELU) and act.approximate == "none" and _pointwise(expand) and _pointwise(compress)
             and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
             and cpu_kernel.cpu_paths_enabled())
    if not fused:
        return compress(act(expand(x)))
    out = _PointwiseMLP.apply(_rows(x).flatten(0, 1), expand.weight.flatten(1), expand.bias,
                              compress.weight.flatten(1), compress.bias)
    n, _, *spatial = x.shape
    return out.view(n, *spatial, -1).movedim(-1, 1)
