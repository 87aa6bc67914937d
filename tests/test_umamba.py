"""U-Mamba_Bot and U-Mamba_Enc: where their Mamba layers go and what they mix, the official layout's structure
on topologies beyond the goldens' (tests/test_official.py), and the Mamba layer against a reference. The
contract every network meets is tests/test_networks.py's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from conftest import make_topology
from nnunet_ext.blocks.mamba import Mamba
from nnunet_ext.networks.umamba import MambaLayer, ProjectedResidualBlock, UMambaBot, UMambaEnc

TOPO_2D = make_topology(2, [(1, 1)] + [(2, 2)] * 5, [4, 8, 8, 16, 16, 16], (64, 64))  # 6 stages, 2 x 2 at the bottom
TOPO_3D = make_topology(3, [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)], [4, 8, 8, 8], (8, 16, 16))


def mamba_layers(net: nn.Module) -> list[MambaLayer]:
    return [m for m in net.modules() if isinstance(m, MambaLayer)]


def stage_outputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What each encoder stage puts out, its Mamba layer included, from hooks on the stages."""
    outputs = []
    stages = net.encoder.stages
    hooks = [stage.register_forward_hook(lambda m, i, o: outputs.append(o)) for stage in stages]
    try:
        net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("topology", [TOPO_2D, TOPO_3D], ids=["2d", "3d"])
def test_bot_has_one_mamba_layer_at_the_bottleneck_and_enc_one_after_every_stage(topology):
    bot, enc = UMambaBot(topology, 1, 2), UMambaEnc(topology, 1, 2)
    widths = list(topology.features_per_stage)
    assert [m.norm.normalized_shape[0] for m in mamba_layers(bot)] == widths[-1:]
    assert [m.norm.normalized_shape[0] for m in mamba_layers(enc)] == widths
    assert not any(m.channel_tokens for m in mamba_layers(bot) + mamba_layers(enc))  # the paper: positions
    # Enc: each stage's last module is its Mamba layer, so the skips the decoder reads passed through it
    assert all(isinstance(stage[-1], MambaLayer) for stage in enc.encoder.stages)
    # Bot: the bottleneck's skip is replaced by the Mamba layer's output before the decoder reads it
    x = torch.randn(1, 1, *topology.patch_size)
    seen = {}
    bot.decoder.register_forward_pre_hook(lambda m, args: seen.update(skips=list(args[0])))
    bot(x)
    bottleneck = stage_outputs(bot, x)[-1]
    torch.testing.assert_close(seen["skips"][-1], bot.mamba_layer(bottleneck))


def test_official_layout_structure_on_a_deeper_2d_topology():
    """Six 2D stages: one block in the deeper half of the encoder (stages 3-5) and in the upper half of the
    decoder (list entries 3 and 4, the two highest resolutions); U-Mamba_Enc's Mamba at stages 1, 3 and 5 (every
    other one, ending at the last), over the channels where a stage has no more positions than channels
    (stage 5: 2 x 2 = 4 positions, 16 channels); no skip at full resolution in 2D."""
    enc = UMambaEnc(TOPO_2D, 1, 2, layout="official")
    assert [len(stage) for stage in enc.encoder.stages] == [2, 2, 2, 1, 1, 1]
    assert len(enc.encoder.stem) == 2 and isinstance(enc.encoder.stem[0], ProjectedResidualBlock)
    assert [len(stage) for stage in enc.decoder.stages] == [2, 2, 2, 1, 1]
    layers = list(enc.encoder.mamba_layers)
    assert [s for s, m in enumerate(layers) if isinstance(m, MambaLayer)] == [1, 3, 5]
    assert [m.channel_tokens for m in layers if isinstance(m, MambaLayer)] == [False, False, True]
    assert layers[5].norm.normalized_shape[0] == 4  # the positions are the features
    first = enc.decoder.stages[-1][0]
    assert first.conv1.in_channels == TOPO_2D.features_per_stage[0]  # not doubled: no skip concatenated
    assert enc.decoder.stages[0][0].conv1.in_channels == 2 * TOPO_2D.features_per_stage[4]
    five = make_topology(2, [(1, 1)] + [(2, 2)] * 4, [4, 8, 8, 16, 16], (64, 64))  # an odd count: 0, 2 and 4
    layers = UMambaEnc(five, 1, 2, layout="official").encoder.mamba_layers
    assert [s for s, m in enumerate(layers) if isinstance(m, MambaLayer)] == [0, 2, 4]
    # in 3D every stage has its Mamba layer and every decoder stage its skip
    enc3 = UMambaEnc(TOPO_3D, 1, 2, layout="official")
    assert all(isinstance(m, MambaLayer) for m in enc3.encoder.mamba_layers)
    assert enc3.decoder.stages[-1][0].conv1.in_channels == 2 * TOPO_3D.features_per_stage[0]


def test_official_layout_starts_no_residual_block_as_an_identity_and_the_default_does():
    """The official code initialises every convolution He's way and no more; the default, nnU-Net's way, starts
    the encoder's residual blocks as identities (their last norm at zero)."""
    official, default = UMambaBot(TOPO_3D, 1, 2, layout="official"), UMambaBot(TOPO_3D, 1, 2)
    last_norms = [m.conv2.norm.weight for m in default.encoder.modules() if isinstance(m, BasicBlockD)]
    assert last_norms and all(bool((w == 0).all()) for w in last_norms)
    official_norms = [m.conv2.norm.weight for m in official.modules() if isinstance(m, BasicBlockD)]
    official_norms += [m.norm2.weight for m in official.modules() if isinstance(m, ProjectedResidualBlock)]
    assert official_norms and all(bool((w == 1).all()) for w in official_norms)


def test_mamba_layer_is_layer_norm_then_mamba_over_the_positions_or_the_channels():
    """Against the same computation written out: flatten, LayerNorm over the features, Mamba along the tokens,
    back to the map; with channel tokens the roles of positions and channels swap."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, 5)
    layer = MambaLayer(6).eval()
    tokens = x.flatten(2).transpose(1, 2)  # (b, positions, channels)
    expected = layer.mamba(nn.functional.layer_norm(tokens, (6,), layer.norm.weight, layer.norm.bias))
    torch.testing.assert_close(layer(x), expected.transpose(1, 2).reshape(x.shape))
    channels = MambaLayer(60, channel_tokens=True).eval()
    expected = channels.mamba(nn.functional.layer_norm(x.flatten(2), (60,), channels.norm.weight, channels.norm.bias))
    torch.testing.assert_close(channels(x), expected.reshape(x.shape))
    assert isinstance(channels.mamba, Mamba) and channels.mamba.d_model == 60


def test_mamba_layer_puts_out_channel_first_maps():
    """Not the channels-last view that the transposed tokens are: on CPU, torch 2.14 crashes the process in the
    backward of a strided 1x1 convolution (the next official stage's projection) on such a map of 4 x 128 x 192,
    as in U-Mamba_Enc's official layout on nnU-Net-sized 2D plans (test_networks.py's 7-stage topology)."""
    layer = MambaLayer(4)
    out = layer(torch.randn(2, 4, 16, 24))
    assert out.is_contiguous() and out.shape == (2, 4, 16, 24)


def test_mamba_layer_computes_in_float32_under_autocast():
    layer = MambaLayer(8)
    x = torch.randn(1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = {}
        layer.mamba.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
        out = layer(x.bfloat16())
    assert seen["dtype"] == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_channel_tokens_refuse_another_input_size_with_a_clear_error():
    """U-Mamba_Enc's official layout fixes the stages that mix channels to the plans' patch size: another size
    is refused with what to do, not a LayerNorm shape error from inside torch."""
    enc = UMambaEnc(TOPO_2D, 1, 2, deep_supervision=False, layout="official").eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
        with pytest.raises(ValueError, match="Predict with the plans' patch size"):
            enc(torch.randn(1, 1, 96, 64))
    # the default mixes positions and takes any size
    default = UMambaEnc(TOPO_2D, 1, 2, deep_supervision=False).eval()
    with torch.no_grad():
        assert default(torch.randn(1, 1, 96, 64)).shape == (1, 2, 96, 64)


def test_parameter_count_follows_the_mamba_placement():
    """Enc has Bot's bottleneck layer plus one per other stage (default layout, same residual U-Net)."""
    bot, enc = UMambaBot(TOPO_3D, 1, 2), UMambaEnc(TOPO_3D, 1, 2)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    extra = sum(count(MambaLayer(w)) for w in TOPO_3D.features_per_stage[:-1])
    assert count(enc) - count(bot) == extra and math.isfinite(extra)
