"""Matrix products by oneDNN's 1x1 convolution (nnunet_ext.ops.linear): the product, a bias or a matrix added,
and both gradients against float64 on both paths; the products that stay PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_ext.ops import cpu_kernel, linear


class _Operators(TorchDispatchMode):
    """The ATen operators a call runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def operators(call) -> set[str]:
    with _Operators() as mode:
        call()
    return mode.names


def case(rows=37, features=11, out_features=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64)
            for shape in ((rows, features), (out_features, features), (out_features,), (rows, out_features))]


def assert_close_to(ours: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    torch.testing.assert_close(ours.double() / scale, expected / scale, rtol=0, atol=1e-6)


def test_products_and_gradients_match_float64(products):
    """linear (with autograd), addmm with a bias or a matrix (into `out` or not) and linear_backward give
    float64's numbers; on the oneDNN path by its convolution, and no sgemm."""
    x, weight, bias, grad = case()
    x32, weight32, bias32, grad32 = (t.float() for t in (x, weight, bias, grad))
    expected_mm = {"onednn": {"mkldnn_convolution", "convolution"}, "sgemm": {"addmm", "mm"}}[products]

    leading = x32.view(1, 37, 11).requires_grad_()  # any leading axes
    weight_leaf = weight32.clone().requires_grad_()
    names = operators(lambda: linear.linear(leading, weight_leaf, bias32).backward(grad32.view(1, 37, 6)))
    assert names & expected_mm and not names & ({"addmm", "mm"} if products == "onednn" else {"convolution"})
    assert_close_to(leading.grad[0], grad @ weight)
    assert_close_to(weight_leaf.grad, grad.t() @ x)
    with torch.no_grad():
        assert_close_to(linear.linear(leading, weight32, bias32)[0], x @ weight.t() + bias)

    out = torch.empty(37, 6)
    assert linear.addmm(grad32, x32, weight32, out=out) is out
    assert_close_to(out, grad + x @ weight.t())
    assert_close_to(linear.addmm(bias32, x32, weight32), x @ weight.t() + bias)
    assert linear.addmm(bias32, x32, weight32, out=out) is out
    assert_close_to(out, x @ weight.t() + bias)

    grad_x, grad_weight = linear.linear_backward(grad32, x32, weight32)
    assert_close_to(grad_x, grad @ weight)
    assert_close_to(grad_weight, grad.t() @ x)
    assert linear.linear_backward(grad32, x32, weight32, input_grad=False)[0] is None
    assert linear.linear_backward(grad32, x32, weight32, weight_grad=False)[1] is None


@pytest.mark.parametrize("what", ["small", "float64", "strided-rows", "autocast", "paths-off", "meta"])
def test_products_elsewhere_are_pytorchs(what, monkeypatch):
    """A product below the threshold, another dtype, rows that are not contiguous, autocast, the CPU paths switched
    off and the meta device (where networks are counted) take F.linear, with its numbers."""
    x, weight, bias, _ = case(rows=64, features=64, out_features=64)
    x, weight, bias = (t.float() for t in (x, weight, bias))
    monkeypatch.setattr(linear, "MIN_MULTIPLY_ADDS", 64 ** 3)  # this product, unless `what` rules it out
    assert linear.by_onednn(x, weight)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if what == "autocast" else torch.no_grad()
    if what == "small":
        x = x[:63]
    if what == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    if what == "strided-rows":
        x = torch.randn(64, 128)[:, ::2]
    if what == "paths-off":
        monkeypatch.setattr(cpu_kernel, "_enabled", False)
    if what == "meta":
        x, weight, bias = x.to("meta"), weight.to("meta"), bias.to("meta")
    with context:
        names = operators(lambda: linear.linear(x, weight, bias))
        assert "convolution" not in names
        if what != "meta":
            torch.testing.assert_close(linear.linear(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=0)


def test_the_flop_counter_counts_a_product_by_onednn_as_the_product(products):
    """The benchmark's GFLOPs: two per multiply-add, whichever path computes it."""
    from torch.utils.flop_counter import FlopCounterMode

    x, weight, bias, _ = (t.float() for t in case())
    with FlopCounterMode(display=False) as counter:
        linear.linear(x, weight, bias)
    assert counter.get_total_flops() == 2 * 37 * 11 * 6
