"""torch.compile as nnU-Net does it: on CUDA it compiles the network with the default backend
(inductor), which runs on CPU with the machine's C compiler.

Every architecture that compiles must give eager's loss, gradients and evaluation output compiled,
as one graph (evaluation starts with one break on purpose: the input check). Inductor takes 35 to 95
seconds per small network on two cores, so CI runs one case per run (the `compile` rotation, shared
with tests/test_gpu_check.py; --full-matrix runs all). An architecture whose entry says why it
cannot be compiled well (`Architecture.compile_off`) gets nnU-Net's compile switched off by its trainer,
with that reason in the training log.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

import nnunet_ext.trainers as trainers
from conftest import make_topology
from nnunet_ext.registry import ARCHITECTURES

TOPOLOGIES = {2: make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2)], [8, 16, 32, 32], (32, 48)),
              3: make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)], [4, 8, 16, 16], (8, 32, 32))}
# (architecture, preset or "default", dimension) for every architecture that compiles
COMPILED = [(name, preset, dim) for name, arch in ARCHITECTURES.items() if not arch.compile_off
            for preset in ("default", *arch.presets) for dim in arch.dims]


@pytest.mark.parametrize("name,preset,dim", [  # one case per run: a single pseudo-architecture, "compile"
    pytest.param(n, p, d, marks=pytest.mark.matrix("compile", f"inductor-{n}-{p}-{d}d", group="compile"),
                 id=f"{n}-{p}-{d}d") for n, p, d in COMPILED])
def test_inductor_gives_eagers_training_step_and_output_in_one_graph(name, preset, dim):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    topology = TOPOLOGIES[dim]
    arch = ARCHITECTURES[name]
    options = {**arch.presets.get(preset, {}),
               **({"drop_path_rate": 0.0} if "drop_path_rate" in arch.options() else {})}  # nothing random
    torch.manual_seed(0)
    net = arch.build(topology, 1, 3, **options)
    x = torch.randn(2, 1, *topology.patch_size, generator=torch.Generator().manual_seed(1))

    def step(model, x):
        net.zero_grad(set_to_none=True)
        loss = sum(0.5 ** i * o.square().mean() for i, o in enumerate(model(x)))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    eager_loss, eager_grads = step(net, x)
    compiled = torch.compile(net)  # nnU-Net's call: the default backend, inductor
    loss, grads = step(compiled, x)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}  # training: one graph
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    net.eval()
    with torch.no_grad():
        for out, expected in zip(compiled(x), net(x)):
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # Evaluation: one break on purpose, before anything is computed (the input's finiteness check, which
    # raises on data and so cannot be traced), then one graph.
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert len(breaks) == 1 and sum(breaks.values()) == 1 and "check_finite" in next(iter(breaks)), breaks

    _, exact = step(net.train().double(), x.double())
    scale = max(g.abs().max().item() for g in exact.values())
    for key, expected in exact.items():
        # Inductor's gradients as close to float64's as eager's (within twice their distance), or within 1e-4 of
        # the largest gradient. float32 rounding alone takes some gradients that far: a per-channel scale or bias
        # before MedNeXt's per-channel GroupNorm has a gradient that is zero in exact arithmetic but for the
        # norm's eps (MedNeXt-L k5 here, a 1x1x1 depthwise weight: 2.1e-4 eager, 1.2e-4 compiled; PyTorch's own
        # layers 3.6e-4). A wrong gradient is off by its size.
        errors = [(g[key].double() - expected).abs().max().item() for g in (grads, eager_grads)]
        assert errors[0] <= max(2 * errors[1], 1e-4 * scale), (key, errors, scale)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_trainer_turns_compile_off_where_the_entry_says_why(name, nnunet_env, monkeypatch, capsys):
    """nnU-Net compiles on CUDA unless nnUNet_compile says otherwise; the decision, checked on a trainer
    that believes it is on CUDA (nothing runs there)."""
    monkeypatch.delenv("nnUNet_compile", raising=False)
    folder = nnunet_env.preprocessed / nnunet_env.dataset
    plans, dataset = (json.loads((folder / f).read_text()) for f in ("nnUNetPlans.json", "dataset.json"))
    arch = ARCHITECTURES[name]
    trainer = getattr(trainers, arch.trainer)({**plans, "continue_training": False}, "2d", 0, dataset,
                                              torch.device("cpu"))
    trainer.device = torch.device("cuda")
    capsys.readouterr()
    assert trainer._do_i_compile() is not bool(arch.compile_off)
    assert trainer._do_i_compile() is not bool(arch.compile_off)
    said = capsys.readouterr().out
    assert said.count(f"torch.compile is off for {name}: ") == (1 if arch.compile_off else 0)
