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
from nnunet_ext.networks.lkm_unet import LKMUNet, default_windows
from nnunet_ext.errors import ConfigurationError
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


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_pixel_mamba_mixes_only_within_a_window(layout):
    torch.manual_seed(0)
    pim = PixelMamba(4, (4, 3), layout, **MAMBA)
    x = torch.randn(1, 4, 10, 7)  # not divisible: padded to 12 x 9, 3 x 3 windows
    y = pim(x)
    x2 = x.clone()
    x2[0, :, 5, 4] += torch.randn(4)  # not a constant: LayerNorm would remove that
    changed = (pim(x2) - y).abs().sum(1)[0] > 0
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(7), indexing="ij")
    if layout == "contiguous":
        same_window = (rows // 4 == 5 // 4) & (cols // 3 == 4 // 3)
    else:
        same_window = (rows % 3 == 5 % 3) & (cols % 3 == 4 % 3)
    assert changed[5, 4] and not changed[~same_window].any()
    assert changed[same_window].sum() > 1  # and it does mix inside the window


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


def test_patch_mamba_strided_layout_pools_cells_of_window_count():
    pam = PatchMamba(2, (3, 2), "strided", **MAMBA)  # 6 x 4 map: 2 x 2 strided windows, cells of 2 x 2
    pam.mamba = Recorder()
    x = torch.randn(1, 2, 6, 4)
    pam(x)
    expected = nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pam.mamba.tokens, expected)


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
    net = LKMUNet(topo, 1, 2, window_sizes=[8, (4, 6), 2], window_layout="strided", **MAMBA)
    assert net.window_sizes == [(8, 8), (4, 6), (2, 2)]
    assert all(b.pim.layout == "strided" for b in net.modules() if isinstance(b, LMBlock))
    with pytest.raises(ConfigurationError, match="one entry per stage"):
        LKMUNet(topo, 1, 2, window_sizes=[8, 8])
    with pytest.raises(ConfigurationError, match="window_layout"):
        LKMUNet(topo, 1, 2, window_layout="shifted")
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
