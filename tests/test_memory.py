"""The training-memory measure, the footprint the memory models scale with, and the models the
planner uses (nnunet_ext.tools.memory, nnunet_ext.memory_models, `nnunet-ext benchmark-memory`).

The per-architecture checks take turns within a family (conftest's rotations, groups `footprint` and
`memory`): MedNeXt's four sizes and U-Mamba's two variants share their modules, and measuring a size's
training step costs up to a minute."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import TOPOLOGIES, matrix
from nnunet_ext import memory_models
from nnunet_ext.blocks.kan import KANLinear
from nnunet_ext.memory_models import REFERENCE, Footprint, MemoryModel, relative_memory
from nnunet_ext.ops.b_spline import b_spline_bases, uniform_grid
from nnunet_ext.ops.selective_scan import pytorch_paths_only
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools import benchmark_memory, memory
from nnunet_ext.tools.cli import main


def test_live_tensor_bytes_follow_allocations_and_frees():
    weight = torch.ones(300, 10)
    with memory.LiveTensorBytes(existing=[weight]) as counter:
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
    truth = MemoryModel(per_unit=6.0, per_extra=2.5, per_parameter=3.0)
    footprints = [Footprint(units=u, extra_elements=a, parameters=p)
                  for u, a, p in ((10**6, 0, 10**5), (4 * 10**6, 10**6, 3 * 10**5), (9 * 10**6, 4 * 10**6, 3 * 10**5),
                                  (2 * 10**6, 10**5, 2 * 10**5))]
    fitted = benchmark_memory.fit([(f, b, truth.estimate(f, b)) for f, b in zip(footprints, (2, 2, 1, 4))])
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


class _HandWrittenAttention(nn.Module):
    """Attention spelled out (matrix product, softmax), as a new network might write it: (b, n, c) tokens."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x


def test_extra_elements_count_attention_matrices_and_spline_bases():
    """Each kind the counter knows, against the number of elements it forms, from the shapes."""
    def count(fn, *args):
        with memory._ExtraActivations() as counter:
            fn(*args)
        return counter.elements

    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8)  # (batch, heads, tokens, width)
    assert count(F.scaled_dot_product_attention, q, k, k) == 2 * 3 * 10 * 7
    assert count(lambda: F.scaled_dot_product_attention(query=q, key=k, value=k)) == 2 * 3 * 10 * 7
    assert count(_HandWrittenAttention(), torch.randn(2, 5, 4)) == 2 * 5 * 5
    assert count(b_spline_bases, torch.randn(6, 4), uniform_grid(4, 5, 3), 3) == 6 * 4 * 8
    with pytorch_paths_only():  # the compiled CPU loop forms a KANLinear's bases a few rows at a time
        assert count(KANLinear(4, 3), torch.randn(6, 4)) == 6 * 4 * 8
    assert count(nn.Conv2d(2, 3, 3), torch.randn(1, 2, 8, 8)) == 0


@pytest.mark.parametrize("name", [pytest.param(n, marks=matrix(n, "footprint", group="footprint"))
                                  for n in ARCHITECTURES])
def test_footprints_counted_on_the_meta_device_are_those_of_real_tensors(name):
    """The planner counts on the meta device (no data, any patch size in about a second); every
    registered network must run there and count what it counts on real tensors."""
    for topology, channels in TOPOLOGIES.values():
        if topology.dim not in ARCHITECTURES[name].dims:
            continue
        torch.manual_seed(0)
        real = ARCHITECTURES[name].build(topology, channels, 3)
        with torch.device("meta"):
            meta = ARCHITECTURES[name].build(topology, channels, 3)
        assert all(p.is_meta for p in meta.parameters())
        assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
        assert memory.extra_elements(meta, channels, topology.patch_size) == \
            memory.extra_elements(real, channels, topology.patch_size)


@pytest.mark.parametrize("name", [pytest.param(n, marks=matrix(n, "memory-model", group="memory"))
                                  for n in ARCHITECTURES])
def test_every_architecture_has_a_memory_model_within_the_tolerance_per_dimension(name):
    """On the first patch the models were checked on and never fitted on: `nnunet-ext benchmark-memory`
    checks every patch."""
    arch = ARCHITECTURES[name]
    for dim in arch.dims:
        model, reference = arch.memory_model(dim), memory_models.memory_model(REFERENCE, dim)
        measured = memory.measure(name, memory.CHECK_PATCHES[dim][0])
        assert abs(model.estimate(measured["footprint"], measured["batch"]) / measured["peak_bytes"] - 1) \
            <= memory.TOLERANCE
        patch, architecture = memory.default_plans_architecture(memory.CHECK_PATCHES[dim][0])
        ours = memory.footprint(name, architecture, patch, 1, 3)
        plain = memory.footprint(REFERENCE, architecture, patch, 1, 3)
        real = memory.build(name, architecture, patch, 1, 3)
        assert ours == measured["footprint"] and ours.units == plain.units
        assert ours.parameters == sum(p.numel() for p in real.parameters())
        assert relative_memory(model, dim, ours, plain) > 0 and relative_memory(reference, dim, plain, plain) == 1


def test_a_missing_memory_model_names_the_command_that_makes_it():
    with pytest.raises(memory_models.MissingMemoryModel) as missing:
        memory_models.memory_model("not_measured", 3)
    assert "nnunet-ext benchmark-memory -a not_measured --dims 3 --fit --write" in str(missing.value.args[0])


def test_models_are_stored_keeping_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_models, "FILE", tmp_path / "models.json")
    memory_models.FILE.write_text('{"a": {"2": {"per_unit": 1.0, "per_extra": 0.0, "per_parameter": 2.0}}}')
    memory_models.save({("b", 3): MemoryModel(3.0, 4.0, 5.0), ("a", 3): MemoryModel(6.0, 0.0, 0.0)})
    assert memory_models.load() == {"a": {2: MemoryModel(1.0, 0.0, 2.0), 3: MemoryModel(6.0, 0.0, 0.0)},
                                    "b": {3: MemoryModel(3.0, 4.0, 5.0)}}


def test_benchmark_memory_checks_the_stored_model_on_patches_it_was_not_fitted_on(capsys):
    reports, real = [], benchmark_memory.benchmark_memory

    def recording(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]
    with mock.patch.object(benchmark_memory, "benchmark_memory", recording):
        assert main(["benchmark-memory", "-a", "vit_hybrid", "--dims", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith(("PlainConvUNet ", "vit_hybrid "))]
    assert [tuple(r[:3]) for r in rows] == [(n, "x".join(map(str, p)), "check") for n in ("PlainConvUNet", "vit_hybrid")
                                            for p in memory.CHECK_PATCHES[2]]
    for r, printed_row in zip(reports[0]["rows"], rows):
        model = memory_models.memory_model(r["network"], 2)
        assert r["estimate_bytes"] == model.estimate(r["footprint"], r["batch"])
        # on these patches, which the fit never saw, the estimate is within the tolerance of the measurement
        assert abs(r["estimate_bytes"] / r["peak_bytes"] - 1) <= memory.TOLERANCE
        assert printed_row[-1] == f"{r['error']:+.1%}"
    assert "Largest error on the check patches" in printed


def test_write_needs_fit(capsys):
    assert main(["benchmark-memory", "--write"]) == 1
    assert "--write stores the models --fit fits; add --fit." in capsys.readouterr().err
