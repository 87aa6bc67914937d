"""LKM-UNet's windows, PiM/PaM and BiM, and the network's options (the registry tests cover the contract)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import assert_compiles_like_eager, make_topology
from nnunet_ext.blocks.large_kernel_mamba import BiMamba, LMBlock, PatchMamba, PixelMamba, merge_axes, split_axes
from nnunet_ext.networks.lkm_unet import LKMUNet, default_windows, official_windows
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.registry import get_architecture
from nnunet_ext.trainers import nnUNetTrainerLKMUNet

MAMBA = dict(d_state=4, d_conv=2, expand=1)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("size,window", [((13, 9), (5, 4)), ((8, 8), (4, 2)), ((7, 10, 5), (3, 4, 5))])
def test_split_and_merge_are_inverse_with_padding(layout, size, window):
    x = torch.randn(2, 3, *size)
    view = split_axes(x, window, layout)
    counts = [-(-s // w) for s, w in zip(size, window)]
    factors = [(n, w) if layout == "contiguous" else (w, n) for n, w in zip(counts, window)]
    assert view.shape[2:] == tuple(f for pair in factors for f in pair)
    assert torch.equal(merge_axes(view, size), x)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_window_pixels(layout):
    """Contiguous windows are blocks of neighbours; strided windows take pixels `count` apart."""
    size, window = (12, 10), (4, 5)
    x = torch.arange(120.0).view(1, 1, *size)
    view = split_axes(x, window, layout)[0, 0]  # (o1, i1, o2, i2)
    for (r, c) in itertools.product(range(3), range(2)):  # window index
        pixels = view[r, :, c, :] if layout == "contiguous" else view[:, r, :, c]
        if layout == "contiguous":
            expected = x[0, 0, r * 4:(r + 1) * 4, c * 5:(c + 1) * 5]
        else:
            expected = x[0, 0, r::3, c::2]
        assert torch.equal(pixels, expected)


@pytest.mark.parametrize("layout,size", [("contiguous", (10, 7)), ("official", (10, 15)), ("official", (10, 7))])
def test_pixel_mamba_mixes_only_within_a_window(layout, size):
    """Contiguous windows of 4 x 3 (padded where they do not divide); the official grid of 5p = 5 pixels:
    sequences of the pixels 5 apart where 5 divides the map, else the whole map."""
    torch.manual_seed(0)
    pim = PixelMamba(4, (4, 3) if layout == "contiguous" else (1, 1), layout, **MAMBA)
    x = torch.randn(1, 4, *size)
    y = pim(x)
    x2 = x.clone()
    x2[0, :, 5, 4] += torch.randn(4)  # not a constant: LayerNorm would remove that
    changed = (pim(x2) - y).abs().sum(1)[0] > 0
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    if layout == "contiguous":
        same_window = (rows // 4 == 5 // 4) & (cols // 3 == 4 // 3)
    elif size[1] % 5 == 0:
        same_window = (rows % 5 == 5 % 5) & (cols % 5 == 4 % 5)
    else:
        same_window = torch.ones(size, dtype=torch.bool)  # the official code's global scan
    assert changed[5, 4] and not changed[~same_window].any()
    assert changed[same_window].sum() > 1  # and it does mix inside the window
    if layout == "official":
        assert pim.tokens(size) == (2 * 3 if size[1] % 5 == 0 else 70)


class Recorder(nn.Module):
    """Stands in for a BiMamba: records its input and returns zeros."""

    def forward(self, tokens):
        self.tokens = tokens
        return torch.zeros_like(tokens)


def test_patch_mamba_pools_valid_pixels_of_each_window():
    pam = PatchMamba(2, (4, 3), "contiguous", **MAMBA)
    pam.mamba = Recorder()
    x = torch.randn(2, 2, 6, 5)  # windows of 4x3: the last row and column of windows are partial
    assert torch.equal(pam(x), x)
    tokens = pam.mamba.tokens  # (batch, 2 x 2 windows, channels), row-major window order
    for i, (r, c) in enumerate(itertools.product(range(2), range(2))):
        expected = x[:, :, r * 4:(r + 1) * 4, c * 3:(c + 1) * 3].mean((2, 3))
        torch.testing.assert_close(tokens[:, i], expected)


@pytest.mark.parametrize("size", [(6, 4), (5, 4)])
def test_official_patch_mamba_pools_cells_of_p_or_takes_every_pixel(size):
    pam = PatchMamba(2, (2, 2), "official", **MAMBA)
    pam.mamba = Recorder()
    x = torch.randn(1, 2, *size)
    pam(x)
    expected = nn.functional.avg_pool2d(x, 2) if size[0] % 2 == 0 else x  # else: the official global scan
    torch.testing.assert_close(pam.mamba.tokens, expected.flatten(2).transpose(1, 2))


def test_shared_out_proj_projects_the_sum_of_both_directions_once():
    """The official BiM: the Mamba layers without out_proj, one bias-free Linear(d_inner, C) after the sum."""
    torch.manual_seed(0)
    bim = BiMamba(4, **MAMBA, shared_out_proj=True)
    assert isinstance(bim.forward_mamba.out_proj, nn.Identity) and isinstance(bim.backward_mamba.out_proj, nn.Identity)
    assert bim.out_proj.weight.shape == (4, bim.forward_mamba.d_inner) and bim.out_proj.bias is None
    x = torch.randn(2, 9, 4)
    norm = bim.norm(x)
    inner = bim.forward_mamba(norm) + bim.backward_mamba(norm.flip(1)).flip(1)
    torch.testing.assert_close(bim(x), inner @ bim.out_proj.weight.T)


def test_backward_direction_sees_the_reversed_sequence():
    """Mamba is causal: the forward branch at t sees tokens <= t, the backward branch tokens >= t."""
    torch.manual_seed(0)
    bim = BiMamba(4, **MAMBA)
    x = torch.randn(2, 9, 4)
    x2 = x.clone()
    x2[:, 5] += torch.randn(4)
    backward_only = BiMamba(4, **MAMBA)
    backward_only.load_state_dict(bim.state_dict())
    backward_only.forward_mamba = Recorder()  # zero output
    change = (backward_only(x2) - backward_only(x)).abs().sum((0, 2))
    assert (change[6:] == 0).all() and (change[:6] > 0).all()

    forward_only = BiMamba(4, **MAMBA, bidirectional=False)
    assert forward_only.backward_mamba is None
    change = (forward_only(x2) - forward_only(x)).abs().sum((0, 2))
    assert (change[:5] == 0).all() and (change[5:] > 0).all()
    both = (bim(x2) - bim(x)).abs().sum((0, 2))
    assert (both > 0).all()


def test_default_windows_reproduce_the_paper():
    # the paper's 2D setting (7 stages, 40x40 windows) and 3D setting (6 stages, 20x28x24 windows)
    two_d = make_topology(2, [(1, 1)] + [(2, 2)] * 6, [32] * 7, (320, 320))
    three_d = make_topology(3, [(1, 1, 1)] + [(2, 2, 2)] * 5, [32] * 6, (80, 112, 96))
    assert default_windows(two_d)[:3] == [(40, 40), (40, 40), (20, 20)]
    assert default_windows(three_d)[:3] == [(20, 28, 24), (10, 14, 12), (10, 14, 12)]
    # anisotropic: an axis shorter than the window count becomes one window along it
    aniso = make_topology(3, [(1, 1, 1)] + [(1, 2, 2)] * 4 + [(2, 2, 2)], [8] * 6, (2, 64, 64))
    assert default_windows(aniso)[0] == (1, 16, 16)


def test_options_switch_blocks_and_validate():
    topo = make_topology(2, [(1, 1), (2, 2), (2, 2)], [4, 8, 8], (16, 24))
    net = LKMUNet(topo, 1, 2, **MAMBA)  # windows (8, 12) on maps (16, 24), (8, 12), (4, 6)
    lm = [m for m in net.modules() if isinstance(m, LMBlock)]
    assert all(b.pim is not None for b in lm)
    # one window covers the map from stage 1 on: a one-token PaM would mix nothing
    assert [b.pam is not None for b in lm] == [True, False, False]
    net = LKMUNet(topo, 1, 2, pixel_mamba=False, **MAMBA)
    assert [(b.pim, b.pam is not None) for b in net.modules() if isinstance(b, LMBlock)] == \
        [(None, True), (None, False), (None, False)]
    net = LKMUNet(topo, 1, 2, window_sizes=[8, (4, 6), 2], **MAMBA)
    assert net.window_sizes == [(8, 8), (4, 6), (2, 2)]
    # the official code's base sizes p (LKMUNet.py lines 363-364); at 16 x 24 its PiM grids 10 x 10, 5 x 5 and
    # 5 x 5 divide no map, so it scans every map whole, which the training log reads in `notes`
    net = LKMUNet(topo, 1, 2, window_layout="official", **MAMBA)
    assert net.window_sizes == official_windows(topo) == [(2, 2), (1, 1), (1, 1)]
    assert all(b.pim.layout == b.pam.layout == "official" for b in net.modules() if isinstance(b, LMBlock))
    assert net.notes[0] == ("stage 0 (16x24 at the patch size): PiM's grid 10x10 does not divide the map, so it scans "
                            "all 384 pixels as one sequence (the official code's global scan)")
    assert len(net.notes) == 3 and not LKMUNet(topo, 1, 2, **MAMBA).notes
    assert [w[0] for w in official_windows(make_topology(2, [(1, 1)] + [(2, 2)] * 6, [4] * 7, (320, 320)))] == \
        [8, 4, 4, 2, 2, 1, 1]
    # layers over one token: left out by default, kept as the official code keeps them
    three_d = make_topology(3, [(1, 1, 1), (2, 2, 2)], [4, 8], (20, 28, 24))
    assert LKMUNet(three_d, 1, 2, window_layout="official", **MAMBA).notes == [
        "PiM's grids are the official code's 5p x 7p x 6p per axis, factors fixed for the paper's 3D patch, whatever "
        "the plans' patch"]  # and at 20 x 28 x 24 they divide: no global scan
    kept = LKMUNet(topo, 1, 2, single_token_layers=True, **MAMBA)
    assert all(b.pim is not None and b.pam is not None for b in kept.modules() if isinstance(b, LMBlock))
    with pytest.raises(ConfigurationError, match="one entry per stage"):
        LKMUNet(topo, 1, 2, window_sizes=[8, 8])
    with pytest.raises(ConfigurationError, match="window_layout"):
        LKMUNet(topo, 1, 2, window_layout="strided")
    with pytest.raises(ConfigurationError, match="positive"):
        LKMUNet(topo, 1, 2, window_sizes=[8, (4, 0), 2])


@pytest.mark.parametrize("zero_init_decoder", [False, True])
def test_decoder_sees_neighbouring_pixels_from_the_start_unless_zero_initialised(zero_init_decoder):
    """The SpineCT regression (docs/lkm_unet.md, "Initialisation"). With the official code's
    initialisation a decoder stage starts as a 1x1 projection: a logit reaches the full-resolution skip
    only at its own pixel (elsewhere only through the norm's statistics, as much near as far), and
    LKM-UNet missed the vertebral body for all 120 iterations of the real schedule."""
    torch.manual_seed(0)
    topo = make_topology(2, [(1, 1), (2, 2), (2, 2)], [4, 8, 8], (16, 16))
    net = LKMUNet(topo, 1, 2, zero_init_decoder=zero_init_decoder, **MAMBA)
    encoder_blocks = [m for m in net.encoder.modules() if isinstance(m, BasicBlockD)]
    assert encoder_blocks and all((b.conv2.norm.weight == 0).all() for b in encoder_blocks)  # identities, always

    skips = [s.detach().requires_grad_() for s in net.encoder(torch.randn(2, 1, 16, 16))]
    net.decoder(skips)[0][:, :, 8, 8].sum().backward()
    reach = skips[0].grad.abs().sum((0, 1))  # how much each skip pixel moves the logits at (8, 8)
    near = (reach[7:10, 7:10].sum() - reach[8, 8]) / 8
    far = torch.cat([reach[:3].flatten(), reach[-3:].flatten()]).mean()  # 5 or more pixels away
    if zero_init_decoder:
        assert near / far < 1.5  # measured 0.97
    else:
        assert near / far > 5  # measured 27


def test_a_trainer_subclass_overrides_registered_options(planned):
    """How to train the official initialisation, or any ablation, with the stock commands."""
    manager = PlansManager(str(planned.preprocessed / planned.dataset / "nnUNetPlans.json"))
    configuration = manager.get_configuration("2d")

    class Official(nnUNetTrainerLKMUNet):
        network_options = {"zero_init_decoder": True, "patch_mamba": False}

    net = Official.build_network_architecture(manager, configuration, 1, 3)
    decoder_blocks = [m for m in net.decoder.stages.modules() if isinstance(m, BasicBlockD)]
    assert decoder_blocks and all((b.conv2.norm.weight == 0).all() for b in decoder_blocks)
    assert all(b.pam is None for b in net.modules() if isinstance(b, LMBlock))
    default = nnUNetTrainerLKMUNet.build_network_architecture(manager, configuration, 1, 3)
    assert all((b.conv2.norm.weight == 1).all() for b in default.decoder.stages.modules() if isinstance(b, BasicBlockD))

    class Typo(nnUNetTrainerLKMUNet):
        network_options = {"zero_init_decoders": True}

    with pytest.raises(ConfigurationError, match=r"Option .zero_init_decoders.: unknown for .lkm_unet."):
        Typo.build_network_architecture(manager, configuration, 1, 3)


def test_runs_under_bfloat16_autocast():
    torch.manual_seed(0)
    topo = make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [4, 8, 8], (8, 16, 12))
    net = LKMUNet(topo, 2, 3, **MAMBA)
    x = torch.randn(1, 2, 8, 16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out[0].float().sum().backward()
    assert all(torch.isfinite(o.float()).all() for o in out)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    reference = net(x)[0]
    torch.testing.assert_close(out[0].float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


def test_torch_compile_runs_around_the_scan():
    """nnU-Net compiles networks on CUDA; the scan is excluded from tracing, the rest is compiled."""
    torch.manual_seed(0)
    topo = make_topology(2, [(1, 1), (2, 2), (2, 2)], [4, 8, 8], (16, 24))
    net = LKMUNet(topo, 1, 2, **MAMBA)
    assert_compiles_like_eager(net, torch.randn(2, 1, 16, 24))


def test_official_layers_over_one_token_are_in_the_graph_with_a_zero_a_log_gradient():
    """At 40 x 40 the official grid 5 x 5 leaves the last stage's PiM one-token sequences. Such a layer
    scans from a zero state, so its A_log's gradient is zero by construction; it is still part of the
    graph (DDP needs that), and every other parameter learns."""
    torch.manual_seed(0)
    topo = make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2)], [4, 8, 8, 8], (40, 40))
    arch = get_architecture("lkm_unet")
    net = arch.build(topo, 1, 2, **arch.presets["official"])
    last = [b for b in net.modules() if isinstance(b, LMBlock)][-1]
    assert last.pim.tokens((5, 5)) == 1
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    reached = {name: False for name, _ in net.named_parameters()}
    for _ in range(2):  # the first step switches on the branches that start at zero
        optimizer.zero_grad()
        sum(o.square().mean() for o in net(torch.randn(2, 1, 40, 40))).backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            reached[name] |= bool(p.grad.abs().sum() > 0)
        optimizer.step()
    assert sorted(n for n, ok in reached.items() if not ok) == \
        [f"encoder.stages.3.1.pim.mamba.{d}_mamba.A_log" for d in ("backward", "forward")]
