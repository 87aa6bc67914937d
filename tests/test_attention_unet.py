"""Attention U-Net specifics: the attention blocks against plain references, and its options."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOPOLOGIES, assert_compiles_like_eager, make_topology
from nnunet_ext.blocks.attention import AttentionGate, NonLocalSelfAttention, softmax_attention
from nnunet_ext.registry import get_architecture


def test_self_attention_matches_plain_softmax_attention():
    torch.manual_seed(0)
    block = NonLocalSelfAttention(nn.Conv3d, channels=16).double()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64)
    # Reference: explicit 1x1 projections as matrix products, softmax over positions (no scaling).
    flat = x.flatten(2)  # b, c, n

    def project(conv):
        return torch.einsum("oc,bcn->bon", conv.weight[:, :, 0, 0, 0], flat) + conv.bias[None, :, None]

    q, k, v = project(block.query), project(block.key), project(block.value)
    attention = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k), dim=-1)  # rows: queries
    expected = x + 0.7 * torch.einsum("bnm,bcm->bcn", attention, v).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_written_out_attention_is_scaled_dot_product_attention_unscaled():
    """The CPU path equals the fused call CUDA takes (scaled_dot_product_attention, scale 1), v wider than q."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 50, 4), torch.randn(3, 1, 50, 4), torch.randn(3, 1, 50, 32)
    torch.testing.assert_close(softmax_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=1.0))


def test_self_attention_starts_as_identity():
    block = NonLocalSelfAttention(nn.Conv2d, channels=8)
    x = torch.randn(1, 8, 6, 7)
    assert torch.equal(block(x), x)


def test_attention_gate_matches_equations_with_anisotropic_stride():
    torch.manual_seed(0)
    gate = AttentionGate(nn.Conv3d, skip_channels=6, gating_channels=10, stride=(1, 2, 2)).double()
    x = torch.randn(2, 6, 4, 8, 8, dtype=torch.float64)
    g = torch.randn(2, 10, 4, 4, 4, dtype=torch.float64)
    # Oktay et al. eq. 1-2 written out: W_x on 1x2x2 blocks of x, W_g on g, psi, sigmoid, resample.
    wx = F.conv3d(x, gate.theta.weight, stride=(1, 2, 2))
    wg = F.conv3d(g, gate.phi.weight, gate.phi.bias)
    alpha = torch.sigmoid(F.conv3d(F.relu(wx + wg), gate.psi.weight, gate.psi.bias))
    alpha = F.interpolate(alpha, size=(4, 8, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(gate(x, g), x * alpha)
    coefficients = gate.coefficients(x, g)
    assert coefficients.shape == (2, 1, 4, 8, 8) and ((coefficients > 0) & (coefficients < 1)).all()


def test_self_attention_only_at_small_token_counts():
    topology, in_ch = TOPOLOGIES["3d_5stages_aniso_4ch"]  # patch (20, 48, 32)
    tokens = [s[0] * s[1] * s[2] for s in topology.feature_map_sizes()]
    arch = get_architecture("attention_unet")
    net = arch.build(topology, in_ch, 2, self_attention_max_tokens=1000)
    assert net.self_attention_stages == [s for s, n in enumerate(tokens) if n <= 1000]
    assert 0 < len(net.self_attention_stages) < topology.n_stages
    assert arch.build(topology, in_ch, 2, self_attention_max_tokens=0).self_attention_stages == []


def test_attention_gates_switch():
    topology, in_ch = TOPOLOGIES["2d_4stages_1ch"]
    arch = get_architecture("attention_unet")
    gated, plain = arch.build(topology, in_ch, 2), arch.build(topology, in_ch, 2, attention_gates=False)
    assert len(gated.decoder.gates) == topology.n_stages - 1
    assert plain.decoder.gates is None
    assert not any(isinstance(m, AttentionGate) for m in plain.modules())


def test_torch_compile_traces_gates_and_self_attention():
    torch.manual_seed(0)
    topology = make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [4, 8, 8], (8, 16, 16))
    net = get_architecture("attention_unet").build(topology, 1, 2)
    assert net.self_attention_stages == [0, 1, 2]  # every stage has at most 4096 positions
    assert_compiles_like_eager(net, torch.randn(1, 1, 8, 16, 16))
