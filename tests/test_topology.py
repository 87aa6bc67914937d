"""Reading nnU-Net's plans (default and ResEnc) into a Topology, and clear errors for bad plans."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import TOPOLOGIES
from nnunet_ext.tools.plans_io import load_configuration
from nnunet_ext.registry import Architecture, get_architecture
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.topology import Topology


def plans(ws, name="nnUNetPlans") -> dict:
    return json.loads((ws.preprocessed / ws.dataset / f"{name}.json").read_text())


@pytest.mark.parametrize("plans_name,residual", [("nnUNetPlans", False), ("nnUNetResEncUNetMPlans", True)])
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_topology_matches_plans(planned, plans_name, residual, configuration):
    raw = plans(planned, plans_name)
    cm = PlansManager(raw).get_configuration(configuration)
    kw = raw["configurations"][configuration]["architecture"]["arch_kwargs"]
    topology = Topology.from_plans(cm)

    assert topology.residual_encoder is residual
    assert topology.dim == len(cm.patch_size) and topology.patch_size == tuple(cm.patch_size)
    assert list(topology.features_per_stage) == kw["features_per_stage"]
    assert [list(s) for s in topology.strides] == kw["strides"]
    assert [list(k) for k in topology.kernel_sizes] == kw["kernel_sizes"]
    assert list(topology.n_blocks_per_stage) == kw["n_blocks_per_stage" if residual else "n_conv_per_stage"]
    assert topology.norm_op.__name__ == kw["norm_op"].rsplit(".", 1)[1]
    encoder = topology.build_encoder(1)
    assert isinstance(encoder, ResidualEncoder if residual else PlainConvEncoder)

    net = get_architecture("attention_unet").build(topology, 1, 3)
    out = net(torch.randn(1, 1, *topology.patch_size))
    # nnU-Net's deep-supervision targets are downsampled by 1 / cumprod(pool_op_kernel_sizes)[:-1].
    sizes = [tuple(o.shape[2:]) for o in out]
    stride = torch.tensor(cm.pool_op_kernel_sizes).cumprod(0)[:-1]
    assert sizes == [tuple(int(p) // int(s) for p, s in zip(cm.patch_size, st)) for st in stride]


def test_strides_and_feature_map_sizes_per_stage():
    topology = TOPOLOGIES["3d_5stages_aniso_4ch"][0]  # strides (1,1,1) (1,2,2) (2,2,2) (2,2,2) (1,2,2), patch 20x48x32
    assert topology.cumulative_strides() == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert topology.total_stride == (4, 16, 16)
    assert topology.feature_map_sizes() == [(20, 48, 32), (20, 24, 16), (10, 12, 8), (5, 6, 4), (5, 3, 2)]


def test_plans_that_are_not_a_unet_are_refused(planned):
    raw = copy.deepcopy(plans(planned))
    arch = raw["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.primus.Primus"
    arch["arch_kwargs"] = {"embed_dim": 864, "patch_embed_size": [8, 8, 8]}
    arch["_kw_requires_import"] = []
    with pytest.raises(ConfigurationError, match="not a U-Net"):
        Topology.from_plans(PlansManager(raw).get_configuration("3d_fullres"))


def test_inconsistent_plans_are_refused(planned):
    raw = copy.deepcopy(plans(planned))
    raw["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"].pop()
    with pytest.raises(ConfigurationError, match="'strides' has"):
        Topology.from_plans(PlansManager(raw).get_configuration("3d_fullres"))


def test_architecture_without_that_dimension_is_refused(planned):
    topology = Topology.from_plans(PlansManager(plans(planned)).get_configuration("2d"))
    only_3d = Architecture(name="only3d", trainer="nnUNetTrainerOnly3d", dims=(3,), summary="", reference="",
                           network="nnunet_ext.networks.attention_unet:AttentionUNet")
    with pytest.raises(ConfigurationError, match="supports 3D configurations, but these plans are 2D"):
        only_3d.build(topology, 1, 2)


def test_unknown_option_and_architecture_names(planned):
    topology = Topology.from_plans(PlansManager(plans(planned)).get_configuration("2d"))
    with pytest.raises(ConfigurationError, match=r"Option 'windows': unknown for 'attention_unet'; known: \["):
        get_architecture("attention_unet").build(topology, 1, 2, windows=3)
    with pytest.raises(KeyError, match="Did you mean attention_unet"):
        get_architecture("attention_unt")


def test_load_configuration_errors(nnunet_env):
    cm, inputs, heads = load_configuration(999, "3d_fullres")
    assert (inputs, heads) == (1, 3)
    with pytest.raises(KeyError, match="available: 2d, 3d_fullres"):
        load_configuration(999, "3d_lowres_typo")
    with pytest.raises(FileNotFoundError, match="nnUNetv2_plan_and_preprocess"):
        load_configuration(999, "3d_fullres", plans="nnUNetPlans_missing")
