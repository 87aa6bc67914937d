"""The deformable convolution against ordinary convolutions, an independent trilinear reference,
torchvision's deform_conv2d, and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import assert_gradients_close
from nnunet_ext.ops import cpu_kernel
from nnunet_ext.ops import deform_conv as deform_module
from nnunet_ext.ops.deform_conv import deform_conv
from nnunet_ext.ops.reference import deform_conv_unfused

CONV = {2: F.conv2d, 3: F.conv3d}

# (dim, input size, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (2, (9, 11), 3, 1, 1, 1, 1),
    (2, (12, 10), 5, 2, 2, 1, 4),  # depthwise (4 channels)
    (2, (15, 16), 3, 1, 3, (3, 2), 2),
    (3, (6, 7, 5), 3, 1, 1, 1, 1),
    (3, (8, 6, 9), 3, (1, 2, 2), 1, 1, 4),
    (3, (7, 9, 8), 3, 1, (2, 3, 3), (2, 3, 3), 2),
]
IDS = [f"{g[0]}d-k{g[2]}-s{g[3]}-d{g[5]}-g{g[6]}" for g in GEOMETRIES]


def out_size(size, kernel, stride, padding, dilation):
    dim = len(size)
    t = [(v,) * dim if isinstance(v, int) else v for v in (stride, padding, dilation)]
    return [(s + 2 * p - d * (kernel - 1) - 1) // st + 1 for s, st, p, d in zip(size, *t)]


def make(geometry, offset_groups=1, modulated=False, scale=1.5, dtype=torch.float64, seed=0, out_channels=8):
    dim, size, kernel, stride, padding, dilation, groups = geometry
    g = torch.Generator().manual_seed(seed)
    channels = 4
    out = out_size(size, kernel, stride, padding, dilation)
    tensors = dict(input=torch.randn(2, channels, *size, generator=g, dtype=dtype),
                   offset=scale * torch.randn(2, offset_groups * dim * kernel ** dim, *out, generator=g, dtype=dtype),
                   weight=torch.randn(out_channels, channels // groups, *(kernel,) * dim, generator=g, dtype=dtype),
                   bias=torch.randn(out_channels, generator=g, dtype=dtype))
    if modulated:
        tensors["mask"] = torch.rand(2, offset_groups * kernel ** dim, *out, generator=g, dtype=dtype)
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_zero_offsets_give_the_ordinary_convolution(geometry):
    t, kw = make(geometry, scale=0.0, dtype=torch.float32)
    expected = CONV[geometry[0]](t["input"], t["weight"], t["bias"], groups=geometry[6], **kw)
    torch.testing.assert_close(deform_conv(**t, **kw), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_integer_offsets_give_the_shifted_convolution(geometry):
    """Every tap displaced by the same whole-pixel vector s reads x(q + s) for each regular position
    q, inside or outside the input: the unpadded convolution of the zero-padded input, windowed s further."""
    dim = geometry[0]
    t, kw = make(geometry, scale=0.0, dtype=torch.float32)
    shift = [1, -2, 1][:dim]
    t["offset"] = torch.tensor(shift, dtype=torch.float32).view(1, 1, dim, *(1,) * dim).expand(
        2, t["offset"].shape[1] // dim, dim, *t["offset"].shape[2:]).reshape(t["offset"].shape)
    x = t["input"]
    pad = [kw["padding"]] * dim if isinstance(kw["padding"], int) else kw["padding"]
    margin = max(pad) + 2  # room for the padding and the shift
    padded = F.pad(x, [margin] * 2 * dim)
    window = padded[(..., *(slice(margin - p + s, margin - p + s + n + 2 * p) for p, s, n in zip(pad, shift, x.shape[2:])))]
    expected = CONV[dim](window, t["weight"], t["bias"], groups=geometry[6], **{**kw, "padding": 0})
    torch.testing.assert_close(deform_conv(**t, **kw), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("offset_groups, modulated", [(1, False), (2, True), (4, True)])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_fractional_offsets_match_the_direct_interpolation(geometry, offset_groups, modulated, threads, monkeypatch):
    """Against `deform_conv_unfused`, which interpolates corner by corner (no grid_sample), in float64:
    outputs and the gradients of input, offset, mask, weight and bias. With 8 threads the channels of each
    (sample, offset group) split into as many sampled maps as divide them (4, 2 and 1 here)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert deform_module._maps_per_group(2 * offset_groups, 4 // offset_groups) == \
        (1 if threads == 1 else 4 // offset_groups)
    t, kw = make(geometry, offset_groups, modulated)
    for v in t.values():
        v.requires_grad_()
    ours, reference = deform_conv(**t, **kw), deform_conv_unfused(**t, **kw)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ours)
    for a, b, name in zip(torch.autograd.grad(ours, list(t.values()), grad),
                          torch.autograd.grad(reference, list(t.values()), grad), t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


# One offset group and one convolution group in 3D (the compiled trilinear sampling), or as many groups as the 4
# channels in and out, 2D and 3D (the compiled depthwise deformable convolution, without a mask)
COMPILED = [(3, (6, 7, 5), 3, 1, 1, 1, 1), (3, (8, 6, 9), 3, (1, 2, 2), 1, 1, 1),
            (3, (7, 9, 8), 3, 1, (2, 3, 3), (2, 3, 3), 1), (2, (12, 10), 5, 2, 2, 1, 4),
            (2, (15, 16), 3, 1, 3, (3, 2), 4), (3, (6, 7, 5), 3, 1, 1, 1, 4)]


@pytest.mark.parametrize("one_tap_per_chunk", [False, True])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("geometry", COMPILED, ids=[f"{g[0]}d-k{g[2]}-s{g[3]}-d{g[5]}-g{g[6]}" for g in COMPILED])
def test_float32_on_both_cpu_paths_matches_float64(geometry, modulated, one_tap_per_chunk, cpu_path, monkeypatch):
    """float32 through the compiled loops (the trilinear sampling, then one matrix product; or the depthwise
    deformable convolution, which stores no sample) and through grid_sample, against `deform_conv_unfused` in
    float64: outputs and every gradient, offsets large enough to reach outside the map, the taps whole or one per
    chunk (recomputed in backward)."""
    depthwise = geometry[6] == 4
    compiled = []
    monkeypatch.setattr(cpu_kernel, "deform", lambda *args, f=cpu_kernel.deform: compiled.append(1) or f(*args))
    if one_tap_per_chunk:
        monkeypatch.setattr(deform_module, "TAP_CHUNK_ELEMENTS", 1)
    t, kw = make(geometry, 1, modulated, scale=3.0, out_channels=4 if depthwise else 8)
    t32 = {k: v.float().requires_grad_() for k, v in t.items()}
    t64 = {k: v.requires_grad_() for k, v in t.items()}
    ours, reference = deform_conv(**t32, **kw), deform_conv_unfused(**t64, **kw)
    assert bool(compiled) == (cpu_path == "compiled" and not (depthwise and modulated))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    grad = torch.randn_like(reference)
    assert_gradients_close(list(t), torch.autograd.grad(ours, list(t32.values()), grad.float()),
                           torch.autograd.grad(reference, list(t64.values()), grad))


@pytest.mark.parametrize("offset_groups, modulated", [(1, False), (2, True)])
@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[0] == 2], ids=[i for i in IDS if i[0] == "2"])
def test_matches_torchvision_in_2d(geometry, offset_groups, modulated):
    t, kw = make(geometry, offset_groups, modulated)
    for v in t.values():
        v.requires_grad_()
    ours, theirs = deform_conv(**t, **kw), torchvision.ops.deform_conv2d(**t, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ours)
    for a, b, name in zip(torch.autograd.grad(ours, list(t.values()), grad),
                          torch.autograd.grad(theirs, list(t.values()), grad), t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck(dim, monkeypatch):
    """float64 gradcheck of every input on tiny sizes, with a mask, two offset groups, two conv
    groups and chunks of two taps, so the chunked, recomputed path is the one checked."""
    monkeypatch.setattr(deform_module, "TAP_CHUNK_ELEMENTS", 2 * 4 * 2 ** dim)  # batch 1 x 4 channels x 2^dim positions
    g = torch.Generator().manual_seed(0)
    positions = (2,) * dim
    # sampling positions kept away from whole pixels, where bilinear interpolation has kinks
    offset = torch.randint(-1, 2, (1, 2 * dim * 2 ** dim, *positions), generator=g) + 0.3 + 0.4 * torch.rand(
        1, 2 * dim * 2 ** dim, *positions, generator=g)
    inputs = (torch.randn(1, 4, *(3,) * dim, generator=g), offset, torch.randn(2, 2, *(2,) * dim, generator=g),
              torch.randn(2, generator=g), torch.rand(1, 2 * 2 ** dim, *positions, generator=g))
    inputs = tuple(t.double().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(lambda x, o, w, b, m: deform_conv(x, o, w, b, mask=m), inputs)


def test_chunked_taps_equal_one_chunk(monkeypatch):
    t, kw = make(GEOMETRIES[4], offset_groups=2, modulated=True)
    whole = deform_conv(**t, **kw)
    monkeypatch.setattr(deform_module, "TAP_CHUNK_ELEMENTS", 1)  # one tap per chunk
    torch.testing.assert_close(deform_conv(**t, **kw), whole, rtol=1e-12, atol=1e-12)


def test_backward_keeps_no_copy_per_tap():
    """What autograd saves for backward is the inputs, not the sampled values of every tap (which
    the unfused reference keeps: 27 copies of the input in 3D)."""
    t, kw = make(GEOMETRIES[3], dtype=torch.float32)
    for v in t.values():
        v.requires_grad_()
    inputs = sum(v.numel() for v in t.values())

    def saved_numel(fn):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(**t, **kw)
        return total[0]

    assert saved_numel(deform_conv) <= 2 * inputs
    assert saved_numel(deform_conv_unfused) > 27 * t["input"].numel()


def test_low_precision_samples_in_float32():
    """bfloat16 tensors or autocast: positions are formed and sampled in float32 (bfloat16 cannot
    tell pixel 100.25 from 100.5), so only the products lose precision."""
    t, kw = make(GEOMETRIES[3], dtype=torch.float32)
    t["input"] = F.pad(t["input"], [0, 120])  # a long axis: positions up to 124
    t["offset"] = F.pad(t["offset"], [0, 120]) + 0.25
    expected = deform_conv(**t, **kw)
    tolerance = dict(rtol=0.05, atol=0.05 * expected.abs().max().item())
    low = deform_conv(**{k: v.bfloat16() for k, v in t.items()}, **kw)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, **tolerance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(deform_conv(**t, **kw).float(), expected, **tolerance)


@pytest.mark.parametrize("change, message", [
    (dict(offset=torch.zeros(2, 17, 9, 11)), "offset must be"),
    (dict(mask=torch.zeros(2, 3, 9, 11)), "mask must be"),
    (dict(weight=torch.zeros(8, 3, 3, 3)), "equal groups"),
    (dict(input=torch.zeros(2, 4, 9, 11, 5)), "same number of spatial axes"),
    (dict(padding=(1, 1, 1)), "padding"),
])
def test_bad_arguments_say_what_is_wrong(change, message):
    t, kw = make(GEOMETRIES[0], dtype=torch.float32)
    args = {**t, **kw, **change}
    with pytest.raises(ValueError, match=message):
        deform_conv(**args)


@pytest.mark.parametrize("geometry", COMPILED, ids=[f"{g[0]}d-k{g[2]}-s{g[3]}-d{g[5]}-g{g[6]}" for g in COMPILED])
def test_the_flop_counter_counts_the_same_on_both_cpu_paths(geometry, cpu_path):
    """The benchmark's GFLOPs: a multiply-add per sample and output channel (the contraction), whichever path."""
    from torch.utils.flop_counter import FlopCounterMode

    t, kw = make(geometry, 1, dtype=torch.float32, out_channels=4 if geometry[6] == 4 else 8)
    with FlopCounterMode(display=False) as counter:
        out = deform_conv(**t, **kw)
    taps, positions = geometry[2] ** geometry[0], out[0, 0].numel()
    assert counter.get_total_flops() == 2 * 2 * positions * taps * t["weight"].shape[1] * out.shape[1]
