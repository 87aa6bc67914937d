"""What every nnunet-ext network shares: the nnU-Net output contract, input padding, nnU-Net's
initialisation and its U-Net decoder."""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0

from nnunet_ext.topology import StageHook, Topology, keep_stage


def rename_state_dict(state: Mapping[str, torch.Tensor],
                      rules: Sequence[tuple[str, str | Callable[[re.Match], str]]]) -> dict[str, torch.Tensor]:
    """`state` with every key rewritten by the (pattern, replacement) regular expressions in turn (`re.sub`'s
    replacements: a string or a function of the match): how a checkpoint of an official code's network
    becomes the state dict of our `official` preset."""
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def mismatching_tensors(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    """The names of `ours` that `theirs` lacks or shapes differently, in order, and the names only `theirs`
    has: why a state dict does not load into a network (load_state_dict would not say it for keys under
    a submodule that is None)."""
    wrong = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    return wrong, [k for k in theirs if k not in ours]


def deep_supervision_heads(state: Mapping[str, torch.Tensor], beyond: int = 1) -> list[str]:
    """The names of the heads below the `beyond` highest resolutions (UNetDecoder's `seg_layers` but the last
    `beyond`): by default those nnU-Net's deep supervision trains, which some official networks do not have."""
    heads = [k for k in state if k.startswith("decoder.seg_layers.")]
    last = max((int(k.split(".")[2]) for k in heads), default=-1)
    return [k for k in heads if int(k.split(".")[2]) <= last - beyond]


def with_zero_heads(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`theirs` (an official network's converted state dict) with each deep-supervision head of `ours` that it
    lacks, at zero: the full-resolution output is the official network's, and nnU-Net's -pretrained_weights
    loads no heads, so fine-tuning trains them from nnU-Net's initialisation."""
    return {**{k: torch.zeros_like(ours[k]) for k in deep_supervision_heads(ours) if k not in theirs}, **theirs}


class UNetDecoder(nn.Module):
    """nnU-Net's U-Net decoder, built on the plans' topology, with the hooks our networks need.

    Per decoder stage, deepest first (stage i works at the resolution of encoder stage
    s = n_stages - 2 - i): a transposed convolution up from the stage below (`upsample(s)`, where
    given, builds another module for it), the skip of encoder stage s merged in (`merge`: "concat" as
    nnU-Net does, or "add"; none at stage 0 with `full_resolution_skip=False`, for encoders whose first
    output is already downsampled), then the stage's blocks; a 1x1 head per stage. The blocks are the
    plans' convolutions (`residual`: nnU-Net's residual blocks, as its ResEnc decoder builds them),
    passed through the `stage` hook (`nnunet_ext.topology.StageHook`, called deepest first).
    `gates[i]`, where given, turns stage i's skip into `gates[i](skip, x)`, x being the features below
    it. Returns the logits highest resolution first with deep supervision, else the last head's only.

    `encoder`: nnU-Net's decoders hold the encoder as a submodule, which puts its weights into the
    state dict a second time (`decoder.encoder.*`). Networks that were built on them pass it, so that
    their checkpoints keep loading.
    """

    def __init__(self, topology: Topology, num_classes: int, deep_supervision: bool, stage: StageHook = keep_stage,
                 merge: str = "concat", residual: bool = False, gates: Sequence[nn.Module] | None = None,
                 encoder: nn.Module | None = None, upsample: Callable[[int], nn.Module] | None = None,
                 full_resolution_skip: bool = True):
        super().__init__()
        if merge not in ("concat", "add"):
            raise ValueError(f"merge must be 'concat' or 'add', got {merge!r}.")
        if encoder is not None:
            self.encoder = encoder
        features, strides = topology.features_per_stage, topology.strides
        resolutions = range(topology.n_stages - 2, -1, -1)  # encoder stage of each decoder stage, deepest first
        blocks = topology.residual_blocks if residual else topology.conv_blocks

        def plans_stage(s: int) -> nn.Module:
            count = topology.n_conv_per_stage_decoder[topology.n_stages - 2 - s]
            return blocks(count, (2 if merge == "concat" else 1) * features[s], s)

        def transposed(s: int) -> nn.Module:
            return get_matching_convtransp(topology.conv_op)(features[s + 1], features[s], strides[s + 1],
                                                             strides[s + 1], bias=topology.conv_bias)

        self.stages = nn.ModuleList(stage(s, functools.partial(plans_stage, s)) for s in resolutions)
        self.transpconvs = nn.ModuleList((upsample or transposed)(s) for s in resolutions)
        self.seg_layers = nn.ModuleList(topology.conv_op(features[s], num_classes, 1, 1, 0, bias=True)
                                        for s in resolutions)
        self.gates = None if gates is None else nn.ModuleList(gates)
        self.merge, self.deep_supervision, self.full_resolution_skip = merge, deep_supervision, full_resolution_skip

    def forward(self, skips: list[torch.Tensor]):
        x, outputs, last = skips[-1], [], len(self.stages) - 1
        for i, (up, stage, seg) in enumerate(zip(self.transpconvs, self.stages, self.seg_layers)):
            if i == last and not self.full_resolution_skip:
                x = stage(up(x))
            else:
                skip = skips[-(i + 2)] if self.gates is None else self.gates[i](skips[-(i + 2)], x)
                x = stage(torch.cat((up(x), skip), 1) if self.merge == "concat" else up(x) + skip)
            if self.deep_supervision or i == last:
                outputs.append(seg(x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


class NonFiniteInputError(SystemExit):
    """An input to predict holds NaN or infinite values.

    A SystemExit rather than a ValueError: nnU-Net's sliding-window prediction catches any Exception,
    deletes variables that do not exist yet when the first patch fails, and so ends in an unrelated
    UnboundLocalError; a SystemExit passes through, and nnUNetv2_predict ends with this message alone."""


@torch.compiler.disable  # data-dependent: keep it out of compiled graphs
def check_finite(x: torch.Tensor, network: str) -> None:
    bad = int(x.numel() - torch.isfinite(x).sum())
    if bad:
        raise NonFiniteInputError(
            f"{network}: {bad} of the {x.numel()} values of an input patch are NaN or infinite. When predicting "
            "with nnUNetv2_predict it is the image named last above ('Predicting <case>:'): nnU-Net's "
            "preprocessing passes NaN from .mha, .nrrd or nibabel-read files through, and no segmentation near "
            "them can be trusted. Replace them in that image (for example with numpy.nan_to_num) and run the "
            "same command with --continue_prediction: segmentations already in the output folder are kept and "
            "the remaining cases are predicted.")


class SegmentationNetwork(nn.Module):
    """Base class: subclasses set `self.encoder` (returns one skip per stage) and `self.decoder`
    (has `deep_supervision`; returns a list of logits, highest resolution first, or one tensor).

    Inputs whose size is not a multiple of the total stride are zero-padded up to one and every
    output is cropped back, so any input size works (nnU-Net's patches always divide already).
    """

    def __init__(self, topology: Topology):
        super().__init__()
        self.total_stride = topology.total_stride
        # Stride of each deep-supervision output relative to the input, highest resolution first.
        self.output_strides = topology.cumulative_strides()[:-1]
        # What the training log says about how this network computes on the plans (where a preset
        # reproduces a questionable choice of the official code), one sentence each.
        self.notes: list[str] = []

    def initialize(self, identity_blocks: nn.Module | None = None, own_initialization: tuple[type, ...] = ()) -> None:
        """nnU-Net's initialisation: He-normal convolutions, residual blocks starting as identities
        (their last norm at zero; only those inside `identity_blocks` where it is given). Then every
        module of a type in `own_initialization` gets its own initialisation back (`reset_parameters`):
        blocks whose published initialisation He's would undo."""
        self.apply(InitWeights_He(1e-2))
        (self if identity_blocks is None else identity_blocks).apply(init_last_bn_before_add_to_0)
        for module in self.modules():
            if isinstance(module, own_initialization):
                module.reset_parameters()

    def forward_features(self, x: torch.Tensor):
        """Encoder then decoder on an input whose size divides the total stride."""
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor):
        if not self.training:  # predicting: refuse what no segmentation can be trusted on
            check_finite(x, type(self).__name__)
        size = x.shape[2:]
        pad = [(-s) % t for s, t in zip(size, self.total_stride)]
        if not any(pad):
            return self.forward_features(x)
        x = F.pad(x, [p for axis in reversed(pad) for p in (0, axis)])
        out = self.forward_features(x)

        def crop(y, stride):
            return y[(..., *(slice(0, math.ceil(s / st)) for s, st in zip(size, stride)))]

        if isinstance(out, torch.Tensor):
            return crop(out, self.output_strides[0])
        return [crop(y, st) for y, st in zip(out, self.output_strides)]
