"""D-LKA Net: the blocks start where the paper's do, the layout on the plans, the paper's Synapse
counts. The network contract is checked for every architecture in test_networks.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_compiles_like_eager, make_topology
from nnunet_ext.blocks.deformable_lka import LKA, DeformableConv, DLKABlock, DLKAMLPBlock
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.networks.dlka_net import DLKANet, InputBranchEncoder, from_official
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools.benchmark_dlka import DLKA_PAPER, dlka_paper_comparison

ANISO_3D = make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [4, 8, 16, 32, 32], (20, 48, 32))
TOPO_2D = make_topology(2, [(1, 1), (2, 2), (2, 2), (2, 2)], [8, 16, 32, 32], (40, 56))


@pytest.mark.parametrize("conv_op, conv, groups", [(nn.Conv2d, F.conv2d, 6), (nn.Conv3d, F.conv3d, 1)])
@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_conv_starts_as_the_ordinary_convolution(conv_op, conv, groups, modulated):
    """Offsets start at zero; a modulated layer's mask starts at sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    layer = DeformableConv(conv_op, 6, 6, 3, padding=2, dilation=2, groups=groups, modulated=modulated)
    x = torch.randn(2, 6, *(7,) * (conv_op is nn.Conv3d), 9, 8)
    expected = conv(x, layer.weight, layer.bias, padding=2, dilation=2, groups=groups)
    if modulated:
        expected = conv(x, layer.weight * 0.5, layer.bias, padding=2, dilation=2, groups=groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_deformable_lka_starts_as_lka():
    """The 2D D-LKA (both depthwise convolutions deformable) has LKA's parameter names plus the
    offset convolutions, and with LKA's weights it computes LKA until its offsets move."""
    torch.manual_seed(0)
    lka, dlka = LKA(nn.Conv2d, 8, "none"), LKA(nn.Conv2d, 8, "depthwise")
    missing, unexpected = dlka.load_state_dict(lka.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == sorted(
        f"{c}.conv_offset.{p}" for c in ("conv0", "conv_spatial") for p in ("weight", "bias"))
    x = torch.randn(2, 8, 20, 24)
    torch.testing.assert_close(dlka(x), lka(x), rtol=1e-5, atol=1e-5)


def test_3d_layout_follows_the_paper():
    """Convolutional stages above 1/4 resolution; D-LKA stages (patch merging, then 3 blocks, 2 in
    the bottleneck) from 1/4 down, with the 3D D-LKA (one extra deformable 3^3 convolution); 3
    blocks per decoder stage at those resolutions and one residual block above."""
    net = DLKANet(ANISO_3D, 1, 2)
    assert net.dlka_stages == [2, 3, 4]  # cumulative strides (1,1,1) (1,2,2) | (2,4,4) (4,8,8) (4,16,16)

    def blocks(module):
        return [m for m in module.modules() if isinstance(m, DLKABlock)]

    assert [len(blocks(net.encoder.stages[s])) for s in range(5)] == [0, 0, 3, 3, 2]
    assert [len(blocks(stage)) for stage in net.decoder.stages] == [3, 3, 0, 0]  # deepest first
    block = blocks(net.encoder.stages[2])[0]
    assert isinstance(block.attention.spatial_gating_unit.deform_conv, DeformableConv)
    assert not isinstance(block.attention.spatial_gating_unit.conv0, DeformableConv)
    assert block.gamma.detach().eq(1e-6).all()


def test_2d_keeps_the_plans_encoder_and_puts_d_lka_in_the_decoder():
    net = DLKANet(TOPO_2D, 1, 2)
    plain = TOPO_2D.build_encoder(1)
    assert [n for n, _ in net.encoder.named_parameters()] == [n for n, _ in plain.named_parameters()]
    decoder_blocks = [[m for m in stage.modules() if isinstance(m, DLKABlock)] for stage in net.decoder.stages]
    assert [len(b) for b in decoder_blocks] == [2, 0, 0]  # at 1/4, 1/2 and 1 (the 1/8 bottleneck has none)
    gating = decoder_blocks[0][0].attention.spatial_gating_unit
    assert isinstance(gating.conv0, DeformableConv) and isinstance(gating.conv_spatial, DeformableConv)
    assert gating.deform_conv is None


def test_initialisation_keeps_d_lka_offsets_at_zero():
    """nnU-Net's He initialisation touches every convolution; the D-LKA blocks are re-initialised
    afterwards, so offsets are zero and the network starts with moderate outputs."""
    torch.manual_seed(0)
    net = DLKANet(ANISO_3D, 1, 2)
    offsets = [m.conv_offset for m in net.modules() if isinstance(m, DeformableConv)]
    assert offsets and all(o.weight.eq(0).all() and o.bias.eq(0).all() for o in offsets)
    with torch.no_grad():
        out = net(torch.randn(2, 1, *ANISO_3D.patch_size))
    assert max(o.abs().max().item() for o in out) < 100


def test_position_embedding_is_resampled_for_other_sizes():
    torch.manual_seed(0)
    net = DLKANet(TOPO_2D, 1, 2, position_embedding=True).eval()
    embeddings = [m.position_embedding for m in net.modules() if isinstance(m, DLKABlock)]
    assert [tuple(e.shape[2:]) for e in embeddings] == [(10, 14)] * 2
    x = torch.randn(1, 1, 48, 64)  # another size than the patch: 12 x 16 at 1/4
    with torch.no_grad():
        before = net(x)[0]
        for e in embeddings:
            e.normal_()
        after = net(x)[0]
    assert after.shape == before.shape and not torch.allclose(after, before)


OFFICIAL = ARCHITECTURES["dlka_net"].presets["official"]


def test_official_layout_on_nnunet_plans():
    """Every stage but the first is a D-LKA stage; stages 0 and 1 both read the input (the residual block at
    full resolution, the patch embedding); GroupNorm after merging, of the previous width in groups, or of
    their greatest common divisor where the widths do not divide (16 -> 24 here, 256 -> 320 on nnU-Net's
    plans)."""
    topology = make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [4, 8, 16, 24, 48],
                             (8, 32, 32))
    net = DLKANet(topology, 2, 3, **OFFICIAL).eval()
    assert isinstance(net.encoder, InputBranchEncoder) and net.dlka_stages == [1, 2, 3, 4]
    assert [stage[1].num_groups for stage in net.encoder.stages[1:]] == [1, 8, 8, 24]
    assert net.encoder.stages[1][0].in_channels == 2 and net.encoder.stages[1][0].bias is None
    assert all(len(stage[2]) == 3 for stage in net.encoder.stages[1:])
    x = torch.randn(1, 2, 8, 32, 32)
    with torch.no_grad():
        skips = net.encoder(x)
        assert torch.equal(skips[0], net.encoder.stages[0](x)) and torch.equal(skips[1], net.encoder.stages[1](x))
        assert [tuple(y.shape) for y in net(x)] == [(1, 3, 8, 32, 32), (1, 3, 8, 16, 16), (1, 3, 4, 8, 8),
                                                     (1, 3, 2, 4, 4)]
    net.train()  # the blocks' channel dropout acts while training
    block = next(m for m in net.modules() if isinstance(m, DLKABlock))
    assert isinstance(block.dropout, nn.Dropout3d) and block.dropout.p == 0.1



def test_official_layout_on_2d_plans_puts_the_official_2d_block_in_the_decoder():
    """The official 2D network's encoder is a pretrained MaxViT: on 2D plans the preset keeps the default
    network and puts the official 2D decoder's block (LayerNorm, D-LKA attention, LayerNorm, MLP; layer scales
    1e-2; offset convolutions not zero) where the default has its D-LKA blocks."""
    net = DLKANet(TOPO_2D, 1, 2, **OFFICIAL)
    default = DLKANet(TOPO_2D, 1, 2)
    assert [len(stage) if isinstance(stage, nn.Sequential) else 0 for stage in net.decoder.stages] == \
        [len(stage) if isinstance(stage, nn.Sequential) else 0 for stage in default.decoder.stages] == [2, 0, 0]
    blocks = [m for m in net.modules() if isinstance(m, DLKAMLPBlock)]
    assert len(blocks) == 2 and not any(isinstance(m, DLKABlock) for m in net.modules())
    assert all(torch.equal(b.layer_scale_1, torch.full((b.layer_scale_1.numel(),), 1e-2)) for b in blocks)
    assert blocks[0].attn.spatial_gating_unit.conv0.conv_offset.weight.abs().sum() > 0
    assert net(torch.randn(2, 1, 40, 56))[0].shape == (2, 2, 40, 56)


def test_official_position_embeddings_are_read_in_token_order():
    """The official block adds a (1, N, C) embedding to x.reshape(B, C, N).permute(0, 2, 1): token n is voxel
    n of the flattened map (depth, then height, then width)."""
    block = DLKABlock(nn.Conv3d, 2, "extra", position_embedding=(2, 3, 4))
    tokens = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(1, 24, 2)
    ours = from_official({"b.pos_embed": tokens}, {"b.position_embedding": block.position_embedding})
    embedding = ours["b.position_embedding"]
    assert embedding.shape == (1, 2, 2, 3, 4)
    assert embedding[0, 1, 1, 2, 3] == tokens[0, 1 * 12 + 2 * 4 + 3, 1]
    wrong = from_official({"b.pos_embed": tokens[:, :12]}, {"b.position_embedding": block.position_embedding})
    assert wrong["b.position_embedding"].shape == (1, 12, 2)  # left as it is: the importer names the mismatch


def test_plans_that_never_reach_quarter_resolution_are_rejected():
    shallow = make_topology(2, [(1, 1), (2, 2)], [8, 16], (32, 32))
    with pytest.raises(ConfigurationError, match="dlka_from_stride"):
        DLKANet(shallow, 1, 2)
    assert DLKANet(shallow, 1, 2, dlka_from_stride=2).dlka_stages == [1]


def test_synapse_configuration_matches_the_papers_counts():
    """The `official` preset has the paper's 42.35 M parameters (the official network's 42,353,327:
    tests/test_official.py) and, without the deformable convolutions that fvcore cannot see, its 66.96 GFLOPs
    (fvcore counts multiply-accumulates, and norms, which PyTorch's counter leaves out) within 1 %; the layout
    the paper's text describes has fewer parameters."""
    rows = {r["network"].split(" (")[0]: r for r in dlka_paper_comparison()}
    official, text = rows["ours, official preset"], rows["paper's text"]
    assert official["parameters"] == pytest.approx(DLKA_PAPER["parameters"], rel=0.0002)
    assert official["macs_without_deformable"] == pytest.approx(DLKA_PAPER["macs"], rel=0.01)
    assert text["parameters"] < 0.7 * official["parameters"]
    assert official["macs"] > official["macs_without_deformable"]


def test_torch_compile_traces_the_deformable_convolution():
    """nnU-Net compiles networks on CUDA: the chunked, checkpointed operator traces (though D-LKA Net's
    trainers turn compile off, `compile_off` in the registry)."""
    torch.manual_seed(0)
    net = DLKANet(make_topology(3, [(1, 1, 1), (2, 2, 2), (2, 2, 2)], [4, 8, 8], (8, 16, 16)), 1, 2)
    assert_compiles_like_eager(net, torch.randn(1, 1, 8, 16, 16))
