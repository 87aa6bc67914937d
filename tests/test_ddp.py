"""Multi-GPU training as nnU-Net does it (`-num_gpus N`: SyncBatchNorm, then DistributedDataParallel with
default arguments, so a parameter without a gradient is an error), run on CPU: two processes and the
gloo backend, SyncBatchNorm's computation in a stand-in (PyTorch runs it on GPUs only). nnU-Net's
-num_gpus itself needs NCCL and GPUs (docs/testing.md).

For every architecture, with its default options and with every other value of each option whose
annotation names its values (`Architecture.option_values`: the switches that change the parameter
set), three of nnU-Net's SGD steps on two ranks, each on half of a batch, must leave identical weights
on both ranks, equal to one process's on the whole batch; so must the first step's gradients.

In float64 (the Mamba layers' scans and convolutions still run the compiled float32 loops): in float32
the whole batch and its halves round differently, and where a LeakyReLU's input lies within that
rounding of zero its slope differs between them. One such input of LKM-UNet's 10^5, at -3.6e-7 in one
process and +1.8e-7 on a rank, moved the first gradients by 8.5e-4 of the largest, U-Mamba_Enc's
LayerNorm over 4 channels amplified rounding 2000-fold in three steps; float64 leaves both far under
the tolerances.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn as distributed_nn
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import TOPOLOGIES, initialized_trainer
from nnunet_ext.registry import ARCHITECTURES

STEPS, NUM_CLASSES = 3, 3


def cases() -> list[tuple[str, str, dict]]:
    """(architecture, topology, options): the defaults on a 2D and a 3D ResEnc topology, every other
    option value on the 2D one (or the 3D one for a 3D-only architecture)."""
    found = []
    for name, arch in ARCHITECTURES.items():
        topologies = [t for t in ("2d_4stages_1ch", "3d_4stages_resenc_1ch") if TOPOLOGIES[t][0].dim in arch.dims]
        defaults = arch.options()
        fixed = {"drop_path_rate": 0.0} if "drop_path_rate" in defaults else {}  # nothing random: ranks == one process
        found += [(name, t, fixed) for t in topologies]
        found += [(name, topologies[0], {**fixed, option: value}) for option, values in arch.option_values().items()
                  for value in values if value != defaults[option]]
    return found


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm's computation where PyTorch runs it only on GPUs: in training, the statistics of
    every rank's batch together (sums all-reduced, through autograd), so that ranks normalise as one
    process does over the whole batch. Stands in for each SyncBatchNorm that nnU-Net's conversion makes."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        axes, channels = [0, *range(2, x.dim())], x.shape[1]
        count = x.new_tensor([x.numel() / channels])
        total = distributed_nn.all_reduce(torch.cat([x.sum(axes), x.square().sum(axes), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean.square()
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, channels) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


def on_cpu(module: nn.Module) -> nn.Module:
    """`module` with each SyncBatchNorm replaced by a GlooSyncBatchNorm holding the same parameters and buffers
    (not copies: convert_sync_batchnorm makes one SyncBatchNorm per reference to a BatchNorm, sharing its
    tensors, and dynamic_network_architectures' blocks reference each norm twice)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            replacement = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum)
            for tensor in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, tensor, getattr(child, tensor))
            setattr(module, name, replacement)
        else:
            on_cpu(child)
    return module


def train(name: str, topology_name: str, options: dict, rank: int | None = None) -> dict:
    """nnU-Net's optimiser for STEPS steps on a fixed batch of 4 (rank r: samples 2r, 2r + 1, under DDP);
    returns the first step's gradients and the final weights."""
    topology, channels = TOPOLOGIES[topology_name]
    torch.manual_seed(0)
    net = ARCHITECTURES[name].build(topology, channels, NUM_CLASSES, **options).double()
    for module in net.modules():  # nothing random (D-LKA Net's official blocks drop channels): ranks == one process
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    x = torch.randn(4, channels, *topology.patch_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if rank is not None:
        net = DistributedDataParallel(on_cpu(nn.SyncBatchNorm.convert_sync_batchnorm(net)))
        x = x[2 * rank:2 * rank + 2]
    module = net.module if rank is not None else net
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    gradients = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        sum(0.5 ** i * o.square().mean() for i, o in enumerate(net(x))).backward()  # nnU-Net's weighting
        if gradients is None:
            gradients = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        optimizer.step()
    return {"gradients": gradients, "weights": {k: v.detach().clone() for k, v in module.state_dict().items()}}


def _rank(rank: int, all_cases, rendezvous: str, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    for i, case in enumerate(all_cases):
        try:
            result = train(*case, rank=rank)
        except Exception as e:  # both ranks meet the same error (DDP's checks run on each): reported, not hung
            result = f"{type(e).__name__}: {e}"
        torch.save(result, f"{out}/{i}_{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Every case on two ranks, in two spawned processes (as torchrun would start them)."""
    out = tmp_path_factory.mktemp("ddp")
    all_cases = cases()
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(r, all_cases, str(out / "rendezvous"), str(out))) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=900)
    alive = [p for p in ranks if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive and all(p.exitcode == 0 for p in ranks), "a DDP rank hung or crashed"
    return {case: [torch.load(out / f"{i}_{r}.pt", weights_only=False) for r in (0, 1)]
            for i, case in enumerate(map(json.dumps, all_cases))}


@pytest.mark.parametrize("case", [pytest.param(json.dumps(c), id=f"{c[0]}-{c[1]}-{c[2]}") for c in cases()])
def test_ddp_ranks_agree_with_one_process_on_the_whole_batch(case, ddp_results):
    first, second = ddp_results[case]
    assert not isinstance(first, str), first  # e.g. a parameter without a gradient
    for key in first["weights"]:
        assert torch.equal(first["weights"][key], second["weights"][key]), key
    reference = train(*json.loads(case))
    for kind, tolerance in (("gradients", 1e-5), ("weights", 1e-4)):  # weights: three steps compound rounding
        # relative to the largest entry of the kind: a bias before a norm has a gradient of zero, up to rounding
        scale = max(t.abs().max().item() for t in reference[kind].values())
        for key, expected in reference[kind].items():
            atol = tolerance * scale
            torch.testing.assert_close(first[kind][key], expected, rtol=tolerance, atol=atol,
                                       msg=lambda m: f"{kind} of {key}: {m}")


def test_the_cases_cover_every_option_value():
    covered = {(name, option, json.dumps(value)) for name, _, options in cases() for option, value in options.items()}
    for name, arch in ARCHITECTURES.items():
        defaults = arch.options()
        for option, values in arch.option_values().items():
            assert {(name, option, json.dumps(v)) for v in values if v != defaults[option]} <= covered


def test_checkpoint_check_and_loading_with_ddp(nnunet_env, tmp_path):
    """`--c` and `--val` under DDP (`-num_gpus`): a trainer whose network is wrapped in DDP checks and
    loads the checkpoint nnU-Net writes (the unwrapped network's keys), and still refuses another
    architecture's; without DDP, a checkpoint whose keys carry DDP's `module.` prefix loads too."""
    def checkpoint(t, weights, prefix):
        path = tmp_path / f"{prefix or 'plain'}.pth"
        torch.save({"network_weights": {prefix + k: v for k, v in weights.items()},
                    "trainer_name": "nnUNetTrainerAttentionUNet", "init_args": t.my_init_kwargs, "current_epoch": 0,
                    "logging": t.logger.get_checkpoint(), "_best_ema": None,
                    "optimizer_state": t.optimizer.state_dict(),
                    "grad_scaler_state": None, "inference_allowed_mirroring_axes": None}, path)
        return str(path)

    single, wrapped, other = (initialized_trainer(nnunet_env, n) for n in
                              ("nnUNetTrainerAttentionUNet", "nnUNetTrainerAttentionUNet", "nnUNetTrainerUKAN"))
    expected = {k: v.clone() + 1 for k, v in single.network.state_dict().items()}
    single.load_checkpoint(checkpoint(single, expected, "module."))
    assert all(torch.equal(single.network.state_dict()[k], v) for k, v in expected.items())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for t in (wrapped, other):  # as nnU-Net's initialize() wraps it under -num_gpus
            t.network, t.is_ddp = DistributedDataParallel(t.network), True
        written = checkpoint(wrapped, expected, "")
        wrapped.load_checkpoint(written)
        assert all(torch.equal(wrapped.network.module.state_dict()[k], v) for k, v in expected.items())
        with pytest.raises(RuntimeError, match="was written by nnUNetTrainerAttentionUNet and does not hold "
                                               "nnUNetTrainerUKAN's network"):
            other.load_checkpoint(written)
    finally:
        dist.destroy_process_group()
