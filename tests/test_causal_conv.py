"""Mamba's causal depthwise convolution with SiLU against a float64 sum of shifted inputs, on the
compiled CPU loop and on the PyTorch path (F.conv1d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_gradients_close, channels_first
from nnunet_ext.ops.causal_conv import causal_conv1d_silu


def shifted_sum(x, weight, bias):
    """silu(bias + sum_k w_k x_{t - width + 1 + k}) in float64, zeros before the first position."""
    x, weight = x.double(), weight.double()
    width, length = weight.shape[1], x.shape[-1]
    out = torch.zeros_like(x) if bias is None else bias.double()[:, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k
        out[..., shift:] += weight[:, k:k + 1] * x[..., :length - shift]
    return F.silu(out)


@pytest.mark.parametrize("batch,d,length,width,bias,layout", [
    (2, 5, 50, 4, True, "contiguous"), (3, 4, 37, 4, True, "d (b l)"), (1, 3, 2, 4, True, "contiguous"),
    (2, 2, 1, 3, False, "d (b l)"), (2, 6, 64, 1, False, "contiguous"), (2, 4, 30, 2, True, "strided")])
def test_matches_shifted_sum_with_gradients(batch, d, length, width, bias, layout, cpu_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, length, generator=g)
    if layout == "d (b l)":
        x = channels_first(x)
    elif layout == "strided":  # one half of a wider tensor, as in_proj's x half: copied, same numbers
        x = torch.randn(batch, 2 * d, length, generator=g)[:, :d]
    x.requires_grad_()
    weight = torch.randn(d, width, generator=g, requires_grad=True)
    b = torch.randn(d, generator=g, requires_grad=True) if bias else None
    out = causal_conv1d_silu(x, weight, b)
    ref = shifted_sum(x, weight, b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    if cpu_path == "compiled":
        assert out.stride() == (x.stride() if layout != "strided" else (d * length, length, 1))
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, weight, b) if t is not None]
    grads = torch.autograd.grad((out * w.float()).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * w).sum(), inputs)
    assert_gradients_close(("x", "weight", "bias"), grads, grads_ref)


def test_keeps_the_input_dtype(cpu_path):
    x = torch.randn(2, 3, 20, dtype=torch.bfloat16)
    out = causal_conv1d_silu(x, torch.randn(3, 4), torch.randn(3))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
