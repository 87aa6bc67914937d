"""The training-memory measure and the memory model the planner uses (nnunet_ext.memory)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nnunet_ext import memory
from nnunet_ext.blocks.kan import KANLinear
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.cli import main


def test_live_tensor_bytes_follow_allocations_and_frees():
    weight = torch.ones(300, 10)
    with memory._LiveTensorBytes(existing=[weight]) as counter:
        transposed = weight.t()  # a view of an existing tensor: nothing allocated
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(2000)  # 8000
        view = b[:10]  # no new storage
        small = view * 1  # 40
        del a
        c = torch.ones(500)  # 2000: the live total stays below the peak of 12040
    assert counter.peak == 4000 + 8000 + 40
    assert (transposed.shape, b.numel(), small.numel(), c.numel()) == ((10, 300), 2000, 10, 500)


class _AllAllocations(TorchDispatchMode):
    """Every byte any operator allocates, never subtracting frees: an upper bound of the peak."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def test_training_peak_lies_between_what_backward_must_hold_and_everything_allocated():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(),
                        nn.Conv3d(16, 16, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(16, 3, 1))
    x = torch.randn(2, 2, 12, 16, 16)
    peak = memory.training_peak_bytes(net, x)

    saved = {}  # what autograd keeps for the backward pass, one entry per storage

    def keep(t):
        if t.data_ptr() not in {p.data_ptr() for p in net.parameters()} and t.data_ptr() != x.data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        net(x)
    gradients = sum(p.numel() * p.element_size() for p in net.parameters())
    with _AllAllocations() as everything:
        net.zero_grad(set_to_none=True)
        net(x).mean().backward()
    assert sum(saved.values()) + gradients <= peak < everything.total


def test_fit_recovers_the_coefficients_of_exact_samples():
    truth = memory.MemoryModel(per_unit=6.0, per_extra=2.5, per_parameter=3.0)
    footprints = [memory.Footprint(units=u, extra_elements=a, parameters=p)
                  for u, a, p in ((10**6, 0, 10**5), (4 * 10**6, 10**6, 3 * 10**5), (9 * 10**6, 4 * 10**6, 3 * 10**5),
                                  (2 * 10**6, 10**5, 2 * 10**5))]
    fitted = memory.MemoryModel.fit([(f, b, truth.estimate(f, b)) for f, b in zip(footprints, (2, 2, 1, 4))])
    assert fitted.per_unit == pytest.approx(6.0) and fitted.per_extra == pytest.approx(2.5)
    assert fitted.per_parameter == pytest.approx(3.0)


def test_lkm_unet_is_measured_on_its_pytorch_paths(monkeypatch):
    """The planner's models describe Mamba's PyTorch paths, the most memory any device needs, even
    where the compiled CPU loops (on by default, and keeping less) would run."""
    from nnunet_ext.ops import cpu_kernel
    from nnunet_ext.ops.selective_scan import pytorch_paths_only

    monkeypatch.setattr(cpu_kernel, "_enabled", True)
    measured = memory.measure("lkm_unet", (64, 64))["peak_bytes"]
    patch, architecture = memory.default_plans_architecture((64, 64))
    net, x = memory.build("lkm_unet", architecture, patch, 1, 3), torch.randn(memory.FIT_BATCH, 1, *patch)
    compiled = memory.training_peak_bytes(net, x)
    with pytorch_paths_only():
        assert measured == memory.training_peak_bytes(net, x) > 1.2 * compiled


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_has_a_memory_model_per_dimension(name):
    arch = ARCHITECTURES[name]
    assert set(arch.memory) == set(arch.dims)
    for dim, model in arch.memory.items():
        patch, architecture = memory.default_plans_architecture(memory.CHECK_PATCHES[dim][0])
        net = memory.build(name, architecture, patch, 1, 3)
        ours = memory.footprint(net, architecture, patch, 1, 3)
        plain = memory.footprint(None, architecture, patch, 1, 3)
        assert ours.units == plain.units and ours.parameters == sum(p.numel() for p in net.parameters())
        assert memory.relative_memory(model, dim, ours, plain) > 0
        assert memory.relative_memory(memory.PLAIN_UNET[dim], dim, plain, plain) == 1


def _attention_formed(q, k):
    return q.shape[1] * q.shape[2] * k.shape[2]  # (batch 1, heads, queries, width)


def _spline_bases_formed(x):
    return x.numel() * 8  # (tokens, in_features) -> grid_size 5 + spline_order 3 bases each


# What each network's extra_elements counts, and the call that forms it in a forward pass.
EXTRA = {"attention_unet": (F, "scaled_dot_product_attention", _attention_formed),
         "vit_hybrid": (F, "scaled_dot_product_attention", _attention_formed),
         "ukan": (KANLinear, "b_splines", _spline_bases_formed)}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("dim", [2, 3])
def test_extra_elements_count_what_a_forward_pass_forms(name, dim):
    """Against the arguments of every call that forms them in a forward pass of one sample."""
    patch, architecture = memory.default_plans_architecture((64, 64) if dim == 2 else (16, 32, 32))
    net = memory.build(name, architecture, patch, 1, 2)
    if name not in EXTRA:
        assert net.extra_elements == 0
        return
    owner, function, count = EXTRA[name]
    real, formed = getattr(owner, function), []

    def counting(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        formed.append(count(*tensors[:2]) if owner is F else count(tensors[0]))
        return real(*args, **kwargs)
    with mock.patch.object(owner, function, counting), torch.no_grad():
        net(torch.zeros(1, 1, *patch))
    assert formed and net.extra_elements == sum(formed)


def test_benchmark_memory_checks_the_registered_model_on_patches_it_was_not_fitted_on(capsys):
    reports, real = [], memory.benchmark_memory

    def recording(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]
    with mock.patch.object(memory, "benchmark_memory", recording):
        assert main(["benchmark-memory", "-a", "vit_hybrid", "--dims", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith(("PlainConvUNet ", "vit_hybrid "))]
    assert [tuple(r[:3]) for r in rows] == [(n, "x".join(map(str, p)), "check") for n in ("PlainConvUNet", "vit_hybrid")
                                            for p in memory.CHECK_PATCHES[2]]
    for r, printed_row in zip(reports[0]["rows"], rows):
        model = memory.PLAIN_UNET[2] if r["network"] == memory.REFERENCE else ARCHITECTURES[r["network"]].memory[2]
        assert r["estimate_bytes"] == model.estimate(r["footprint"], r["batch"])
        # on these patches, which the fit never saw, the estimate is within the tolerance of the measurement
        assert abs(r["estimate_bytes"] / r["peak_bytes"] - 1) <= memory.TOLERANCE
        assert printed_row[-1] == f"{r['error']:+.1%}"
    assert "Largest error on the check patches" in printed
