"""The U-Net topology nnU-Net planned, read once from the plans for every architecture.

nnU-Net 2.8 stores the network in `configurations.<cfg>.architecture` as the constructor
arguments of a dynamic_network_architectures U-Net (`PlainConvUNet` for the default plans,
`ResidualEncoderUNet` for the ResEnc plans). Every nnunet-ext network is built from a
:class:`Topology`, never from the raw dictionary, so the differences between plan kinds are
handled here and nowhere else.
"""

from __future__ import annotations

import math
import pydoc
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from nnunet_ext.blocks import layers
from nnunet_ext.errors import ConfigurationError

StageHook = Callable[[int, Callable[[], nn.Module]], nn.Module]
"""How a network builds its stages: called once per stage s with a factory of the stage the plans
give (`Topology.build_encoder`, `networks.base.UNetDecoder`), it returns the stage to use: the
factory's module (keep it), that module followed by more (extend it), or another module (replace it)."""


def keep_stage(s: int, plans_stage: Callable[[], nn.Module]) -> nn.Module:
    """The StageHook that keeps every stage the plans give."""
    return plans_stage()


def _tuples(values: Sequence, dim: int, what: str) -> tuple[tuple[int, ...], ...]:
    """Per-stage values (scalars or lists) as tuples of length `dim`; Topology checks their count."""
    out = []
    for v in values:
        v = (int(v),) * dim if isinstance(v, (int, float)) else tuple(int(i) for i in v)
        if len(v) != dim:
            raise ConfigurationError(f"'{what}' entry {list(v)} does not match the {dim}D convolutions of "
                                     "these plans.")
        out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class Topology:
    """Encoder/decoder layout of one plans configuration.

    `n_blocks_per_stage` counts convolutions per encoder stage in plain plans and residual blocks
    in ResEnc plans (`residual_encoder=True`); :meth:`build_encoder` builds the matching
    dynamic_network_architectures encoder, which returns one skip per stage.
    """

    conv_op: type[nn.Module]
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_blocks_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    patch_size: tuple[int, ...]
    residual_encoder: bool = False
    conv_bias: bool = True
    norm_op: type[nn.Module] | None = None
    norm_op_kwargs: dict | None = None
    dropout_op: type[nn.Module] | None = None
    dropout_op_kwargs: dict | None = None
    nonlin: type[nn.Module] | None = None
    nonlin_kwargs: dict | None = None

    def __post_init__(self):
        n, dim = self.n_stages, self.dim
        if n < 2:
            raise ConfigurationError(f"The plans have {n} stage(s); a U-Net needs at least 2.")
        for what in ("kernel_sizes", "strides", "n_blocks_per_stage"):
            if len(getattr(self, what)) != n:
                raise ConfigurationError(f"'{what}' has {len(getattr(self, what))} entries but the plans have "
                                         f"{n} stages.")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise ConfigurationError(f"'n_conv_per_stage_decoder' needs {n - 1} entries for {n} stages, "
                                     f"got {len(self.n_conv_per_stage_decoder)}.")
        if len(self.patch_size) != dim:
            raise ConfigurationError(f"Patch size {list(self.patch_size)} does not match the {dim}D convolutions of "
                                     "these plans.")

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def dim(self) -> int:
        return convert_conv_op_to_dim(self.conv_op)

    def cumulative_strides(self) -> list[tuple[int, ...]]:
        """How much each stage's output is downsampled relative to the input, per axis."""
        return [tuple(math.prod(s[a] for s in self.strides[:i + 1]) for a in range(self.dim))
                for i in range(self.n_stages)]

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of all strides: inputs must be a multiple of this per axis."""
        return self.cumulative_strides()[-1]

    def feature_map_sizes(self, input_size: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """Spatial size of each encoder stage's output for `input_size` (default: the patch size)."""
        size = tuple(input_size or self.patch_size)
        sizes = []
        for stride in self.strides:
            size = tuple(math.ceil(i / s) for i, s in zip(size, stride))
            sizes.append(size)
        return sizes

    @property
    def norm_and_nonlin(self) -> dict:
        """The plans' norm and nonlinearity as (op, kwargs) pairs, the arguments every block takes."""
        return dict(norm_op=self.norm_op, norm_op_kwargs=self.norm_op_kwargs, nonlin=self.nonlin,
                    nonlin_kwargs=self.nonlin_kwargs)

    def norm(self, channels: int) -> nn.Module:
        """The plans' normalisation for `channels` (Identity where the plans have none)."""
        return layers.norm(self.norm_op, self.norm_op_kwargs, channels)

    def nonlinearity(self) -> nn.Module:
        """The plans' nonlinearity (Identity where the plans have none)."""
        return layers.nonlinearity(self.nonlin, self.nonlin_kwargs)

    def conv_blocks(self, count: int, input_channels: int, s: int, stride=1) -> StackedConvBlocks:
        """`count` of the plans' convolutions (norm, nonlinearity) at stage s's width and kernel."""
        return StackedConvBlocks(count, self.conv_op, input_channels, self.features_per_stage[s],
                                 self.kernel_sizes[s], stride, self.conv_bias, self.norm_op, self.norm_op_kwargs,
                                 self.dropout_op, self.dropout_op_kwargs, self.nonlin, self.nonlin_kwargs)

    def residual_blocks(self, count: int, input_channels: int, s: int, stride=1) -> StackedResidualBlocks:
        """`count` of nnU-Net's residual blocks (BasicBlockD) at stage s's width and kernel."""
        return StackedResidualBlocks(count, self.conv_op, input_channels, self.features_per_stage[s],
                                     self.kernel_sizes[s], stride, self.conv_bias, self.norm_op, self.norm_op_kwargs,
                                     self.dropout_op, self.dropout_op_kwargs, self.nonlin, self.nonlin_kwargs)

    def stage_input_channels(self, s: int, input_channels: int) -> int:
        """Channels entering encoder stage s: the image's at stage 0, except behind the ResEnc stem."""
        if s:
            return self.features_per_stage[s - 1]
        return self.features_per_stage[0] if self.residual_encoder else input_channels

    def build_encoder(self, input_channels: int, stage: StageHook = keep_stage) -> PlainConvEncoder | ResidualEncoder:
        """dynamic_network_architectures' encoder for these plans (returning one skip per stage), its
        stages passed through `stage` from the highest resolution down."""
        common = dict(input_channels=input_channels, n_stages=self.n_stages,
                      features_per_stage=list(self.features_per_stage), conv_op=self.conv_op,
                      kernel_sizes=[list(k) for k in self.kernel_sizes], strides=[list(s) for s in self.strides],
                      conv_bias=self.conv_bias, norm_op=self.norm_op, norm_op_kwargs=self.norm_op_kwargs,
                      dropout_op=self.dropout_op, dropout_op_kwargs=self.dropout_op_kwargs,
                      nonlin=self.nonlin, nonlin_kwargs=self.nonlin_kwargs, return_skips=True)
        if self.residual_encoder:
            encoder = ResidualEncoder(n_blocks_per_stage=list(self.n_blocks_per_stage), **common)
        else:
            encoder = PlainConvEncoder(n_conv_per_stage=list(self.n_blocks_per_stage), **common)
        # Its forward runs `stages` in order; the one place a network's own stages go in.
        for s, plans_stage in enumerate(encoder.stages):
            encoder.stages[s] = stage(s, lambda plans_stage=plans_stage: plans_stage)
        return encoder

    @classmethod
    def from_plans(cls, configuration_manager) -> "Topology":
        """Read the topology of an nnU-Net `ConfigurationManager` (default or ResEnc plans)."""
        return cls.from_entry(configuration_manager.configuration.get("architecture"),
                              configuration_manager.patch_size)

    @classmethod
    def from_entry(cls, arch: dict | None, patch_size: Sequence[int]) -> "Topology":
        """Read a plans configuration's `architecture` entry (default or ResEnc plans) at `patch_size`."""
        if not isinstance(arch, dict) or "arch_kwargs" not in arch:
            raise ConfigurationError("This plans configuration has no 'architecture' entry with 'arch_kwargs'. "
                                     "nnunet-ext reads nnU-Net >= 2.4 plans; re-run nnUNetv2_plan_and_preprocess "
                                     "(or nnUNetv2_plan_experiment) with nnunetv2 2.8.")
        kw = dict(arch["arch_kwargs"])
        for key in arch.get("_kw_requires_import", ()):
            if kw.get(key) is not None:
                name, kw[key] = kw[key], pydoc.locate(kw[key])
                if kw[key] is None:
                    raise ConfigurationError(f"'{key}' names '{name}', which cannot be imported.")
        if "n_blocks_per_stage" in kw:
            blocks, residual = kw["n_blocks_per_stage"], True
        elif "n_conv_per_stage" in kw:
            blocks, residual = kw["n_conv_per_stage"], False
        else:
            raise ConfigurationError(f"network '{arch.get('network_class_name')}' is not a U-Net "
                                     "(no 'n_conv_per_stage' or 'n_blocks_per_stage'); nnunet-ext builds on nnU-Net's "
                                     "default or ResEnc plans (nnUNetPlans, nnUNetResEncUNet*Plans).")
        missing = [k for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                               "n_conv_per_stage_decoder") if k not in kw]
        if missing:
            raise ConfigurationError(f"network '{arch.get('network_class_name')}' lacks {missing}; "
                                     "nnunet-ext builds on nnU-Net's default or ResEnc plans.")
        conv_op = kw["conv_op"]
        if not (isinstance(conv_op, type) and issubclass(conv_op, (nn.Conv2d, nn.Conv3d))):
            raise ConfigurationError(f"conv_op {conv_op} is neither Conv2d nor Conv3d.")
        n, dim = int(kw["n_stages"]), convert_conv_op_to_dim(conv_op)

        def per_stage(value, stages=n):  # plans may give one value for all stages
            return [value] * stages if isinstance(value, int) else list(value)

        features = per_stage(kw["features_per_stage"])
        if len(features) != n:
            raise ConfigurationError(f"'features_per_stage' has {len(features)} entries but the plans have "
                                     f"{n} stages.")
        return cls(
            conv_op=conv_op,
            features_per_stage=tuple(int(f) for f in features),
            kernel_sizes=_tuples(per_stage(kw["kernel_sizes"]), dim, "kernel_sizes"),
            strides=_tuples(per_stage(kw["strides"]), dim, "strides"),
            n_blocks_per_stage=tuple(int(b) for b in per_stage(blocks)),
            n_conv_per_stage_decoder=tuple(int(c) for c in per_stage(kw["n_conv_per_stage_decoder"], n - 1)),
            patch_size=tuple(int(p) for p in patch_size),
            residual_encoder=residual,
            conv_bias=bool(kw.get("conv_bias", True)),
            norm_op=kw.get("norm_op"), norm_op_kwargs=kw.get("norm_op_kwargs"),
            dropout_op=kw.get("dropout_op"), dropout_op_kwargs=kw.get("dropout_op_kwargs"),
            nonlin=kw.get("nonlin"), nonlin_kwargs=kw.get("nonlin_kwargs"),
        )
