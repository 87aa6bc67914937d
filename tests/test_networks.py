"""The network contract (../shared/ARCHITECTURES.md), checked for every registered architecture.

Every test here is parametrised over the registry and over plans topologies, so an architecture
gets all of them by registering, and so does each of its presets.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TOPOLOGIES, matrix
from nnunet_ext.networks.base import NonFiniteInputError
from nnunet_ext.registry import ARCHITECTURES

NUM_CLASSES = 3


def build(arch_name, topology, in_ch, deep_supervision=True):
    """`arch_name` is a registered name, or "name:preset" for one of its presets."""
    name, _, preset = arch_name.partition(":")
    arch = ARCHITECTURES[name]
    if topology.dim not in arch.dims:
        pytest.fail(f"{arch_name} is registered without {topology.dim}D; test it with a supported topology")
    torch.manual_seed(0)
    return arch.build(topology, in_ch, NUM_CLASSES, deep_supervision=deep_supervision,
                      **(arch.presets[preset] if preset else {}))


def expected_shapes(net, topology, batch, size):
    """One output per decoder stage, highest resolution first; then the bottleneck's where the network supervises
    it (MedNeXt's official network)."""
    stages = topology.strides if getattr(net, "bottleneck_head", None) is not None else topology.strides[:-1]
    shapes, stride = [], [1] * topology.dim
    for s in stages:
        stride = [a * b for a, b in zip(stride, s)]
        shapes.append((batch, NUM_CLASSES, *(math.ceil(i / st) for i, st in zip(size, stride))))
    return shapes


def contract_case(name: str, preset: str = ""):
    """A network to hold to the contract: every architecture, each of its presets as "name:preset". Variants of one
    family (U-Mamba's Bot and Enc, MedNeXt's sizes; each with its presets) take turns: one of them runs every test
    on every topology in a run (`--full-matrix`: all), as they share their modules."""
    arch_name = f"{name}:{preset}" if preset else name
    if not ARCHITECTURES[name].family:
        return arch_name
    return pytest.param(arch_name, marks=matrix(name, preset or "default", group="contract"), id=arch_name)


arch_names = pytest.mark.parametrize("arch_name", [contract_case(name, preset) for name, arch in ARCHITECTURES.items()
                                                   for preset in ("", *arch.presets)])


@arch_names
def test_deep_supervision_outputs(arch_name, topology_case):
    topology, in_ch = topology_case
    net = build(arch_name, topology, in_ch)
    x = torch.randn(2, in_ch, *topology.patch_size)
    out = net(x)
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == expected_shapes(net, topology, 2, topology.patch_size)

    net.decoder.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == out[0].shape


@arch_names
def test_any_input_size_is_padded_and_cropped(arch_name, topology_case):
    topology, in_ch = topology_case
    size = [p - 3 for p in topology.patch_size]  # not a multiple of the total stride
    net = build(arch_name, topology, in_ch)
    out = net(torch.randn(1, in_ch, *size))
    assert [tuple(o.shape) for o in out] == expected_shapes(net, topology, 1, size)


@arch_names
def test_every_parameter_gets_a_gradient(arch_name, topology_case):
    """Two SGD steps, the gradient clipped to norm 12 as nnU-Net's train step clips it: parameters initialised to
    switch a branch off (gamma = 0, zeroed residual norms) only receive a gradient once the first step has
    switched it on. (Unclipped, the official U-Mamba_Enc's first gradient, of norm 1e4 without blocks that start
    as identities, throws the second step to NaN.)"""
    topology, in_ch = topology_case
    net = build(arch_name, topology, in_ch)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, in_ch, *topology.patch_size)
    reached = {name: False for name, _ in net.named_parameters()}
    for _ in range(2):
        optimizer.zero_grad()
        loss = sum(o.square().mean() * 0.5 ** i for i, o in enumerate(net(x)))
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{name} is not part of the graph"
            assert torch.isfinite(p.grad).all(), name
            reached[name] |= bool(p.grad.abs().sum() > 0)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
    assert [n for n, ok in reached.items() if not ok] == []


@arch_names
def test_state_dict_independent_of_deep_supervision(arch_name):
    dims = ARCHITECTURES[arch_name.partition(":")[0]].dims
    topology, in_ch = next(t for t in TOPOLOGIES.values() if t[0].dim in dims)
    with_ds = build(arch_name, topology, in_ch, deep_supervision=True)
    without = build(arch_name, topology, in_ch, deep_supervision=False)
    a, b = with_ds.state_dict(), without.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    without.load_state_dict(a, strict=True)  # what nnU-Net's inference does with a training checkpoint
    x = torch.randn(1, in_ch, *topology.patch_size)
    with_ds.eval(), without.eval()
    with torch.no_grad():
        torch.testing.assert_close(without(x), with_ds(x)[0])


@arch_names
def test_eval_is_deterministic(arch_name, topology_case):
    topology, in_ch = topology_case
    net = build(arch_name, topology, in_ch).eval()
    x = torch.randn(1, in_ch, *topology.patch_size)
    with torch.no_grad():
        first, second = net(x), net(x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@arch_names
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_predicting_a_non_finite_input_stops_with_a_clear_message(arch_name, value):
    """In eval mode (prediction) NaN or Inf in the input stops the network with a message that counts
    them; training does not check (nnU-Net's fingerprint already refuses NaN in training data)."""
    topology, in_ch = TOPOLOGIES["2d_4stages_1ch"]
    net = build(arch_name, topology, in_ch).eval()
    x = torch.randn(1, in_ch, *topology.patch_size)
    x[0, 0, 3, 5] = x[0, 0, 7, 1] = value
    with torch.no_grad(), pytest.raises(NonFiniteInputError) as stopped:
        net(x)
    assert isinstance(stopped.value, SystemExit)  # passes through nnU-Net's `except Exception`
    assert f"2 of the {x.numel()} values of an input patch are NaN or infinite" in str(stopped.value)
    assert "--continue_prediction" in str(stopped.value)
    net.train()(x)  # no check while training


@arch_names
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_forward_is_finite(arch_name, topology_case, dtype):
    topology, in_ch = topology_case
    net = build(arch_name, topology, in_ch)
    x = torch.randn(1, in_ch, *topology.patch_size)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = net(x)
    assert [tuple(o.shape) for o in out] == expected_shapes(net, topology, 1, topology.patch_size)
    assert all(torch.isfinite(o).all() for o in out)
