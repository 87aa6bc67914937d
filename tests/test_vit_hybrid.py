"""ViT/CNN hybrid: attention and blocks against plain and library references, positional embeddings
at and off the trained size, the layout on the plans, the trainer's recipe. The network contract
is checked for every architecture in test_networks.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from conftest import assert_compiles_like_eager, assert_random_only_in_training, make_topology
from test_discovery import run_python
from nnunet_ext.blocks.transformer import FeatureMapTransformer, MultiHeadSelfAttention, TransformerBlock
from nnunet_ext.networks.vit_hybrid import ViTransUNet
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.trainers.schedulers import WarmupPolyLRScheduler

SMALL = dict(depth=2, width=32, heads=4)
TOPO_2D = make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2), (2, 2), (2, 2), (2, 2)], [4, 8, 16, 16, 32, 32, 32],
                        (128, 96))
ANISO_3D = make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [4, 8, 16, 32, 32], (20, 48, 32))


def transformers(net: nn.Module) -> list[FeatureMapTransformer]:
    return [m for m in net.modules() if isinstance(m, FeatureMapTransformer)]


def test_attention_equals_softmax_qk_v_per_head_in_float64():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(24, heads=3).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    q, k, v = attention.qkv(x).split(24, dim=-1)
    heads = []
    for h in range(3):
        cols = slice(8 * h, 8 * (h + 1))
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / 8 ** 0.5, dim=-1)
        heads.append(weights @ v[..., cols])
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x), expected, rtol=1e-12, atol=1e-12)


def test_block_equals_torchs_pre_norm_transformer_encoder_layer():
    torch.manual_seed(0)
    block = TransformerBlock(32, heads=4, mlp_ratio=2.0).eval()
    reference = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(block.attention.qkv.weight)
        reference.self_attn.in_proj_bias.copy_(block.attention.qkv.bias)
        reference.self_attn.out_proj.load_state_dict(block.attention.proj.state_dict())
        reference.linear1.load_state_dict(block.mlp[0].state_dict())
        reference.linear2.load_state_dict(block.mlp[2].state_dict())
        reference.norm1.load_state_dict(block.norm1.state_dict())
        reference.norm2.load_state_dict(block.norm2.state_dict())
        x = torch.randn(3, 20, 32)
        torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)


def test_positions_at_the_trained_size_are_the_parameter_itself():
    transformer = FeatureMapTransformer(nn.Conv3d, 8, (3, 5, 4), 16, 1, 2, 2.0, 0.0)
    assert transformer.position_embedding((3, 5, 4)) is transformer.position


@pytest.mark.parametrize("grid,size", [((5, 7), (9, 4)), ((3, 5, 4), (6, 2, 7))], ids=["2d", "3d"])
def test_positions_at_another_size_are_linearly_interpolated(grid, size):
    """Against scipy: order-1 interpolation at half-pixel centres, edges clamped (align_corners=False)."""
    transformer = FeatureMapTransformer(nn.Conv2d if len(grid) == 2 else nn.Conv3d, 8, grid, 6, 1, 2, 2.0, 0.0)
    ours = transformer.position_embedding(size).detach().double().numpy()[0]
    axes = [(np.arange(out) + 0.5) * g / out - 0.5 for g, out in zip(grid, size)]
    coordinates = np.stack(np.meshgrid(*axes, indexing="ij"))
    for c, channel in enumerate(transformer.position.detach().double().numpy()[0]):
        expected = ndimage.map_coordinates(channel, coordinates, order=1, mode="nearest")
        np.testing.assert_allclose(ours[c], expected, rtol=1e-5, atol=1e-6)


def test_a_network_built_for_one_patch_runs_on_another():
    torch.manual_seed(0)
    net = ViTransUNet(ANISO_3D, 2, 3, **SMALL).eval()
    (transformer,) = transformers(net)
    assert tuple(transformer.position.shape[2:]) == ANISO_3D.feature_map_sizes()[4]  # stage 4: stride (4, 16, 16)
    with torch.no_grad():
        out = net(torch.randn(1, 2, 36, 80, 64))
    assert out[0].shape == (1, 3, 36, 80, 64) and torch.isfinite(out[0]).all()


def test_default_stage_is_the_deepest_with_stride_at_most_16_and_options_move_it():
    assert ViTransUNet(TOPO_2D, 1, 2, **SMALL).transformer_stages == [4]  # stride 16 of 64
    assert ViTransUNet(ANISO_3D, 1, 2, **SMALL).transformer_stages == [4]  # stride (4, 16, 16)
    shallow = make_topology(2, [(1, 1), (2, 2), (2, 2)], [4, 8, 16], (32, 32))
    assert ViTransUNet(shallow, 1, 2, **SMALL).transformer_stages == [2]  # the bottleneck, stride 4
    net = ViTransUNet(TOPO_2D, 1, 2, transformer_stages=(-1, 3), **SMALL)
    assert net.transformer_stages == [3, 6]
    assert [sum(isinstance(m, FeatureMapTransformer) for m in stage.modules()) for stage in net.encoder.stages] == \
           [0, 0, 0, 1, 0, 0, 1]
    assert transformers(net)[1].position.shape == (1, 32, 2, 2)  # the 128x96 patch at stride 64


def test_transformer_output_is_the_skip_and_the_next_stages_input():
    """Zeroing the transformer's output convolution zeroes its stage's skip: the transformer is in
    the path, not a side branch."""
    net = ViTransUNet(TOPO_2D, 1, 2, **SMALL).eval()
    stage = net.encoder.stages[4]
    nn.init.zeros_(transformers(stage)[0].out[0].weight)
    nn.init.zeros_(transformers(stage)[0].out[0].bias)
    with torch.no_grad():
        skips = net.encoder(torch.randn(1, 1, *TOPO_2D.patch_size))
    assert skips[4].abs().max() == 0 and skips[3].abs().max() > 0


def test_width_heads_and_stages_are_checked():
    with pytest.raises(ValueError, match="multiple of its heads"):
        ViTransUNet(TOPO_2D, 1, 2, width=30, heads=4, depth=1)
    with pytest.raises(ConfigurationError, match="0 to 6"):
        ViTransUNet(TOPO_2D, 1, 2, transformer_stages=[7], **SMALL)
    with pytest.raises(ConfigurationError, match="twice"):
        ViTransUNet(TOPO_2D, 1, 2, transformer_stages=[6, -1], **SMALL)
    with pytest.raises(ConfigurationError, match="depth"):
        ViTransUNet(TOPO_2D, 1, 2, depth=0, width=32, heads=4)


def test_default_is_vit_s_and_linear_layers_keep_vits_initialisation():
    net = ViTransUNet(ANISO_3D, 1, 2)
    (transformer,) = transformers(net)
    assert len(transformer.blocks) == 12 and transformer.position.shape[1] == 384
    assert transformer.blocks[0].attention.heads == 6 and transformer.blocks[0].mlp[0].out_features == 1536
    per_block = 12 * 384 ** 2 + 13 * 384  # attention 4 w^2, MLP 8 w^2, biases, two LayerNorms
    assert sum(p.numel() for p in transformer.blocks.parameters()) == 12 * per_block
    assert all(abs(m.weight.std().item() - 0.02) < 0.002 and not m.bias.any()
               for m in transformer.blocks.modules() if isinstance(m, nn.Linear))


def test_drop_path_rises_over_the_blocks_and_is_off_in_eval():
    net = ViTransUNet(TOPO_2D, 1, 2, depth=3, width=32, heads=4, drop_path_rate=0.2)
    assert [b.drop_path.drop_prob for b in transformers(net)[0].blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert_random_only_in_training(net, torch.randn(2, 1, *TOPO_2D.patch_size))


def test_torch_compile_traces_the_transformer():
    torch.manual_seed(0)
    topology = make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [4, 8, 8], (8, 16, 16))
    assert_compiles_like_eager(ViTransUNet(topology, 1, 2, **SMALL), torch.randn(1, 1, 8, 16, 16))


def test_warmup_poly_schedule_equals_nnunets_primus_schedulers():
    """Our one scheduler against nnU-Net's two (Lin_incr_LRScheduler, then PolyLRScheduler_offset)."""
    from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

    def lrs(make, steps):
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=3e-4)
        scheduler = make(optimizer)
        values = []
        for step in steps:
            scheduler.step(step)
            values.append(optimizer.param_groups[0]["lr"])
        return values

    ours = lrs(lambda o: WarmupPolyLRScheduler(o, 40, 5), range(40))
    warmup = lrs(lambda o: Lin_incr_LRScheduler(o, 3e-4, 5), range(5))
    poly = lrs(lambda o: PolyLRScheduler_offset(o, 3e-4, 40, 5), range(5, 40))
    assert ours == pytest.approx(warmup + poly, rel=1e-12)
    assert ours[4] == pytest.approx(3e-4) and ours[-1] < 3e-5


def test_trainer_trains_with_adamw_and_warmup(planned):
    """nnU-Net's own trainer lookup and initialisation on the tiny dataset's plans."""
    out = run_python("""
        import json, torch
        from nnunetv2.run.run_training import get_trainer_from_args
        trainer = get_trainer_from_args("999", "2d", 0, "nnUNetTrainerViTransUNet", device=torch.device("cpu"))
        trainer.initialize()
        group = trainer.optimizer.param_groups[0]
        first = group["lr"]
        trainer.lr_scheduler.step(49)
        print(json.dumps({"optimizer": type(trainer.optimizer).__name__,
                          "scheduler": type(trainer.lr_scheduler).__name__,
                          "groups": len(trainer.optimizer.param_groups),
                          "all": len(group["params"]) == len(list(trainer.network.parameters())),
                          "hyper": [group["initial_lr"], group["weight_decay"], list(group["betas"])],
                          "first": first, "end_of_warmup": group["lr"], "epochs": trainer.num_epochs}))
    """, **planned.env())
    result = json.loads(out.splitlines()[-1])
    assert result["optimizer"] == "AdamW" and result["scheduler"] == "WarmupPolyLRScheduler"
    assert result["groups"] == 1 and result["all"] and result["epochs"] == 1000
    assert result["hyper"] == [3e-4, 5e-2, [0.9, 0.98]]
    assert result["first"] == pytest.approx(3e-4 / 50) and result["end_of_warmup"] == pytest.approx(3e-4)
