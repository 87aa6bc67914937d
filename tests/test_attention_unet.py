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


def test_softmax_attention_is_the_written_out_products_and_never_keeps_the_position_matrix():
    """Values and gradients against softmax(q k^T) v in float64, v wider than q and k; what autograd keeps
    for backward is never the positions x positions matrix (the fused kernel's point)."""
    torch.manual_seed(0)
    positions = 300
    # channels-first maps seen as tokens, as NonLocalSelfAttention passes them
    q, k, v = (t.transpose(-1, -2) for t in (3 * torch.randn(3, 1, 4, positions), 3 * torch.randn(3, 1, 4, positions),
                                             torch.randn(3, 1, 32, positions)))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.double().requires_grad_() for t in (q, k, v)]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        out = softmax_attention(*inputs)
    expected = torch.softmax(reference[0] @ reference[1].transpose(-1, -2), dim=-1) @ reference[2]
    # float32 against float64, to 1e-5 of the largest value (both ways of computing it in float32 are off by ~1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert kept and max(kept) < positions * positions
    weights = torch.randn_like(expected)
    (out * weights.float()).sum().backward()
    (expected * weights).sum().backward()
    for ours, theirs in zip(inputs, reference):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=0, atol=1e-5 * theirs.grad.abs().max().item())


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
