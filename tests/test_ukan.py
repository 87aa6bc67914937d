"""U-KAN: the layout on the plans, the switches of the paper's ablation, the trainer's recipe. The
network contract is checked for every architecture in test_networks.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from conftest import assert_compiles_like_eager, assert_random_only_in_training, make_topology
from test_discovery import run_python
from nnunet_ext.blocks.kan import KANConv, KANLinear, TokenizedKANBlock, kan_parameters
from nnunet_ext.networks.ukan import UKAN
from nnunet_ext.ops import cpu_kernel
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.trainers.schedulers import CosineLRScheduler

ANISO_3D = make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [4, 8, 16, 32, 32], (20, 48, 32))
TOPO_2D = make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2), (2, 2)], [8, 16, 32, 32, 48], (48, 64))


def count(module: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


def test_two_lowest_resolutions_are_tokenized_kan_stages():
    net = UKAN(TOPO_2D, 1, 2)
    assert [count(stage, TokenizedKANBlock) for stage in net.encoder.stages] == [0, 0, 0, 1, 1]
    assert [count(stage, TokenizedKANBlock) for stage in net.decoder.stages] == [1, 1, 0, 0]  # 1/8, 1/4, 1/2, 1
    embed = net.encoder.stages[3][0]  # patch embedding with the plans' kernel and stride
    assert isinstance(embed, nn.Conv2d) and embed.stride == (2, 2) and embed.kernel_size == (3, 3)
    plain = TOPO_2D.build_encoder(1)
    for s in range(3):  # the convolutional stages are the plans'
        assert [n for n, _ in net.encoder.stages[s].named_parameters()] == \
               [n for n, _ in plain.stages[s].named_parameters()]
    assert count(net, KANLinear) == 4 * 3


def test_anisotropic_plans_keep_their_kernels_and_strides_in_the_tokenized_stages():
    net = UKAN(ANISO_3D, 1, 2, depth=2)
    embed = net.encoder.stages[4][0]
    assert embed.stride == (1, 2, 2) and embed.kernel_size == (3, 3, 3)
    assert [count(stage, TokenizedKANBlock) for stage in net.encoder.stages] == [0, 0, 0, 2, 2]
    with torch.no_grad():
        out = net(torch.randn(1, 1, *ANISO_3D.patch_size))
    assert out[0].shape == (1, 2, *ANISO_3D.patch_size)


def test_mlp_ablation_really_replaces_every_kan_layer():
    kan, mlp = UKAN(TOPO_2D, 1, 2), UKAN(TOPO_2D, 1, 2, token_mixer="mlp")
    assert count(mlp, KANLinear) == 0 and count(mlp, nn.Linear) == count(kan, KANLinear) == 12
    params = [sum(p.numel() for p in n.parameters()) for n in (kan, mlp)]
    # per layer: base weight, 8 spline coefficients and a scaler per pair against a weight and a bias
    assert params[0] - params[1] == sum(10 * m.in_features * m.out_features - (m.in_features + 1) * m.out_features
                                        for m in kan.modules() if isinstance(m, KANLinear))
    torch.manual_seed(0)
    x = torch.randn(1, 1, *TOPO_2D.patch_size)
    with torch.no_grad():
        assert not torch.allclose(kan.eval()(x)[0], mlp.eval()(x)[0])


def test_kan_convolutions_replace_the_convolutional_stages():
    net = UKAN(ANISO_3D, 2, 2, kan_conv=True)
    assert [count(stage, KANConv) for stage in net.encoder.stages] == [2, 2, 2, 0, 0]  # n_blocks_per_stage = 2
    assert [count(stage, KANConv) for stage in net.decoder.stages] == [0, 0, 2, 2]
    assert count(net, StackedConvBlocks) == 0
    assert net.encoder.stages[0][0].base_weight.shape[1] == 2  # the input channels
    assert count(UKAN(ANISO_3D, 2, 2), KANConv) == 0


def test_token_shift_switch_changes_the_output_not_the_parameters():
    torch.manual_seed(0)
    shifted = UKAN(TOPO_2D, 1, 2).eval()
    unshifted = UKAN(TOPO_2D, 1, 2, token_shift=False).eval()
    unshifted.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 1, *TOPO_2D.patch_size)
    with torch.no_grad():
        assert not torch.allclose(shifted(x)[0], unshifted(x)[0])


def test_drop_path_rises_over_the_tokenized_blocks_and_is_off_in_eval():
    net = UKAN(TOPO_2D, 1, 2, depth=2, drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for b in net.encoder.modules() if isinstance(b, TokenizedKANBlock)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    decoder_rates = [b.drop_path.drop_prob for b in net.decoder.stages[0].modules() if isinstance(b, TokenizedKANBlock)]
    assert decoder_rates == pytest.approx([0.0, 0.1])  # mirrors the stage below it
    assert_random_only_in_training(net, torch.randn(2, 1, *TOPO_2D.patch_size))


def test_plans_with_two_stages_are_rejected():
    with pytest.raises(ConfigurationError, match="at least 3 stages"):
        UKAN(make_topology(2, [(1, 1), (2, 2)], [8, 16], (32, 32)), 1, 2)


def test_kan_parameters_are_the_kan_layers_and_the_token_mixers():
    net = UKAN(TOPO_2D, 1, 2)
    kan = {id(p) for p in kan_parameters(net)}
    expected = {id(p) for m in net.modules() if isinstance(m, KANLinear) for p in m.parameters()}
    assert kan == expected
    mlp = UKAN(TOPO_2D, 1, 2, token_mixer="mlp")
    assert len(kan_parameters(mlp)) == 2 * 12  # weight and bias of every token mixer, as the official code


def test_cosine_schedule_anneals_every_group_to_the_minimum():
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-4}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-2}]
    optimizer = torch.optim.Adam(groups)
    scheduler = CosineLRScheduler(optimizer, max_steps=10, min_lr=1e-5)
    lrs = []
    for epoch in range(11):
        scheduler.step(epoch)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert lrs[0] == pytest.approx([1e-4, 1e-2])
    assert lrs[5] == pytest.approx([(1e-4 + 1e-5) / 2, (1e-2 + 1e-5) / 2])
    assert lrs[10] == pytest.approx([1e-5, 1e-5])
    assert all(a[1] >= b[1] for a, b in zip(lrs, lrs[1:]))


def test_trainer_trains_with_the_official_recipe(planned):
    """nnU-Net's own trainer lookup and initialisation on the tiny dataset's plans: Adam, lr 1e-4 for
    the network and 1e-2 for the KAN layers, weight decay 1e-4, a cosine schedule."""
    out = run_python("""
        import json, torch
        from nnunetv2.run.run_training import get_trainer_from_args
        from nnunet_ext.blocks.kan import kan_parameters
        trainer = get_trainer_from_args("999", "3d_fullres", 0, "nnUNetTrainerUKAN", device=torch.device("cpu"))
        trainer.initialize()
        groups = trainer.optimizer.param_groups
        kan = {id(p) for p in kan_parameters(trainer.network)}
        trainer.lr_scheduler.step(trainer.num_epochs // 2)
        print(json.dumps({"optimizer": type(trainer.optimizer).__name__,
                          "scheduler": type(trainer.lr_scheduler).__name__,
                          "groups": [[g["initial_lr"], g["weight_decay"], len(g["params"])] for g in groups],
                          "kan_group_is_kan": {id(p) for p in groups[1]["params"]} == kan,
                          "all": sum(len(g["params"]) for g in groups) == len(list(trainer.network.parameters())),
                          "halfway": [g["lr"] for g in groups]}))
    """, **planned.env())
    result = json.loads(out.splitlines()[-1])
    assert result["optimizer"] == "Adam" and result["scheduler"] == "CosineLRScheduler"
    assert [g[:2] for g in result["groups"]] == [[1e-4, 1e-4], [1e-2, 1e-4]]
    assert result["kan_group_is_kan"] and result["all"] and result["groups"][1][2] > 0
    assert result["halfway"] == pytest.approx([(1e-4 + 1e-5) / 2, (1e-2 + 1e-5) / 2])


def test_torch_compile_traces_the_b_spline_bases(monkeypatch):
    """Traced, the bases take PyTorch's formulation (a ctypes call cannot be traced); eager takes it too here,
    so that the comparison is of tracing alone (the compiled CPU loop against it: test_kan.py)."""
    monkeypatch.setattr(cpu_kernel, "_enabled", False)
    torch.manual_seed(0)
    net = UKAN(make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [4, 8, 8], (8, 16, 16)), 1, 2, kan_conv=True)
    assert_compiles_like_eager(net, torch.randn(1, 1, 8, 16, 16))


def test_kan_parameters_grow_with_the_grid():
    """Each spline adds grid_size + spline_order coefficients per (input, output) pair."""
    small, large = UKAN(TOPO_2D, 1, 2, grid_size=3), UKAN(TOPO_2D, 1, 2, grid_size=8)
    kan_small = sum(p.numel() for m in small.modules() if isinstance(m, KANLinear) for p in m.parameters())
    kan_large = sum(p.numel() for m in large.modules() if isinstance(m, KANLinear) for p in m.parameters())
    pairs = sum(m.in_features * m.out_features for m in small.modules() if isinstance(m, KANLinear))
    assert kan_large - kan_small == pairs * 5
    assert math.isclose(kan_small, pairs * (1 + 6 + 1))
