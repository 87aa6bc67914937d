"""Depthwise 3D convolutions, strided and transposed too, on channels-last CPU maps (nnunet_ext.ops.channels_last):
output and gradients against PyTorch's convolution in float64, on the compiled weight-gradient loop and without
it, for the kernels the networks use (MedNeXt's 3 and 5 and its down and up blocks, LKA's 5 and dilated 7,
anisotropic stages' 1x3x3); the per-channel GroupNorm of such maps against PyTorch's in float64; and MedNeXt's
pointwise MLP in chunks of rows against its layers in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from nnunet_ext.ops import chunks
from nnunet_ext.ops.channels_last import depthwise_conv, group_norm, pointwise_mlp

CASES = {  # kernel, padding, dilation, channels, spatial, then the stride and the transposed convolution's
    # output padding (None: not transposed) where they are not 1 and None
    "mednext-k3": (3, 1, 1, 16, (9, 10, 11)),
    "mednext-k5": (5, 2, 1, 5, (6, 7, 5)),
    "lka-conv0": (5, 2, 1, 20, (4, 9, 6)),
    "lka-conv-spatial": (7, 9, 3, 3, (8, 5, 12)),
    "anisotropic": ((1, 3, 3), (0, 1, 1), 1, 17, (3, 8, 9)),
    "valid": (3, 0, 1, 4, (5, 6, 7)),  # no padding: a smaller output
    "mednext-down": (3, 1, 1, 16, (9, 10, 11), 2),  # odd sizes: the last position is not reached
    "mednext-down-k5-anisotropic": (5, 2, 1, 5, (4, 9, 8), (1, 2, 2)),
    "down-dilated": (3, 2, 2, 3, (7, 8, 9), 2),
    "mednext-up": (3, 1, 1, 16, (4, 5, 6), 2, 0),
    "mednext-up-k5-anisotropic": (5, 2, 1, 5, (4, 3, 5), (1, 2, 2), 0),
    "up-output-padding": (3, 1, 1, 4, (3, 4, 5), 2, (1, 0, 1)),
    "up-dilated": (3, 2, 2, 3, (3, 4, 5), 2, 1),
}


def convolution(case: str, bias: bool, seed: int = 0) -> nn.Module:
    kernel, padding, dilation, channels, _, *rest = CASES[case]
    stride, output_padding = rest[0] if rest else 1, rest[1] if len(rest) > 1 else None
    torch.manual_seed(seed)
    common = dict(padding=padding, dilation=dilation, groups=channels, bias=bias, stride=stride)
    conv = (nn.Conv3d(channels, channels, kernel, **common) if output_padding is None
            else nn.ConvTranspose3d(channels, channels, kernel, output_padding=output_padding, **common))
    with torch.no_grad():  # bias too, so that a wrong bias gradient shows
        for p in conv.parameters():
            p.normal_()
    return conv


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_output_and_gradients_match_float64(case, bias, cpu_path):
    conv = convolution(case, bias)
    x = torch.randn(2, conv.in_channels, *CASES[case][4], requires_grad=True)
    out = depthwise_conv(conv, x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert (type(out.grad_fn).__name__ == "_DepthwiseConvBackward") == (cpu_path == "compiled")
    grad = torch.randn_like(out).contiguous()  # a channels-first gradient, as a loss can give
    out.backward(grad)

    reference = convolution(case, bias).double()
    x64 = x.detach().double().requires_grad_()
    expected = reference(x64)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    pairs = [(x.grad, x64.grad), (conv.weight.grad, reference.weight.grad)]
    pairs += [(conv.bias.grad, reference.bias.grad)] if bias else []
    for ours, theirs in pairs:
        scale = theirs.abs().max()
        torch.testing.assert_close(ours.double() / scale, theirs / scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Conv3d(4, 8, 3, padding=1, groups=4), torch.randn(1, 4, 5, 5, 5)),  # not depthwise
    (lambda: nn.Conv3d(4, 4, 3, padding=3, groups=4), torch.randn(1, 4, 5, 5, 5)),  # more padding than taps
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.randn(1, 4, 9, 9)),  # 2D
    (lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4).double(), torch.randn(1, 4, 5, 5, 5).double()),
])
def test_other_convolutions_run_as_they_are(make, x):
    conv = make()
    x.requires_grad_()
    out = depthwise_conv(conv, x)
    assert type(out.grad_fn).__name__ != "_DepthwiseConvBackward"
    torch.testing.assert_close(out, conv(x))


@pytest.mark.parametrize("case", ["mednext-k3", "mednext-down", "mednext-up", "up-output-padding"])
def test_inference_runs_the_convolution_on_channels_last_maps(case):
    conv = convolution(case, bias=True)
    x = torch.randn(1, conv.in_channels, *CASES[case][4])
    with torch.no_grad():
        out = depthwise_conv(conv, x)
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("spatial", [(5, 8, 7), (40, 70)], ids=["3d", "2d"])
def test_group_norm_is_exact_on_channels_last_maps_where_pytorchs_is_not(spatial):
    """A channel of mean 3 and deviation 0.01: PyTorch's CPU GroupNorm on the channels-last map is off by whole
    units (E[x^2] - E[x]^2 in float32); group_norm matches float64 in output and every gradient."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(6, 6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    memory_format = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
    x = (torch.randn(2, 6, *spatial) * 0.01 + 3).contiguous(memory_format=memory_format).requires_grad_()
    reference = nn.GroupNorm(6, 6).double()
    reference.load_state_dict(norm.state_dict())
    x64 = x.detach().double().requires_grad_()
    expected = reference(x64)
    assert (norm(x).double() - expected).abs().max() > 0.1  # the reason group_norm exists

    out = group_norm(norm, x)
    assert out.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(out).contiguous()
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    for ours, theirs in [(x.grad, x64.grad), (norm.weight.grad, reference.weight.grad),
                         (norm.bias.grad, reference.bias.grad)]:
        scale = theirs.abs().max()
        torch.testing.assert_close(ours.double() / scale, theirs / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("groups, layout, dtype", [(3, "channels_last", torch.float32),  # groups of two channels
                                                   (6, "contiguous", torch.float32),
                                                   (6, "channels_last", torch.float64)])
def test_group_norm_of_other_norms_and_maps_is_groupnorm(groups, layout, dtype):
    norm = nn.GroupNorm(groups, 6).to(dtype)
    x = torch.randn(2, 6, 4, 5, 6, dtype=dtype) * 0.01 + 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    expected = F.group_norm(x.double().contiguous(), groups, norm.weight.double(), norm.bias.double())
    torch.testing.assert_close(group_norm(norm, x).double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["mednext-up", "mednext-down", "mednext-k3"])
def test_flop_counter_counts_the_layers_arithmetic(case):
    """The benchmark's FLOPs are the network's: a transposed convolution computed over a spread map counts as
    the transposed convolution (8x fewer multiply-accumulates at stride 2), as PyTorch's own layer counts."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = convolution(case, bias=True)
    x = torch.randn(1, conv.in_channels, *CASES[case][4])
    counts = []
    for layer in (conv, lambda x: depthwise_conv(conv, x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def pointwise_layers(dim: int, channels: int = 6, expansion: int = 3, seed: int = 0) -> tuple[nn.Module, ...]:
    """MedNeXt's 1x1 expansion, GELU and 1x1 compression, weights and biases drawn anew."""
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    layers = conv(channels, expansion * channels, 1), nn.GELU(), conv(expansion * channels, channels, 1)
    with torch.no_grad():
        for p in (*layers[0].parameters(), *layers[2].parameters()):
            p.normal_()
    return layers


def graph_has(out: torch.Tensor, name: str) -> bool:
    """Whether autograd's graph behind `out` holds a node called `name`."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return any(node.name() == name for node in seen)


@pytest.mark.parametrize("spatial", [(5, 4, 3), (7, 5)], ids=["3d", "2d"])
def test_pointwise_mlp_in_chunks_matches_its_layers_in_float64(spatial, products, monkeypatch):
    """In training on a channels-last map the expanded rows are formed 11 rows at a time (2 x 60 or 35 rows: a
    partial last chunk), in forward and again in backward, their products by sgemm and by oneDNN: output and every
    gradient against the layers in float64. Its output is channels-last."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 11 * 2 * 18 * 4)  # backward's two buffers of 18 channels
    layers = pointwise_layers(len(spatial))
    memory_format = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
    x = torch.randn(2, 6, *spatial).contiguous(memory_format=memory_format).requires_grad_()
    out = pointwise_mlp(*layers, x)
    assert graph_has(out, "_PointwiseMLPBackward") and out.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(out).contiguous()  # a channels-first gradient, as a loss can give
    out.backward(grad)

    reference = [layer.double() for layer in pointwise_layers(len(spatial))]
    x64 = x.detach().double().requires_grad_()
    expected = reference[2](reference[1](reference[0](x64)))
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    pairs = [(x.grad, x64.grad)] + [(ours.grad, theirs.grad) for i in (0, 2)
                                    for ours, theirs in zip(layers[i].parameters(), reference[i].parameters())]
    for ours, theirs in pairs:
        scale = theirs.abs().max()
        torch.testing.assert_close(ours.double() / scale, theirs / scale, rtol=0, atol=1e-6)


def test_pointwise_mlp_keeps_its_input_not_the_expanded_maps():
    """What autograd keeps for backward: the input rows and the weights, never a tensor as large as the expanded
    map (3 times the input here); the memory MedNeXt's blocks save in training."""
    layers = pointwise_layers(3)
    x = torch.randn(2, 6, 5, 4, 3).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        pointwise_mlp(*layers, x)
    assert saved and max(saved) == x.numel()


@pytest.mark.parametrize("case", ["inference", "channels-first", "tanh-gelu", "no-bias", "paths-off"])
def test_pointwise_mlp_elsewhere_runs_its_layers(case, monkeypatch):
    """Inference, channels-first maps (MedNeXt's on CUDA and under torch.compile), another activation, a
    convolution without bias and the CPU paths switched off (as the memory models are measured) run the layers
    themselves, with their numbers."""
    from nnunet_ext.ops import cpu_kernel

    expand, act, compress = pointwise_layers(3)
    x = torch.randn(1, 6, 4, 3, 5)
    if case != "channels-first":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if case == "tanh-gelu":
        act = nn.GELU(approximate="tanh")
    if case == "no-bias":
        compress.bias = None
    if case == "paths-off":
        monkeypatch.setattr(cpu_kernel, "_enabled", False)
    with torch.set_grad_enabled(case != "inference"):
        out = pointwise_mlp(expand, act, compress, x)
        assert out.grad_fn is None or not graph_has(out, "_PointwiseMLPBackward")
        assert torch.equal(out, compress(act(expand(x))))


def test_flop_counter_counts_the_pointwise_mlp_in_chunks_as_its_layers(monkeypatch):
    """The benchmark's FLOPs: the chunks' products count what the two 1x1 convolutions count."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 11 * 2 * 18 * 4)
    layers = pointwise_layers(3)
    x = torch.randn(2, 6, 5, 4, 3).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    counts = []
    for run in (lambda: layers[2](layers[1](layers[0](x))), lambda: pointwise_mlp(*layers, x)):
        with FlopCounterMode(display=False) as counter:
            run()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 2 * 60 * 6 * 18
