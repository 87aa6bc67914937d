"""Our Mamba against the real mamba_ssm.Mamba and against a token-by-token implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_gradients_close
from nnunet_ext.blocks.mamba import Mamba


def stepwise_mamba(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm.Mamba's forward one token at a time (its `step` recurrence), in float64; differentiable
    with respect to x and m's parameters."""
    p = {k: v.double() for k, v in m.named_parameters()}
    batch, length, _ = x.shape
    conv_state = x.new_zeros(batch, m.d_inner, m.d_conv, dtype=torch.float64)
    ssm_state = x.new_zeros(batch, m.d_inner, m.d_state, dtype=torch.float64)
    A = -torch.exp(p["A_log"])
    outputs = []
    for t in range(length):
        xz = x[:, t].double() @ p["in_proj.weight"].T + p.get("in_proj.bias", 0)
        xt, z = xz.chunk(2, dim=-1)
        conv_state = torch.cat([conv_state[:, :, 1:], xt[:, :, None]], dim=-1)  # causal window
        xt = F.silu((conv_state * p["conv1d.weight"][:, 0]).sum(-1) + p["conv1d.bias"])
        dt, B, C = (xt @ p["x_proj.weight"].T).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
        ssm_state = ssm_state * torch.exp(dt[..., None] * A) + (dt * xt)[..., None] * B[:, None]
        y = (ssm_state * C[:, None]).sum(-1) + p["D"] * xt
        outputs.append((y * F.silu(z)) @ p["out_proj.weight"].T + p.get("out_proj.bias", 0))
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("d_model,d_state,d_conv,expand,length", [(16, 16, 4, 2, 50), (20, 8, 3, 1.5, 7),
                                                                  (33, 4, 2, 2, 1)])
def test_matches_token_by_token_recurrence(d_model, d_state, d_conv, expand, length, cpu_path):
    torch.manual_seed(0)
    m = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    x = torch.randn(2, length, d_model)
    torch.testing.assert_close(m(x).double(), stepwise_mamba(m, x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_token_by_token_recurrence(bias, cpu_path):
    """Gradients of the input and of every parameter, with the parameters moved off their
    initialisation (D, the conv bias and the projections all matter)."""
    torch.manual_seed(1)
    m = Mamba(12, d_state=8, d_conv=4, expand=2, bias=bias)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 29, 12, requires_grad=True)
    w = torch.randn(3, 29, 12, dtype=torch.float64)
    inputs = [x, *m.parameters()]
    grads = torch.autograd.grad((m(x) * w.float()).sum(), inputs)
    grads_ref = torch.autograd.grad((stepwise_mamba(m, x) * w).sum(), inputs)
    assert_gradients_close(["x", *dict(m.named_parameters())], grads, grads_ref)


def test_state_dicts_move_both_ways_with_mamba_ssm(mamba_ssm):
    torch.manual_seed(0)
    theirs = mamba_ssm.Mamba(d_model=24, d_state=16, d_conv=4, expand=2, use_fast_path=False)
    ours = Mamba(24, d_state=16, d_conv=4, expand=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    x = torch.randn(3, 41, 24, requires_grad=True)

    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)

    trained = Mamba(24)
    with torch.no_grad():  # move every parameter away from its initial value
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.load_state_dict(trained.state_dict())
    out, out_ref = trained(x), theirs(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    grad_ref = torch.autograd.grad(out_ref.square().sum(), x)[0]
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, expand=2, dt_min=0.001, dt_max=0.1)
    assert m.dt_rank == math.ceil(64 / 16) and m.d_inner == 128
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= m.dt_rank ** -0.5
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_misuse_gets_a_clear_error():
    m = Mamba(8)
    with pytest.raises(ValueError, match=r"expects \(batch, length, 8\)"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(NotImplementedError, match="inference cache"):
        m(torch.randn(2, 5, 8), inference_params=object())
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(8, dt_init="xavier")
