"""Golden numbers from the official code, for the `official` presets' tests (tests/test_official.py).

    python scripts/official_goldens.py OFFICIAL_CHECKOUT --arch lkm_unet [--out tests/data/official]

OFFICIAL_CHECKOUT is a git checkout of the architecture's official repository at the commit pinned
below (the script refuses another). It runs the official network on CPU, its Mamba the real
mamba_ssm Python source (tests/mamba_ssm_reference.py: the sdist from the package index, no compiled
kernels), on small nnU-Net 2.8 configurations with every parameter randomised, in eval mode and
float32, and writes
- `<arch>.npz`, per configuration: "<case>/state" the official state dict's floating-point tensors, each
  once, as one array of int16 multiples of STEP (the very values the network ran with, see `randomise`
  and `state_arrays`), "<case>/state/<name>" its integer tensors, "<case>/input/<i>" and
  "<case>/output/<i>/<j>" (every deep-supervision output, highest resolution first), numbers only;
- `<arch>.json`: the commit, the versions used, each configuration (its plans `architecture` entry and
  patch size, input channels, classes, the names and shapes of the tensors in "<case>/state" and the step,
  the names that share a tensor, the mean and standard deviation of every tensor as the
  official code initialises it) and the official parameter counts at the paper's configurations
  (counted on the meta device where the official code can be built there).
Blocks whose official network cannot be built here (`BlockCase`: D-LKA Net's 2D decoder block) are stored
the same way under "blocks", with their configuration in our preset and the path of the block in it.
The tests need neither the official code nor mamba_ssm; this script needs both (D-LKA Net's: MONAI and
einops, docs/official.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def plans_configuration(dim: int, n_stages: int, max_features: int, patch: list[int]) -> dict:
    """An nnU-Net 2.8 default-plans configuration's `architecture` entry and patch size: features 32
    doubling up to `max_features`, 3-wide kernels, stride 2 from the second stage, two convolutions
    (blocks) per stage."""
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    return {"patch_size": patch, "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages, "features_per_stage": [min(32 * 2 ** s, max_features) for s in range(n_stages)],
            "conv_op": conv, "kernel_sizes": [[3] * dim] * n_stages,
            "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}


def small(configuration: dict, features: list[int]) -> dict:
    configuration["architecture"]["arch_kwargs"]["features_per_stage"] = features
    return configuration


def dlka_configuration(feature_size: int, patch: list[int]) -> dict:
    """The official D-LKA Net's topology as a 3d configuration: five stages of widths f, 2f, 4f, 8f, 16f, the
    (2, 4, 4) patch embedding, strides 2 below it."""
    widths = [feature_size * 2 ** s for s in range(5)]
    configuration = small(plans_configuration(3, 5, widths[-1], patch), widths)
    configuration["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [2, 4, 4]] + [[2, 2, 2]] * 3
    return configuration


@dataclass
class Case:
    """One small configuration: inputs of these sizes (batch, channels, *spatial) go through the network."""

    name: str
    configuration: dict
    input_channels: int
    num_classes: int
    inputs: list[list[int]]
    preset: str = "official"  # the preset it proves; `options` go to the official build (MedNeXt's kernel size)
    options: dict = field(default_factory=dict)


@dataclass
class BlockCase:
    """One official block alone, where the official network cannot be built (D-LKA Net's 2D network needs a
    pretrained MaxViT): `load(checkout, channels)` gives the block as the official code builds and initialises
    it and its forward on a feature map; our preset holds it at `path` when built from `configuration`."""

    name: str
    load: Callable[[Path, int], tuple[nn.Module, Callable]]
    configuration: dict
    path: str
    channels: int
    input: list[int]


@dataclass
class Official:
    repository: str
    commit: str
    # checkout -> (build(configuration, input channels, classes), versions of what it runs on)
    load: Callable[[Path], tuple[Callable[[dict, int, int], nn.Module], dict]]
    cases: list[Case]
    paper: dict[str, tuple[dict, int, int]]  # the paper's configurations, for the parameter counts
    count_on: str = "meta"  # "cpu" where the official code cannot be built on the meta device
    heads: int | None = None  # how many of nnU-Net's heads, highest resolution first, the official network has
    # official tensors (name prefixes) the preset does not have, as its converter drops them: left out of the
    # parameter counts
    dropped: tuple[str, ...] = ()
    blocks: list[BlockCase] = field(default_factory=list)


def stand_in(name: str, **attributes) -> types.ModuleType:
    """A module `name` holding `attributes`, put where an official network's imports look for it."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def import_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_mamba_ssm_source() -> dict:
    """mamba_ssm's Mamba from its real Python source, where an official network imports it; the versions entry."""
    sys.path.insert(0, str(ROOT / "tests"))
    import mamba_ssm_reference

    sys.modules["mamba_ssm"] = types.SimpleNamespace(Mamba=mamba_ssm_reference.load().Mamba)
    return {"mamba_ssm": f"{mamba_ssm_reference.VERSION} (Python source, selective_scan_ref)"}


def from_old_plans(get_from_plans, configuration: dict, input_channels: int, num_classes: int) -> nn.Module:
    """An official network from a `get_*_from_plans` function of a fork of nnU-Net 2.1.1, which reads that
    version's plans fields: given those of this configuration."""
    kw = configuration["architecture"]["arch_kwargs"]
    manager = types.SimpleNamespace(
        conv_kernel_sizes=kw["kernel_sizes"], pool_op_kernel_sizes=kw["strides"],
        patch_size=configuration["patch_size"],
        UNet_base_num_features=kw["features_per_stage"][0], unet_max_num_features=max(kw["features_per_stage"]),
        n_conv_per_stage_encoder=list(kw["n_conv_per_stage"]),
        n_conv_per_stage_decoder=list(kw["n_conv_per_stage_decoder"]))  # copies: U-Mamba's code changes them
    features = [min(manager.UNet_base_num_features * 2 ** i, manager.unet_max_num_features)
                for i in range(kw["n_stages"])]
    if features != kw["features_per_stage"]:
        raise ValueError(f"the official code derives features {features}, not {kw['features_per_stage']}")
    labels = types.SimpleNamespace(num_segmentation_heads=num_classes)
    plans = types.SimpleNamespace(get_label_manager=lambda _: labels)
    return get_from_plans(plans, {}, manager, input_channels, deep_supervision=True)


def load_lkm_unet(checkout: Path):
    versions = with_mamba_ssm_source()
    official = import_file(checkout / "lkmunet/nnunetv2/nets/LKMUNet.py", "official_lkmunet")

    def build(configuration: dict, input_channels: int, num_classes: int) -> nn.Module:
        return from_old_plans(official.get_lkmunet_from_plans, configuration, input_channels, num_classes)

    return build, versions


def umamba_loader(variant: str):
    """U-Mamba_Bot or _Enc (`variant` "bot" or "enc"): umamba/nnunetv2/nets/UMamba<Variant>_<2d|3d>.py, each
    file's get_umamba_<variant>_<2d|3d>_from_plans."""
    def load(checkout: Path):
        versions = with_mamba_ssm_source()
        files = {dim: import_file(checkout / f"umamba/nnunetv2/nets/UMamba{variant.capitalize()}_{dim}d.py",
                                  f"official_umamba_{variant}_{dim}d") for dim in (2, 3)}

        def build(configuration: dict, input_channels: int, num_classes: int) -> nn.Module:
            dim = len(configuration["patch_size"])
            get_from_plans = getattr(files[dim], f"get_umamba_{variant}_{dim}d_from_plans")
            return from_old_plans(get_from_plans, configuration, input_channels, num_classes)

        return build, versions

    return load


def mednext_loader(size: str):
    """MedNeXt of `size` ("S", "B", "M", "L"): nnunet_mednext/network_architecture/mednextv1/MedNextV1.py with the
    arguments create_mednext_v1.py gives that size, but the plans' first width for its 32 (n_channels) and the
    plans' dimension; deep supervision on, as its trainers build it; no gradient checkpointing (same numbers)."""
    def load(checkout: Path):
        sys.path.insert(0, str(checkout))
        create = importlib.import_module("nnunet_mednext.network_architecture.mednextv1.create_mednext_v1")
        official = create.MedNeXt

        def build(configuration: dict, input_channels: int, num_classes: int, kernel_size: int = 3) -> nn.Module:
            arguments = {}

            def record(**kwargs):
                arguments.update(kwargs)

            create.MedNeXt = record  # the size's arguments, as create_mednext_v1 passes them
            try:
                create.create_mednext_v1(input_channels, num_classes, size, kernel_size, deep_supervision=True)
            finally:
                create.MedNeXt = official
            arch = configuration["architecture"]["arch_kwargs"]
            return official(**{**arguments, "n_channels": arch["features_per_stage"][0], "checkpoint_style": None,
                               "dim": f"{len(configuration['patch_size'])}d"})

        return build, {}

    return load


def load_ukan(checkout: Path):
    """Seg_UKAN/archs.py imports timm for three helpers and torchvision and matplotlib for nothing the
    network uses: stand-ins for those, its own kan.py and utils.py for the rest."""
    def drop_path_unused(rate: float) -> nn.Module:
        raise NotImplementedError("the goldens run without stochastic depth (drop_path_rate 0, eval mode)")

    layers = stand_in("timm.models.layers", DropPath=drop_path_unused, trunc_normal_=nn.init.trunc_normal_,
                    to_2tuple=lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    stand_in("timm", models=stand_in("timm.models", layers=layers))
    stand_in("torchvision", transforms=stand_in("torchvision.transforms"),
             utils=stand_in("torchvision.utils", save_image=None))
    stand_in("matplotlib", pyplot=stand_in("matplotlib.pyplot"))
    sys.path.insert(0, str(checkout / "Seg_UKAN"))
    official = import_file(checkout / "Seg_UKAN/archs.py", "official_ukan")

    def build(configuration: dict, input_channels: int, num_classes: int) -> nn.Module:
        # The official network is fixed: six stages, strides 2, 3x3 kernels, widths e0/8, e0/8, e0/4, e0, e1, e2
        # from its embed_dims (e0, e1, e2).
        kw = configuration["architecture"]["arch_kwargs"]
        features = kw["features_per_stage"]
        e0, e1, e2 = features[3:]
        expected = [e0 // 8, e0 // 8, e0 // 4, e0, e1, e2]
        if kw["n_stages"] != 6 or features != expected:
            raise ValueError(f"the official U-KAN has 6 stages of widths {expected}, not {features}")
        network = official.UKAN(num_classes, input_channels, embed_dims=[e0, e1, e2])
        # Its first convolution takes 3 channels whatever input_channels says (archs.py: ConvLayer(3, ...)), a bug
        # the preset does not reproduce: here it takes input_channels, as the argument means.
        network.encoder1.conv[0] = nn.Conv2d(input_channels, e0 // 8, 3, padding=1)
        return network

    return build, {"timm": "not used (stand-ins for DropPath, to_2tuple, trunc_normal_)"}


def d3d_deform_conv_forward(x, weight, bias, offset, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, groups,
                            deformable_groups, im2col_step):
    """A plain-PyTorch stand-in for the official compiled D3D.deform_conv_forward, written from its CUDA source
    (3D/dcn/src/cuda/deform_im2col_cuda.cuh): offsets per deformable group, per tap (i, j, k), then (d, h, w);
    tap (i, j, k) of output (z, y, x) samples the input at (z * sd - pd + i * dd + offset_d, ...) trilinearly where
    every coordinate p is -1 < p < size, corners outside the input counting zero; elsewhere it is zero."""
    b, c, size = x.shape[0], x.shape[1], x.shape[2:]
    out_size = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1
                for n, p, d, k, s in zip(size, (pd, ph, pw), (dd, dh, dw), (kd, kh, kw), (sd, sh, sw))]
    taps = [(i, j, k) for i in range(kd) for j in range(kh) for k in range(kw)]
    offset = offset.view(b, deformable_groups, len(taps), 3, *out_size)
    grouped = x.reshape(b, deformable_groups, c // deformable_groups, -1)  # the input per deformable group
    origin = torch.meshgrid(*(torch.arange(n, dtype=x.dtype) * s - p
                              for n, s, p in zip(out_size, (sd, sh, sw), (pd, ph, pw))), indexing="ij")
    columns = []
    for t, tap in enumerate(taps):
        position = [origin[a] + tap[a] * (dd, dh, dw)[a] + offset[:, :, t, a] for a in range(3)]  # (b, g, *out)
        inside = (position[0] > -1) & (position[0] < size[0]) & (position[1] > -1) & (position[1] < size[1]) & \
            (position[2] > -1) & (position[2] < size[2])
        low = [p.floor() for p in position]
        value = torch.zeros(b, deformable_groups, c // deformable_groups, *out_size, dtype=x.dtype)
        for corner in [(a, e, f) for a in (0, 1) for e in (0, 1) for f in (0, 1)]:
            index = [low[a] + corner[a] for a in range(3)]
            weight_ = torch.ones_like(position[0])
            valid = inside.clone()
            for a in range(3):
                fraction = position[a] - low[a]
                weight_ = weight_ * (fraction if corner[a] else 1 - fraction)
                valid &= (index[a] >= 0) & (index[a] <= size[a] - 1)
            flat = ((index[0].clamp(0, size[0] - 1) * size[1] + index[1].clamp(0, size[1] - 1)) * size[2]
                    + index[2].clamp(0, size[2] - 1)).long().flatten(2)  # (b, g, P)
            gathered = torch.gather(grouped, 3, flat.unsqueeze(2).expand(-1, -1, grouped.shape[2], -1))
            value += (gathered.view_as(value) * (weight_ * valid).unsqueeze(2))
        columns.append(value.reshape(b, c, -1))
    columns = torch.stack(columns, 2)  # (b, c, taps, P)
    out_channels = weight.shape[0]
    w = weight.reshape(groups, out_channels // groups, c // groups, len(taps))
    cols = columns.reshape(b, groups, c // groups, len(taps), -1)
    out = torch.einsum("gock,bgckp->bgop", w, cols).reshape(b, out_channels, *out_size)
    return out + bias.view(1, -1, 1, 1, 1)


def load_dlka_net(checkout: Path):
    """3D/d_lka_former with MONAI 0.8.1 and einops 0.4.1 (its requirements; not ours: install them with
    `pip install --target DIR monai==0.8.1 einops==0.4.1` and put DIR on PYTHONPATH). Stand-ins: the compiled D3D
    extension (d3d_deform_conv_forward), timm's trunc_normal_ (which its 3D network does not call) and the nnU-Net
    v1 inference base class (neural_network.SegmentationNetwork)."""
    stand_in("D3D", deform_conv_forward=d3d_deform_conv_forward)
    layers = stand_in("timm.models.layers", trunc_normal_=nn.init.trunc_normal_)
    stand_in("timm", models=stand_in("timm.models", layers=layers))
    sys.path.insert(0, str(checkout / "3D"))
    stand_in("d_lka_former.network_architecture.neural_network", SegmentationNetwork=nn.Module)
    network_module = importlib.import_module("d_lka_former.network_architecture.synapse.d_lka_former_synapse")
    blocks = importlib.import_module("d_lka_former.network_architecture.synapse.transformerblock")

    def build(configuration: dict, input_channels: int, num_classes: int) -> nn.Module:
        # The official network is fixed: five levels, a (2, 4, 4) patch embedding, strides 2 below it, widths
        # f, 2f, 4f, 8f, 16f from its feature_size f, 3x3x3 convolutions, 3 blocks everywhere.
        kw = configuration["architecture"]["arch_kwargs"]
        f, patch = kw["features_per_stage"][0], configuration["patch_size"]
        expected = ([f * 2 ** s for s in range(5)], [[1, 1, 1], [2, 4, 4]] + [[2, 2, 2]] * 3)
        if (kw["features_per_stage"], kw["strides"]) != expected:
            raise ValueError(f"the official D-LKA Net has widths {expected[0]} and strides {expected[1]}")
        if input_channels != 1:
            raise ValueError("the official encoder's patch embedding takes 1 channel (its in_channels is left at 1)")
        network = network_module.D_LKA_Former(
            in_channels=input_channels, out_channels=num_classes, img_size=patch, feature_size=f, hidden_size=16 * f,
            num_heads=4, depths=[3, 3, 3, 3], dims=[2 * f, 4 * f, 8 * f, 16 * f], do_ds=True,
            trans_block=blocks.TransformerBlock_3D_single_deform_LKA)
        # Its blocks' positional embeddings are sized for the Synapse patch 64 x 128 x 128 (input_size and out_size
        # are constants in model_components.py and d_lka_former_synapse.py): sized here for this patch, zeros
        # as there.
        tokens = {f * 2 ** level: math.prod(n // (2 ** level * s) for n, s in zip(patch, (1, 2, 2)))
                  for level in range(1, 5)}  # per width: the positions of its level, strides (2, 4, 4) * 2^(level-1)
        for block in network.modules():
            if isinstance(block, blocks.TransformerBlock_3D_single_deform_LKA):
                width = block.pos_embed.shape[2]
                block.pos_embed = nn.Parameter(torch.zeros(1, tokens[width], width))
        return network

    return build, {"monai": _version("monai"), "einops": _version("einops"),
                   "D3D": "plain-PyTorch stand-in (scripts/official_goldens.py d3d_deform_conv_forward)"}


def load_dlka_2d_block(checkout: Path, channels: int):
    """The official 2D decoder's deformableLKABlock (2D/networks/MaxViT_deform_LKA.py) as its decoder layer builds
    and initialises it (MyDecoderLayer: two such blocks, Xavier-uniform convolutions), its deformable convolutions
    torchvision's. Stand-ins: timm's DropPath (drop path 0), fvcore (a FLOP counter) and the MaxViT backbone
    module, which the decoder layer does not use; einops as for 3D."""
    layers = stand_in("timm.models.layers", DropPath=None, trunc_normal_=nn.init.trunc_normal_)
    stand_in("timm", models=stand_in("timm.models", layers=layers))
    stand_in("networks.merit_lib.networks", MaxViT4Out_Small=None)
    stand_in("fvcore", nn=stand_in("fvcore.nn", FlopCountAnalysis=None))
    sys.path.insert(0, str(checkout / "2D"))
    official = importlib.import_module("networks.MaxViT_deform_LKA")
    # in_out_chan: (dims, out_dim, key_dim, value_dim, x1_dim); only out_dim reaches the blocks
    layer = official.MyDecoderLayer((4, 4), [channels] * 5, 1, "mix_skip")

    def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) <-> the block's (B, N, C)
        b, c, h, w = x.shape
        return block(x.flatten(2).transpose(1, 2), h, w).transpose(1, 2).reshape(b, c, h, w)

    return layer.layer_lka_1, forward


OFFICIAL = {
    "lkm_unet": Official(
        repository="wjh892521292/LKM-UNet", commit="66157750a2ad9e1cd7de5b48d8f69bb0262244ce", load=load_lkm_unet,
        cases=[
            # PiM's grids (10, 10, 5, 5) divide the 40 x 40 maps (the last stage's sequences are one token
            # long); at 40 x 48, the patch, every stage falls back to the global scan.
            Case("2d", small(plans_configuration(2, 4, 32, [40, 48]), [4, 8, 8, 8]), 1, 3,
                 [[2, 1, 40, 40], [1, 1, 40, 48]]),
            # PiM's grids (10, 14, 12), (5, 7, 6), (5, 7, 6) divide 20 x 28 x 24; 20 x 28 x 20 does not.
            Case("3d", small(plans_configuration(3, 3, 32, [20, 28, 24]), [4, 8, 8]), 2, 2,
                 [[1, 2, 20, 28, 24], [1, 2, 20, 28, 20]]),
        ],
        paper={"2d": (plans_configuration(2, 7, 512, [320, 320]), 1, 14),
               "3d": (plans_configuration(3, 6, 320, [80, 112, 96]), 1, 14)}),
    **{f"umamba_{variant}": Official(
        repository="bowang-lab/U-Mamba", commit="28459e33ca03769800dd35e23c6e62491d1925b5", load=umamba_loader(variant),
        cases=[
            # Four 2D stages: Mamba at stages 1 and 3 of U-Mamba_Enc, the last over its channels (2 x 2 = 4
            # positions, 8 channels); one block in stages 2 and 3 and in the two upper decoder stages.
            Case("2d", small(plans_configuration(2, 4, 8, [16, 16]), [4, 8, 8, 8]), 1, 3, [[2, 1, 16, 16]]),
            # Four 3D stages: the last two over their channels in U-Mamba_Enc (16 and 2 positions, 8 channels).
            Case("3d", small(plans_configuration(3, 4, 8, [16, 8, 8]), [4, 8, 8, 8]), 2, 2, [[1, 2, 16, 8, 8]]),
        ],
        # nnU-Net's default plans for the paper's abdomen CT (3D) and endoscopy (2D) sets are dataset-specific;
        # these are typical ones: 6 3D stages to 320, 7 2D stages to 512.
        paper={"2d": (plans_configuration(2, 7, 512, [512, 640]), 3, 8),
               "3d": (plans_configuration(3, 6, 320, [64, 160, 192]), 1, 14)})
       for variant in ("bot", "enc")},
    **{f"mednext_{size.lower()}": Official(
        repository="MIC-DKFZ/MedNeXt", commit="0b78ed869fbd1cc2fd38754d2f8519f1b72d43ba", load=mednext_loader(size),
        # Five 2D stages of widths 1 to 16 (the official network doubles its first width), 32 x 32: the bottleneck
        # is 2 x 2. S also in 3D with kernel 5 (32 x 16 x 16), B in 2D with kernel 5.
        cases=[Case("2d", small(plans_configuration(2, 5, 16, [32, 32]), [1, 2, 4, 8, 16]), 1, 3, [[1, 1, 32, 32]]),
               *{"S": [Case("3d_k5", small(plans_configuration(3, 5, 16, [32, 16, 16]), [1, 2, 4, 8, 16]), 1, 2,
                            [[1, 1, 32, 16, 16]], "official_k5", {"kernel_size": 5})],
                 "B": [Case("2d_k5", small(plans_configuration(2, 5, 16, [32, 32]), [1, 2, 4, 8, 16]), 1, 2,
                            [[1, 1, 32, 32]], "official_k5", {"kernel_size": 5})]}.get(size, [])],
        # The paper's 3D networks: width 32 doubling to 512, 1 channel, the 14 outputs of BTCV's 13 organs.
        paper={"3d": (plans_configuration(3, 5, 512, [128, 128, 128]), 1, 14)},
        dropped=("dummy_tensor",))
       for size in "SBML"},
    "ukan": Official(
        repository="CUHK-AIM-Group/U-KAN", commit="b20bf63490f01ba45cc2c18834bc0c4975c12715", load=load_ukan,
        cases=[
            # embed_dims (16, 24, 32); inputs of two shapes the total stride 32 divides.
            Case("2d", small(plans_configuration(2, 6, 32, [64, 64]), [2, 2, 4, 16, 24, 32]), 1, 3,
                 [[1, 1, 64, 64], [1, 1, 32, 96]]),
        ],
        # The paper's embed_dims (256, 320, 512), 3 input channels; 2 outputs, as nnU-Net plans a binary task.
        paper={"2d": (small(plans_configuration(2, 6, 512, [256, 256]), [32, 32, 64, 256, 320, 512]), 3, 2)},
        count_on="cpu", heads=1),
    "dlka_net": Official(
        repository="xmindflow/deformableLKA", commit="d2d299267a765b07ca8956b18d94876e729e79f2", load=load_dlka_net,
        cases=[
            # feature_size 2; the smallest patch the total stride (16, 32, 32) divides: levels 8^3, 4^3, 2^3, 1.
            Case("3d", dlka_configuration(2, [16, 32, 32]), 1, 3, [[1, 1, 16, 32, 32]]),
        ],
        # The Synapse network: feature_size 16, patch 64 x 128 x 128, 1 channel, 14 outputs (13 organs).
        paper={"3d": (dlka_configuration(16, [64, 128, 128]), 1, 14)}, heads=3,
        # The 2D decoder block at 8 channels: in our preset on 2D plans of widths 4, 8, 8, 8 it is the first block of
        # the deepest decoder stage (1/4 resolution).
        blocks=[BlockCase("2d_decoder_block", load_dlka_2d_block,
                          {**small(plans_configuration(2, 4, 8, [32, 32]), [4, 8, 8, 8]), "input_channels": 1,
                           "num_classes": 2}, "decoder.stages.0.0", 8, [1, 8, 12, 16])]),
}


# The grid of the randomised state's values: int16 multiples of it store each value in 2 bytes, which compress
# to under one (D-LKA Net's smallest official network has 1.2 M parameters; the goldens' budget is 2 MB in all).
STEP = 1 / 32


def randomise(network: nn.Module, seed: int = 1) -> None:
    """Move every parameter and buffer off its initial value (zero-initialised norms included) by normal noise
    of standard deviation 0.05, so that each one changes the outputs, onto the multiples of STEP: the goldens
    store them exactly, and the tests read back the very numbers the official code ran with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*network.parameters(), *network.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
                tensor.copy_((tensor / STEP).round() * STEP)


def initialisation(network: nn.Module) -> dict[str, list[float]]:
    """[mean, standard deviation, size] of every floating-point tensor as the official code initialises
    it (seed 0): what the preset's initialisation is compared with."""
    def rounded(value: float) -> float:
        return float(f"{value:.6g}")

    def spread(t: torch.Tensor) -> float:  # a constant's is 0 (float32's std of 8 x 0.01 is 1e-9)
        return 0.0 if bool((t == t.flatten()[0]).all()) else rounded(t.std().item())

    return {name: [rounded(t.mean().item()), spread(t), t.numel()]
            for name, t in network.state_dict().items() if t.is_floating_point()}


def state_arrays(network: nn.Module) -> tuple[np.ndarray, list, dict[str, np.ndarray], dict[str, str]]:
    """The randomised state dict, each tensor once: the floating-point tensors as one int16 array of multiples of
    STEP and their names and shapes in its order, the integer tensors by name, and the names that share a
    tensor (dynamic_network_architectures keeps the encoder in the decoder and each convolution twice) mapped
    to the name stored."""
    codes, layout, integers, first, aliases = [], [], {}, {}, {}
    for name, tensor in network.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if identity in first:
            aliases[name] = first[identity]
            continue
        first[identity] = name
        if not tensor.is_floating_point():
            integers[name] = tensor.numpy()
            continue
        code = (tensor.double() / STEP).round()
        if code.abs().max() >= 2 ** 15 or not torch.equal(code * STEP, tensor.double()):
            raise ValueError(f"{name} is not a multiple of {STEP} within int16's range")
        codes.append(code.flatten().numpy().astype(np.int16))
        layout.append([name, list(tensor.shape)])
    return np.concatenate(codes), layout, integers, aliases


def parameter_count(device: str, build, configuration: dict, input_channels: int, num_classes: int,
                    dropped: tuple[str, ...] = ()) -> int:
    with torch.device(device):
        network = build(configuration, input_channels, num_classes)
    return sum(p.numel() for name, p in network.named_parameters() if not name.startswith(dropped))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="git checkout of the official repository")
    parser.add_argument("--arch", required=True, choices=sorted(OFFICIAL))
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "official")
    args = parser.parse_args(argv)
    spec = OFFICIAL[args.arch]
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit != spec.commit:
        sys.exit(f"{args.checkout} is at commit '{commit or 'none (not a git checkout)'}'; the goldens are made at "
                 f"{spec.repository}@{spec.commit}: git -C {args.checkout} checkout {spec.commit}")
    build, versions = spec.load(args.checkout)

    arrays, cases = {}, []
    for case in spec.cases:
        torch.manual_seed(0)
        network = build(case.configuration, case.input_channels, case.num_classes, **case.options).eval()
        initial = initialisation(network)
        randomise(network)
        codes, layout, integers, aliases = state_arrays(network)
        arrays[f"{case.name}/state"] = codes
        arrays |= {f"{case.name}/state/{k}": v for k, v in integers.items()}
        for i, shape in enumerate(case.inputs):
            # values float16 holds exactly, which compress
            x = torch.randn(shape, generator=torch.Generator().manual_seed(2 + i)).half().float()
            with torch.no_grad():
                outputs = network(x)
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
            arrays[f"{case.name}/input/{i}"] = x.numpy()
            arrays |= {f"{case.name}/output/{i}/{j}": y.numpy() for j, y in enumerate(outputs)}
        cases.append({"name": case.name, "preset": case.preset, **case.configuration,
                      "input_channels": case.input_channels, "num_classes": case.num_classes,
                      "inputs": len(case.inputs), "state": layout, "state_step": STEP, "aliases": aliases,
                      "initialisation": {k: v for k, v in initial.items() if k not in aliases}})
        print(f"{args.arch} {case.name}: {sum(p.numel() for p in network.parameters())} parameters, "
              f"{len(case.inputs)} inputs")

    blocks = []
    for block in spec.blocks:
        torch.manual_seed(0)
        module, forward = block.load(args.checkout, block.channels)
        module.eval()
        initial = initialisation(module)
        randomise(module)
        codes, layout, integers, aliases = state_arrays(module)
        arrays[f"{block.name}/state"] = codes
        arrays |= {f"{block.name}/state/{k}": v for k, v in integers.items()}
        x = torch.randn(block.input, generator=torch.Generator().manual_seed(2)).half().float()
        with torch.no_grad():
            arrays[f"{block.name}/output/0/0"] = forward(module, x).numpy()
        arrays[f"{block.name}/input/0"] = x.numpy()
        blocks.append({"name": block.name, **block.configuration, "path": block.path, "inputs": 1, "state": layout,
                       "state_step": STEP, "aliases": aliases,
                       "initialisation": {k: v for k, v in initial.items() if k not in aliases}})
        print(f"{args.arch} {block.name}: {sum(p.numel() for p in module.parameters())} parameters")

    counts = {name: parameter_count(spec.count_on, build, *paper, spec.dropped) for name, paper in spec.paper.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / f"{args.arch}.npz", **arrays)
    meta = {"repository": spec.repository, "commit": spec.commit, "made_by": "scripts/official_goldens.py",
            "versions": {"torch": torch.__version__, "numpy": np.__version__,
                         "dynamic_network_architectures": _version("dynamic_network_architectures"), **versions},
            "heads": spec.heads, "cases": cases, "blocks": blocks,
            "paper_parameters": {name: {**paper[0], "input_channels": paper[1], "num_classes": paper[2],
                                        "parameters": counts[name]} for name, paper in spec.paper.items()}}
    (args.out / f"{args.arch}.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")  # compact: 2 MB in all
    print(f"parameters at the paper's configurations: {counts}")
    print(f"wrote {args.out / args.arch}.npz and .json")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
