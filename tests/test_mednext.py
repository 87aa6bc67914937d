"""MedNeXt: its sizes' tables, the plans layout on anisotropic and deep topologies, the up block's padding, its
training recipe with the official network's deep supervision, gradient checkpointing, and UpKern (the function
against interpolation written out, the command on a checkpoint nnU-Net wrote). The official network's numbers
are tests/test_official.py's; the contract every network meets is tests/test_networks.py's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import initialized_trainer, make_topology
from nnunet_ext.networks.mednext import MedNeXtB, MedNeXtBlock, MedNeXtL, MedNeXtM, MedNeXtS
from nnunet_ext.ops.selective_scan import pytorch_paths_only
from nnunet_ext.tools.cli import main as cli
from nnunet_ext.tools.memory import training_peak_bytes
from nnunet_ext.tools.upkern import kernel5_trainer, upkern
from nnunet_ext.trainers.recipes import MedNeXtRecipe

FIVE_STAGES = make_topology(3, [(1, 1, 1)] + [(2, 2, 2)] * 4, [4, 8, 16, 32, 32], (32, 32, 32))
# as nnU-Net plans thick slices: no pooling and 1-wide kernels along the first axis until it catches up
ANISOTROPIC = dataclasses.replace(
    make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [4, 8, 16, 32, 32], (20, 48, 32)),
    kernel_sizes=((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)))

# create_mednext_v1.py's lists of nine: encoder stages 0-3, the bottleneck, decoder stages 3-0
OFFICIAL = {MedNeXtS: ([2] * 9, [2] * 9),
            MedNeXtB: ([2, 3, 4, 4, 4, 4, 4, 3, 2], [2] * 9),
            MedNeXtM: ([2, 3, 4, 4, 4, 4, 4, 3, 2], [3, 4, 4, 4, 4, 4, 4, 4, 3]),
            MedNeXtL: ([3, 4, 8, 8, 8, 8, 8, 4, 3], [3, 4, 8, 8, 8, 8, 8, 4, 3])}


def stage_sequence(net) -> list[nn.Sequential]:
    """The stages in the official lists' order: encoder 0 to the bottleneck, then the decoder up to full resolution."""
    return [*net.encoder.stages, *net.decoder.stages]


@pytest.mark.parametrize("size", OFFICIAL, ids=lambda c: c.__name__)
def test_sizes_have_the_official_expansions_and_block_counts(size):
    net = size(FIVE_STAGES, 1, 2)
    expansion, blocks = OFFICIAL[size]
    stages = stage_sequence(net)
    assert [len(stage) for stage in stages] == blocks
    assert [stage[0].conv2.out_channels // stage[0].conv2.in_channels for stage in stages] == expansion
    # resampling blocks take the expansion of the stage they lead into, as the official down_s and up_s
    assert [d.conv2.out_channels // d.conv2.in_channels for d in net.encoder.down] == expansion[1:5]
    assert [u.conv2.out_channels // u.conv2.in_channels for u in net.decoder.transpconvs] == expansion[5:]


def test_deeper_plans_repeat_the_deepest_stages_values():
    deep = make_topology(2, [(1, 1)] + [(2, 2)] * 6, [4, 8, 16, 32, 32, 32, 32], (128, 128))
    stages = stage_sequence(MedNeXtL(deep, 1, 2))
    assert [len(stage) for stage in stages] == [3, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 4, 3]


def test_plans_layout_keeps_the_plans_widths_and_a_kernel_of_one_where_they_do_not_convolve():
    net = MedNeXtB(ANISOTROPIC, 4, 3, kernel_size=5)
    assert [stage[0].conv1.in_channels for stage in net.encoder.stages] == [4, 8, 16, 32, 32]
    assert net.encoder.stages[0][0].conv1.kernel_size == (1, 5, 5)  # the plans' (1, 3, 3) at full resolution
    assert net.encoder.down[0].conv1.stride == (1, 2, 2) and net.encoder.down[0].conv1.kernel_size == (1, 5, 5)
    assert net.encoder.down[1].conv1.kernel_size == (5, 5, 5)
    outputs = net(torch.randn(1, 4, *ANISOTROPIC.patch_size))
    assert [tuple(o.shape[2:]) for o in outputs] == [(20, 48, 32), (20, 24, 16), (10, 12, 8), (5, 6, 4)]


def test_official_layout_doubles_the_first_width_at_every_stage():
    net = MedNeXtS(ANISOTROPIC, 1, 2, layout="official")
    assert [stage[0].conv1.in_channels for stage in net.encoder.stages] == [4, 8, 16, 32, 64]
    assert {stage[0].conv1.kernel_size for stage in net.encoder.stages} == {(3, 3, 3)}
    assert all(isinstance(head, nn.ConvTranspose3d) for head in net.decoder.seg_layers)


def test_up_block_pads_the_missing_positions_at_the_start_as_the_official_code():
    """A transposed convolution of stride 2 and padding k // 2 gives 2n - 1 positions from n; the first one of
    each strided axis is the padding, on the block's branch and on its residual alike."""
    block = MedNeXtBlock(nn.Conv3d, 4, 2, 2, (3, 3, 3), (1, 2, 2), transposed=True)
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(0.5)  # biases too, so that a position the convolutions wrote is not zero
        y = block(torch.randn(1, 4, 3, 4, 5))
    assert y.shape == (1, 2, 3, 8, 10)
    assert torch.equal(y[:, :, :, 0], torch.zeros_like(y[:, :, :, 0]))
    assert torch.equal(y[:, :, :, :, 0], torch.zeros_like(y[:, :, :, :, 0]))
    assert (y[:, :, :, 1:, 1:] != 0).all()


def test_an_even_kernel_is_refused():
    with pytest.raises(ValueError, match="must be odd"):
        MedNeXtS(FIVE_STAGES, 1, 2, kernel_size=4)


def test_checkpointing_gives_the_same_gradients_in_less_memory_and_is_on_for_m_and_l_as_officially():
    """The official trainers checkpoint M and L, not S and B. A checkpointed block keeps its input only and
    computes its inside again in the backward pass: the gradients are the ones without, the peak is lower."""
    defaults = {size: all(b.checkpointing for b in size(FIVE_STAGES, 1, 2).modules() if isinstance(b, MedNeXtBlock))
                for size in (MedNeXtS, MedNeXtB, MedNeXtM, MedNeXtL)}
    assert defaults == {MedNeXtS: False, MedNeXtB: False, MedNeXtM: True, MedNeXtL: True}
    torch.manual_seed(0)
    plain = MedNeXtM(FIVE_STAGES, 1, 2, checkpointing=False)
    checkpointed = MedNeXtM(FIVE_STAGES, 1, 2)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with pytorch_paths_only():  # the same layers in both: without checkpointing the CPU path's pointwise MLP
        peaks = [training_peak_bytes(net, x) for net in (plain, checkpointed)]  # sums in another order
    for ours, reference in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)
    assert peaks[1] < 0.7 * peaks[0], peaks
    with torch.no_grad():  # nothing to keep for a backward pass: no recomputation
        torch.testing.assert_close(checkpointed.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("dim", [3, 2])
def test_on_the_cpu_path_training_keeps_no_expanded_map_and_gives_the_same_gradients(dim):
    """MedNeXt-B trains on the CPU path, 2D maps channels-last as 3D ones, with each block's expanded maps (up to 4
    times its channels, before and after the GELU) formed a few rows at a time and not kept: in less than 60% of
    the peak its layers reach on the PyTorch paths, with the gradients they give in float64."""
    torch.manual_seed(0)
    topology = FIVE_STAGES if dim == 3 else make_topology(2, [(1, 1)] + [(2, 2)] * 4, [4, 8, 16, 32, 32], (128, 128))
    net, x = MedNeXtB(topology, 1, 2), torch.randn(2, 1, *topology.patch_size)
    peak = training_peak_bytes(net, x)
    ours = {name: p.grad for name, p in net.named_parameters()}
    with pytorch_paths_only():
        assert peak < 0.6 * training_peak_bytes(net, x)
    training_peak_bytes(net.double(), x.double())
    for name, p in net.named_parameters():
        if "conv1.bias" not in name:  # a bias before a per-channel norm: its gradient is rounding only
            scale = p.grad.abs().max()
            torch.testing.assert_close(ours[name].double() / scale, p.grad / scale, rtol=0, atol=2e-5, msg=name)


def test_recipe_is_adamw_with_the_official_eps_and_nnunets_poly_schedule():
    recipe = MedNeXtRecipe.__new__(MedNeXtRecipe)  # the optimiser alone, without plans
    recipe.network, recipe.initial_lr, recipe.weight_decay, recipe.num_epochs = nn.Linear(2, 2), 1e-3, 3e-5, 10
    optimizer, schedule = recipe.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["eps"] == 1e-4 and optimizer.defaults["weight_decay"] == 3e-5
    schedule.step(5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_official_trainer_supervises_the_bottleneck_as_the_v1_trainer_and_the_default_as_nnunet(nnunet_env,
                                                                                                monkeypatch):
    """The official v1 trainer supervises all five outputs, the bottleneck's last, with the weights 1, 1/2, 1/4,
    1/8, 1/16 of six (the sixth zeroed, as nnU-Net v1 zeroes its lowest), normalised; nnU-Net 2.8 supervises the
    decoder stages and zeroes the lowest. A training step runs on the batch nnU-Net's data loader makes, and the
    bottleneck's head learns."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # nnU-Net's data loader in this process
    official = initialized_trainer(nnunet_env, "nnUNetTrainerMedNeXtSOfficial_debug")
    default = initialized_trainer(nnunet_env, "nnUNetTrainerMedNeXtS_debug")
    pools = np.array(official.configuration_manager.pool_op_kernel_sizes)
    assert official._get_deep_supervision_scales() == (1 / np.cumprod(pools, axis=0)).tolist()
    assert default._get_deep_supervision_scales() == nnUNetTrainer._get_deep_supervision_scales(default)
    v1 = np.array([1 / 2 ** i for i in range(len(pools) + 1)])
    v1[-1] = 0
    assert official.loss.weight_factors == pytest.approx((v1 / v1.sum())[:len(pools)])
    stock = np.array([1 / 2 ** i for i in range(len(pools) - 1)])
    stock[-1] = 0
    assert default.loss.weight_factors == pytest.approx(stock / stock.sum())

    batch = next(official.get_dataloaders()[0])
    assert len(batch["target"]) == len(pools)
    assert np.isfinite(official.train_step(batch)["loss"])
    assert official.network.bottleneck_head.weight.grad.abs().max() > 0  # nnU-Net zeroes gradients before a step


def test_upkern_resizes_kernels_as_linear_interpolation_and_copies_the_rest():
    """Against the interpolation written out: from 3 taps to 5, corners not aligned, output tap i reads input
    position (i + 0.5) * 3 / 5 - 0.5, clamped: taps 0, 0.4, 1, 1.6, 2 (separable over the axes in 2D)."""
    source, target = MedNeXtS(FIVE_STAGES, 1, 2), MedNeXtS(FIVE_STAGES, 1, 2, kernel_size=5)
    grown = upkern(source.state_dict(), target.state_dict())
    target.load_state_dict(grown)
    old, new = source.encoder.stages[1][0].conv1.weight, target.encoder.stages[1][0].conv1.weight
    w = torch.tensor([[1, 0, 0, 0, 0], [0.6, 0.4, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0.4, 0.6, 0, 0], [0, 0, 1, 0, 0]])
    resize = w[:, :3]
    torch.testing.assert_close(new, torch.einsum("ai,bj,ck,oxijk->oxabc", resize, resize, resize, old))
    assert torch.equal(target.encoder.stages[1][0].conv2.weight, source.encoder.stages[1][0].conv2.weight)
    assert torch.equal(target.encoder.stages[1][0].norm.weight, source.encoder.stages[1][0].norm.weight)


def test_upkern_names_the_kernel5_trainer_of_each_kernel3_one():
    assert kernel5_trainer("nnUNetTrainerMedNeXtB") == ("mednext_b", "", "k5")
    assert kernel5_trainer("nnUNetTrainerMedNeXtLOfficial_demo") == ("mednext_l", "official", "official_k5")
    for refused in ("nnUNetTrainerMedNeXtBK5", "nnUNetTrainerLKMUNet"):
        with pytest.raises(ValueError, match="not a kernel-3 MedNeXt trainer"):
            kernel5_trainer(refused)


def test_upkern_command_turns_a_checkpoint_nnunet_wrote_into_pretrained_weights_for_the_kernel5_trainer(
        nnunet_env, tmp_path, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    kernel3 = initialized_trainer(nnunet_env, "nnUNetTrainerMedNeXtS_debug")
    kernel3.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    assert cli(["upkern", str(tmp_path / "checkpoint_final.pth")]) == 0
    assert "-tr nnUNetTrainerMedNeXtSK5 -pretrained_weights" in capsys.readouterr().out
    kernel5 = initialized_trainer(nnunet_env, "nnUNetTrainerMedNeXtSK5")
    load_pretrained_weights(kernel5.network, str(tmp_path / "checkpoint_upkern.pth"))  # nnU-Net's own loader
    stem = "encoder.stages.0.0.conv1.weight"
    grown = upkern(kernel3.network.state_dict(), kernel5.network.state_dict())
    assert torch.equal(kernel5.network.state_dict()[stem], grown[stem])

    kernel5.save_checkpoint(str(tmp_path / "k5.pth"))
    assert cli(["upkern", str(tmp_path / "k5.pth"), "-o", str(tmp_path / "refused.pth")]) == 1
    assert "not a kernel-3 MedNeXt trainer" in capsys.readouterr().err
    assert not (tmp_path / "refused.pth").exists()
