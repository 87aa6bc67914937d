"""What every nnunet-ext network shares: the nnU-Net output contract and input padding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0

from nnunet_ext.topology import Topology


def decode(skips: list[torch.Tensor], step, seg_layers, deep_supervision: bool):
    """The U-Net decoder loop. x starts as the deepest skip and `step(i, x, skip)` gives the next
    one, decoder stage i = 0 being the deepest; `seg_layers[i]` is stage i's head. Returns the
    logits highest resolution first with deep supervision, otherwise the last head's only."""
    x, outputs = skips[-1], []
    for i, seg in enumerate(seg_layers):
        x = step(i, x, skips[-(i + 2)])
        if deep_supervision or i == len(seg_layers) - 1:
            outputs.append(seg(x))
    outputs = outputs[::-1]
    return outputs if deep_supervision else outputs[0]


class AdditiveSkipDecoder(nn.Module):
    """Per decoder stage: a transposed convolution, the skip added (not concatenated), then
    `blocks[s]`, the stage's blocks at the resolution of encoder stage s; a 1x1 head per stage."""

    def __init__(self, topology: Topology, num_classes: int, deep_supervision: bool, blocks: list[nn.Module]):
        super().__init__()
        transposed = get_matching_convtransp(topology.conv_op)
        features, strides = topology.features_per_stage, topology.strides
        resolutions = range(topology.n_stages - 2, -1, -1)  # deepest decoder stage first
        self.transpconvs = nn.ModuleList(transposed(features[s + 1], features[s], strides[s + 1], strides[s + 1])
                                         for s in resolutions)
        self.stages = nn.ModuleList(blocks[s] for s in resolutions)
        self.seg_layers = nn.ModuleList(topology.conv_op(features[s], num_classes, 1) for s in resolutions)
        self.deep_supervision = deep_supervision

    def step(self, i: int, x, skip):
        return self.stages[i](self.transpconvs[i](x) + skip)

    def forward(self, skips):
        return decode(skips, self.step, self.seg_layers, self.deep_supervision)


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

    # Activation elements per sample at the plans' patch that nnU-Net's U-Net has no counterpart for
    # and that do not grow like its feature maps: attention matrices (heads x queries x keys, square in
    # the patch), KAN spline bases. nnunet_ext.memory's model fits a cost per element to each network.
    extra_elements: int = 0

    def __init__(self, topology: Topology):
        super().__init__()
        self.total_stride = topology.total_stride
        # Stride of each deep-supervision output relative to the input, highest resolution first.
        self.output_strides = topology.cumulative_strides()[:-1]

    def initialize(self, identity_blocks: nn.Module | None = None) -> None:
        """nnU-Net's initialisation: He-normal convolutions, residual blocks starting as identities
        (their last norm at zero); only those inside `identity_blocks` where it is given."""
        self.apply(InitWeights_He(1e-2))
        (self if identity_blocks is None else identity_blocks).apply(init_last_bn_before_add_to_0)

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
