"""B-spline bases, KANLinear, the KAN convolution and the tokenized KAN block, against independent
references: scipy's B-splines, the textbook recursion one basis and one feature at a time
(ops/reference.py), and an unfold + KANLinear convolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import BSpline
from torch import nn

from nnunet_ext.blocks import kan
from nnunet_ext.blocks.kan import KANConv, KANLinear, TokenizedKANLayer, shift_tokens
from nnunet_ext.ops import chunks, cpu_kernel
from nnunet_ext.ops.b_spline import b_spline_bases, b_spline_linear, uniform_grid
from nnunet_ext.ops.reference import b_spline_basis, kan_linear_per_feature


def random_grid(features: int, n_knots: int, generator) -> torch.Tensor:
    """Non-uniform, strictly increasing knots per feature, one pair coinciding in feature 0."""
    steps = torch.rand(features, n_knots - 1, generator=generator, dtype=torch.float64) + 0.1
    grid = torch.cat([torch.zeros(features, 1, dtype=torch.float64), steps.cumsum(1)], 1) - 2
    grid[0, 4] = grid[0, 3]
    return grid


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_bases_equal_scipy_inside_the_grid(order):
    g = torch.Generator().manual_seed(order)
    grid = random_grid(3, 12, g)
    n_bases = grid.shape[1] - order - 1
    for f in range(3):
        t = grid[f].numpy()
        low, high = t[order], t[-order - 1]  # scipy's base interval, where the bases are complete
        x = torch.rand(500, dtype=torch.float64, generator=g) * (high - low) + low
        ours = b_spline_bases(x[:, None].expand(-1, 3), grid, order)[:, f]
        scipy = BSpline(t, np.eye(n_bases), order, extrapolate=False)(x.numpy())
        np.testing.assert_allclose(ours.numpy(), scipy, atol=1e-12)


@pytest.mark.parametrize("order", [1, 3])
def test_bases_equal_the_recursion_everywhere(order):
    """Outside the base interval too, down to zero beyond the knots."""
    g = torch.Generator().manual_seed(1)
    grid = random_grid(2, 10, g)
    x = torch.rand(400, 2, dtype=torch.float64, generator=g) * 8 - 3  # knots span about [-2, 4.5]
    ours = b_spline_bases(x, grid, order)
    for f in range(2):
        for j in range(ours.shape[-1]):
            torch.testing.assert_close(ours[:, f, j], b_spline_basis(x[:, f], grid[f], j, order))
    outside = (x < grid[:, :1].T) | (x >= grid[:, -1:].T)
    assert outside.any() and ours[outside].eq(0).all()


def test_bases_sum_to_one_inside_the_grid_range():
    grid = uniform_grid(4, grid_size=5, spline_order=3).double()
    x = torch.linspace(-1, 1 - 1e-9, 1001, dtype=torch.float64)[:, None].expand(-1, 4)
    torch.testing.assert_close(b_spline_bases(x, grid, 3).sum(-1), torch.ones(1001, 4, dtype=torch.float64))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bases_gradient_matches_finite_differences(order):
    """The analytic backward (dB_k from the order k-1 bases) against torch's numerical gradient."""
    g = torch.Generator().manual_seed(2)
    grid = random_grid(3, 11, g)
    grid[0, 4] += 0.05  # distinct knots: the derivative is only defined between them
    x = (torch.rand(20, 3, dtype=torch.float64, generator=g) * 5 - 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: b_spline_bases(v, grid, order), (x,))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_closed_form_on_equally_spaced_knots_equals_the_recursion(order):
    """`uniform=True`: the interval's polynomials placed at their bases, and their derivatives, against the
    recursion and its backward in float64, inside the knots and beyond them (where everything is 0)."""
    g = torch.Generator().manual_seed(order)
    grid = (torch.arange(-order, 6 + order, dtype=torch.float64) * 0.25 - 0.5).expand(3, -1).clone()
    grid[1] = grid[1] * 3 + 1  # another spacing per feature
    x = (torch.rand(500, 3, dtype=torch.float64, generator=g) * 12 - 5).requires_grad_()
    x.data[:4] = grid[:, :4].T  # exactly on knots
    recursion = b_spline_bases(x, grid, order)
    closed = b_spline_bases(x, grid, order, uniform=True)
    torch.testing.assert_close(closed, recursion, rtol=0, atol=1e-12)
    outside = (x < grid[:, :1].T) | (x >= grid[:, -1:].T)
    assert outside.any() and closed[outside].eq(0).all()
    weights = torch.randn(recursion.shape, dtype=torch.float64, generator=g)
    expected, = torch.autograd.grad((recursion * weights).sum(), x)
    ours, = torch.autograd.grad((closed * weights).sum(), x)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    if order:
        inner = (torch.rand(20, 3, dtype=torch.float64, generator=g) * 3 - 1).requires_grad_()
        assert torch.autograd.gradcheck(lambda v: b_spline_bases(v, grid, order, uniform=True), (inner,))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_compiled_closed_form_equals_the_recursion(order, threads, monkeypatch):
    """Float32 CPU tensors take the compiled loop (csrc/b_spline.c; order 3 has its own unrolled copy), its
    rows cut across threads: bases and gradient against the recursion in float64 and against the PyTorch
    formulation, inside the knots, on them and beyond them; a NaN or infinite point gets NaN bases and a
    NaN gradient, and no other point is touched by it."""
    original, calls = cpu_kernel.b_spline_forward, []
    monkeypatch.setattr(cpu_kernel, "b_spline_forward", lambda *a: calls.append(1) or original(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(order)
        # 19 features: a block of 16 and a partial one (the forward loop takes features 16 at a time)
        grid = (torch.arange(-order, 6 + order, dtype=torch.float32) * 0.25 - 0.5).expand(19, -1).clone()
        grid[1] = grid[1] * 3 + 1  # another spacing per feature
        grid[17] = grid[17] * 0.5 - 1
        x = torch.rand(5, 67, 19, generator=g) * 12 - 5
        x[0, :4] = grid[:, :4].T  # exactly on knots
        x[1, 0, 1], x[1, 1, 2] = float("nan"), float("inf")
        x.requires_grad_()
        weights = torch.randn(*x.shape, grid.shape[1] - order - 1, generator=g)
        results = {}
        for compiled in (True, False):
            monkeypatch.setattr(cpu_kernel, "_enabled", compiled)
            bases = b_spline_bases(x, grid, order, uniform=True)
            results[compiled] = bases, *torch.autograd.grad((bases.nan_to_num() * weights).sum(), x)
        assert len(calls) == 1
        x64 = x.detach().double().requires_grad_()
        recursion = b_spline_bases(x64, grid.double(), order)
        expected, = torch.autograd.grad((recursion.nan_to_num() * weights).sum(), x64)
    finally:
        torch.set_num_threads(before)
    bases, gradient = results[True]
    bad = ~x.isfinite()
    assert bases[bad].isnan().all() and gradient[bad].isnan().all()
    good = ~bad
    outside = good & ((x < grid[:, :1].T) | (x >= grid[:, -1:].T))
    assert outside.any() and bases[outside].eq(0).all() and gradient[outside].eq(0).all()
    torch.testing.assert_close(bases[good].double(), recursion[good], rtol=0, atol=2e-6)
    torch.testing.assert_close(gradient[good].double(), expected[good], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(bases[good], results[False][0][good], rtol=0, atol=1e-6)
    torch.testing.assert_close(gradient[good], results[False][1][good], rtol=1e-5, atol=1e-5)


def spline_product_case(generator, rows=30, features=19, out_features=5):
    """x (rows, features) inside and beyond the knots, one row with a NaN; a spline weight and a base term."""
    grid = uniform_grid(features, 5, 3)
    x = torch.rand(rows, features, generator=generator) * 3 - 1.5
    x[4, 2] = float("nan")
    weight = torch.randn(out_features, features * 8, generator=generator)
    base = torch.randn(rows, out_features, generator=generator)
    return x, grid, weight, base


@pytest.mark.parametrize("threads", [1, 3])
def test_spline_product_in_chunks_equals_the_whole_bases(threads, products, monkeypatch):
    """`b_spline_linear`'s compiled path forms the bases 7 rows at a time here (30 rows: a partial last chunk),
    in forward and again in backward: output and gradients in x, the weight and the base term against the whole
    bases by the recursion in float64, the chunks' products by sgemm and by oneDNN. The NaN row stays NaN and
    touches no other row's output or gradient."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 7 * 19 * 8 * 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, grid, weight, base = spline_product_case(torch.Generator().manual_seed(5))
        tensors = [t.requires_grad_() for t in (x, weight, base)]
        out = b_spline_linear(x, grid, 3, weight, base, uniform=True)
        assert out.grad_fn.name() == "_BSplineLinearBackward"
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        ours = torch.autograd.grad((out.nan_to_num() * grad_out).sum(), tensors)
    finally:
        torch.set_num_threads(before)
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    expected_out = doubles[2] + b_spline_bases(doubles[0], grid.double(), 3).flatten(1) @ doubles[1].T
    expected = torch.autograd.grad((expected_out.nan_to_num() * grad_out).sum(), doubles)
    good = torch.ones(30, dtype=torch.bool)
    good[4] = False
    assert out[4].isnan().all() and not out[good].isnan().any()
    torch.testing.assert_close(out[good].double(), expected_out[good], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0][good].double(), expected[0][good], rtol=1e-5, atol=1e-5)
    assert ours[1].isnan().any()  # the NaN row's bases reach the weight's gradient, as with the whole bases
    finite = ~expected[1].isnan()
    torch.testing.assert_close(ours[1][finite].double(), expected[1][finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2].double(), expected[2])


def test_spline_product_keeps_x_not_the_bases():
    """Autograd keeps x (and the weight) for the compiled spline product's backward, never a tensor of the
    bases' size (n_bases = 8 times x's): the memory the chunks save."""
    x, grid, weight, base = spline_product_case(torch.Generator().manual_seed(7), rows=200)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        b_spline_linear(x.requires_grad_(), grid, 3, weight.requires_grad_(), base, uniform=True)
    assert saved and max(saved) == x.numel()


def test_the_flop_counter_counts_the_spline_product_in_chunks(monkeypatch):
    """The benchmark's GFLOPs: the product with the bases counts as it did whole (a multiply-add per basis and
    output), the chunks' products being seen inside the autograd function."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 7 * 19 * 8 * 4)
    x, grid, weight, base = spline_product_case(torch.Generator().manual_seed(8))
    with FlopCounterMode(display=False) as counter:
        b_spline_linear(x, grid, 3, weight, base, uniform=True)
    assert counter.get_total_flops() == 2 * x.shape[0] * weight.shape[1] * weight.shape[0]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
def test_closed_form_keeps_nan_and_float32_under_autocast(compiled, monkeypatch):
    """A NaN input gives NaN among its bases, so the layer's output is NaN as with the recursion (and
    no index error); the bases are float32 under bf16 autocast, and computed in it: PyTorch's formulation
    once took autocast's bf16 for its product with the basis matrix (1.6e-4 off the compiled loop's loss)."""
    monkeypatch.setattr(cpu_kernel, "_enabled", compiled)
    grid = uniform_grid(4, 5, 3)
    x = torch.randn(16, 4)
    x[0, 1] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bases = b_spline_bases(x.bfloat16(), grid, 3, uniform=True)
    assert bases.dtype == torch.float32 and bases[0, 1].isnan().any() and not bases[1:].isnan().any()
    exact = b_spline_bases(x.bfloat16().double(), grid.double(), 3)
    torch.testing.assert_close(bases[1:].double(), exact[1:], rtol=0, atol=1e-6)
    layer = KANLinear(4, 2)
    assert layer(x)[0].isnan().all() and not layer(x)[1:].isnan().any()


def test_kan_layers_take_the_closed_form_only_on_equally_spaced_knots(monkeypatch):
    """As built, after loading a state dict and after a grid update, a layer's `uniform` says whether its
    knots are equally spaced; where it is wrong the bases would be (the closed form on other knots)."""
    torch.manual_seed(0)
    layer, conv = KANLinear(4, 3), KANConv(nn.Conv2d, 2, 3, 3, padding=1)
    assert layer.uniform and conv.uniform
    assert not KANLinear(4, 3).double().uniform  # float32-rounded knots are not equally spaced in float64
    assert KANLinear(4, 3).double().float().uniform
    x = torch.rand(512, 4) * 1.2 - 0.8
    updated = KANLinear(4, 3)
    updated.update_grid(x)
    assert not updated.uniform
    torch.testing.assert_close(updated.b_splines(x), b_spline_bases(x, updated.grid, 3))
    holder = nn.Sequential(KANLinear(4, 3))  # loaded as a submodule, as in a network
    holder.load_state_dict({f"0.{k}": v for k, v in updated.state_dict().items()})
    assert not holder[0].uniform
    holder.load_state_dict({f"0.{k}": v for k, v in layer.state_dict().items()})
    assert holder[0].uniform
    torch.testing.assert_close(holder[0](x), layer(x))


def test_bases_are_float32_under_autocast():
    grid = uniform_grid(8, 5, 3)
    x = torch.randn(16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bases = b_spline_bases(x, grid, 3)
    assert bases.dtype == torch.float32
    torch.testing.assert_close(bases, b_spline_bases(x.float(), grid, 3))


def test_bases_reject_a_grid_of_another_width():
    with pytest.raises(ValueError, match="knots for 4 features"):
        b_spline_bases(torch.randn(3, 5), uniform_grid(4, 5, 3), 3)


def test_kan_linear_has_efficient_kans_parameters():
    layer = KANLinear(6, 4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"grid": (6, 12), "base_weight": (4, 6), "spline_weight": (4, 6, 8), "spline_scaler": (4, 6)}
    expected = torch.arange(-3, 9) * 0.4 - 1  # 5 intervals over [-1, 1], 3 more on each side
    torch.testing.assert_close(layer.grid, expected.expand(6, -1))
    assert "spline_scaler" not in KANLinear(6, 4, enable_standalone_scale_spline=False).state_dict()


def test_kan_linear_splines_start_through_small_noise():
    """efficient-kan's initialisation: each spline interpolates noise of +-scale_noise / (2
    grid_size) at the grid points (6 points, 8 coefficients: exactly)."""
    torch.manual_seed(0)
    layer = KANLinear(5, 3, enable_standalone_scale_spline=False, scale_noise=0.1)
    points = torch.linspace(-1, 1, 6)[:, None].expand(-1, 5)
    values = torch.einsum("sib,oib->sio", layer.b_splines(points), layer.spline_weight.detach())
    assert values.abs().max() <= 0.01 + 1e-5 and values.abs().max() > 0.002


@pytest.mark.parametrize("standalone", [True, False])
def test_kan_linear_equals_the_per_feature_loop(standalone):
    torch.manual_seed(0)
    layer = KANLinear(5, 3, enable_standalone_scale_spline=standalone, scale_spline=0.7).double()
    with torch.no_grad():
        layer.spline_weight.normal_()  # splines far from the initial noise
    x = (torch.randn(2, 7, 5, dtype=torch.float64) * 1.5).requires_grad_()  # some points beyond the grid
    ours = layer(x)
    reference = kan_linear_per_feature(x.reshape(-1, 5), layer.base_weight, layer.scaled_spline_weight,
                                       layer.grid, 3).reshape(2, 7, 3)
    torch.testing.assert_close(ours, reference)
    weights = [x, layer.base_weight, layer.spline_weight]
    torch.testing.assert_close(torch.autograd.grad(ours.square().sum(), weights),
                               torch.autograd.grad(reference.square().sum(), weights))


def test_kan_linear_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    layer, x = KANLinear(32, 16), torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), layer(x), rtol=0.05, atol=0.05)


def test_update_grid_moves_the_knots_to_the_data_and_keeps_the_function():
    """The knots follow the data's range; the refitted splines (scaler included, which efficient-kan
    applies twice) compute nearly the same outputs on that data."""
    torch.manual_seed(0)
    layer = KANLinear(4, 3, scale_spline=2.0)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.rand(512, 4) * 1.2 - 0.8  # inside [-0.8, 0.4]
    before = layer(x)
    layer.update_grid(x)
    inner = layer.grid[:, 3:-3]
    torch.testing.assert_close(inner[:, 0], x.min(0).values - 0.01 * 0.02, atol=2e-3, rtol=0)
    torch.testing.assert_close(inner[:, -1], x.max(0).values + 0.01 * 0.02, atol=2e-3, rtol=0)
    after = layer(x)
    assert (after - before).abs().max() < 0.05 * before.std()


def test_regularization_loss_is_l1_plus_entropy():
    layer = KANLinear(3, 2)
    with torch.no_grad():
        layer.spline_weight.copy_(torch.arange(48.0).view(2, 3, 8) - 20)
    l1 = layer.spline_weight.detach().abs().mean(-1).double().numpy()
    p = l1 / l1.sum()
    expected = 0.5 * l1.sum() + 2.0 * -(p * np.log(p)).sum()
    assert layer.regularization_loss(0.5, 2.0).item() == pytest.approx(expected, rel=1e-6)


def unfold(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """(b, c, *size) -> (b, *out, c * taps): every receptive field as one vector, channel-major."""
    dim = len(kernel)
    for a in range(dim):
        x = x.unfold(2 + a, kernel[a], stride[a])  # (b, c, *out, *kernel) once all axes are done
    return x.permute(0, *range(2, 2 + dim), 1, *range(2 + dim, 2 + 2 * dim)).flatten(1 + dim)


@pytest.mark.parametrize("conv_op, size, kernel, stride, padding", [
    (nn.Conv2d, (9, 8), (3, 3), (2, 1), (1, 1)),
    (nn.Conv3d, (5, 7, 6), (1, 3, 3), (1, 2, 2), (0, 1, 1)),
])
def test_kan_conv_is_kan_linear_over_each_receptive_field(conv_op, size, kernel, stride, padding):
    torch.manual_seed(0)
    conv = KANConv(conv_op, 3, 4, kernel, stride, padding).double()
    with torch.no_grad():
        conv.spline_weight.normal_()
    x = (torch.randn(2, 3, *size, dtype=torch.float64) * 1.3).requires_grad_()
    ours = conv(x)

    taps = math.prod(kernel)
    padded = F.pad(x, [p for axis in reversed(padding) for p in (axis, axis)])
    patches = unfold(padded, kernel, stride)
    spline = (conv.spline_weight * conv.spline_scaler.unsqueeze(2)).movedim(2, -1).reshape(4, 3 * taps, -1)
    reference = kan_linear_per_feature(patches.reshape(-1, 3 * taps), conv.base_weight.reshape(4, -1), spline,
                                       conv.grid.repeat_interleave(taps, 0), 3)
    reference = reference.view(*patches.shape[:-1], 4).movedim(-1, 1)
    torch.testing.assert_close(ours, reference)
    weights = [x, conv.base_weight, conv.spline_weight, conv.spline_scaler]
    torch.testing.assert_close(torch.autograd.grad(ours.square().sum(), weights),
                               torch.autograd.grad(reference.square().sum(), weights))


def test_kan_conv_keeps_its_input_not_its_basis_maps_for_backward():
    """Autograd holds the padded input and its SiLU (plus weights), not the basis maps, which are
    (grid_size + spline_order) = 8 times the input."""
    conv = KANConv(nn.Conv3d, 8, 8, 3, padding=1)
    x = torch.randn(1, 8, 12, 12, 12, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv(x).sum().backward()
    padded_input = 8 * 14 ** 3 * 4
    assert sum(saved.values()) < 2 * padded_input + 2 * conv.spline_weight.nbytes
    assert sum(saved.values()) < 0.3 * 8 * padded_input  # the basis maps


def test_token_shift_moves_each_channel_group_along_one_axis():
    x = torch.zeros(1, 10, 6, 7)
    x[:, :, 3, 3] = 1  # one impulse per channel
    out = shift_tokens(x, axis=0)  # 5 groups of 2 channels, moved by -2, -1, 0, 1, 2 rows
    for c in range(10):
        s = c // 2 - 2
        assert out[0, c].nonzero().tolist() == [[3 + s, 3]]
    out = shift_tokens(x, axis=1)
    assert [out[0, c].nonzero().tolist() for c in (0, 9)] == [[[3, 1]], [[3, 5]]]
    far = torch.ones(1, 5, 1, 4)  # a one-row map: every shifted group moves out and becomes zero
    assert shift_tokens(far, axis=0)[0, :, 0, 0].tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 6, 4, 1, 5)], ids=["2d", "3d"])
def test_token_shift_gradient_is_the_opposite_shift(shape):
    """The shift's backward (its own: the opposite shift) against torch's numerical gradient, along every
    axis, a length-1 axis included; the result is channels-last in memory, so its token rows are a view."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for axis in range(len(shape) - 2):
        assert torch.autograd.gradcheck(lambda v: shift_tokens(v, axis), (x,))
        out = shift_tokens(x, axis)
        assert out.movedim(1, -1).is_contiguous()


def test_tokenized_layer_shifts_along_each_axis_in_turn(monkeypatch):
    axes = []

    def recording_shift(x, axis):
        axes.append(axis)
        return shift_tokens(x, axis)

    monkeypatch.setattr(kan, "shift_tokens", recording_shift)
    TokenizedKANLayer(nn.Conv3d, 10, token_mixer="mlp")(torch.randn(1, 10, 4, 4, 4))
    TokenizedKANLayer(nn.Conv2d, 10, token_mixer="mlp")(torch.randn(1, 10, 4, 4))
    assert axes == [0, 1, 2] + [0, 1, 0]
    axes.clear()
    TokenizedKANLayer(nn.Conv2d, 10, token_mixer="mlp", token_shift=False)(torch.randn(1, 10, 4, 4))
    assert axes == []


@pytest.mark.parametrize("mixer, cls", [("kan", KANLinear), ("mlp", nn.Linear)])
def test_token_mixer_switch_changes_the_layers(mixer, cls):
    layer = TokenizedKANLayer(nn.Conv2d, 8, token_mixer=mixer)
    assert [type(fc) for fc in layer.fc] == [cls] * 3
    with pytest.raises(ValueError, match="token_mixer"):
        TokenizedKANLayer(nn.Conv2d, 8, token_mixer="kan-mlp")
