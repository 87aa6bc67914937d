"""Training memory of a network at a patch size: measured exactly, and the model the planner uses.

Measured (`training_peak_bytes`): the peak of the bytes held by tensors allocated during one training
step (forward with deep supervision, then backward): activations saved for the backward pass,
temporaries and gradients; the weights and the input batch are not counted. A dispatch mode sees every
tensor an operator allocates and when its storage is freed, so the figure is exact and the same on any
machine, unlike the resident set, which depends on the allocator. It is the CPU counterpart of CUDA's
`max_memory_allocated` over a step (which also holds the weights, the input and cuDNN workspaces).

Model (`MemoryModel`): nnU-Net sizes its patches with one number per patch, the summed feature-map
size of its PlainConvUNet on the topology planned for that patch (`Footprint.units`), and assumes
memory is proportional to it. Our networks add two terms that grow differently: activations a U-Net
has no counterpart for (`extra_elements` of the network: attention matrices, quadratic in the
tokens, and KAN spline bases) and gradients (the parameters, which grow with the number of stages).
Per architecture and dimension we fit

    peak bytes = batch * (a * units + b * extra_elements) + c * parameters

by least squares on measurements at FIT_PATCHES and check it at CHECK_PATCHES, which the fit never saw
(`nnunet-ext benchmark-memory`). The planner scales nnU-Net's own estimate by the ratio of the
architecture's model to PlainConvUNet's at batch 2, so nnU-Net's calibration of units to GPU memory
carries over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Patches the models are fitted on and checked on (isotropic spacing; nnU-Net plans the topology).
FIT_PATCHES = {2: ((64, 64), (96, 160), (128, 128), (160, 160), (256, 256), (320, 320)),
               3: ((32, 32, 32), (48, 48, 48), (64, 64, 64), (32, 64, 64))}
CHECK_PATCHES = {2: ((192, 192), (224, 224), (128, 256)), 3: ((40, 64, 48), (56, 56, 56))}
FIT_BATCH = 2
TOLERANCE = 0.2  # the estimate must be within 20% of the measured peak on CHECK_PATCHES


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages operators allocate while active, and their peak. Storages of
    `existing` tensors (weights, the input) are not counted when an operator returns a view of them.
    A weak reference keeps a storage's identity until it is swept, so an address is never reused
    under a key still held."""

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for key, (ref, _) in list(self.live.items()):
            if ref.expired():
                self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self.existing:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
                    if self.current > self.peak:  # freed storages only matter when the peak might move
                        self._sweep()
                        self.peak = max(self.peak, self.current)
        return out


def training_peak_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of the tensors allocated by one forward and backward pass of `net` on `x`."""
    net.zero_grad(set_to_none=True)
    with _LiveTensorBytes(existing=[*net.parameters(), *net.buffers(), x]) as counter:
        outputs = net(x)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
        sum(o.float().mean() for o in outputs).backward()
        del outputs
    return counter.peak


@dataclass(frozen=True)
class Footprint:
    """What the memory model needs to know about a network on a patch (per sample where it scales)."""

    units: int  # nnU-Net's measure: PlainConvUNet's summed feature-map size on this topology and patch
    extra_elements: int
    parameters: int

    @classmethod
    def of(cls, net: torch.nn.Module, units: int) -> "Footprint":
        """`net`'s footprint on a topology and patch where PlainConvUNet has `units`."""
        return cls(units=units, extra_elements=int(getattr(net, "extra_elements", 0)),
                   parameters=sum(p.numel() for p in net.parameters()))


def footprint(net: torch.nn.Module | None, architecture: dict, patch_size: Sequence[int], input_channels: int,
              num_classes: int) -> Footprint:
    """`net`'s footprint on the plans `architecture` entry (its topology) at `patch_size`; with `net`
    None, that of the entry's own network (PlainConvUNet)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plain = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                   architecture["_kw_requires_import"], input_channels, num_classes,
                                   allow_init=False)
    return Footprint.of(plain if net is None else net, int(plain.compute_conv_feature_map_size(list(patch_size))))


@dataclass(frozen=True)
class MemoryModel:
    """peak bytes = batch * (per_unit * units + per_extra * extra_elements) + per_parameter * parameters."""

    per_unit: float
    per_extra: float
    per_parameter: float

    def estimate(self, f: Footprint, batch: int) -> float:
        return batch * (self.per_unit * f.units + self.per_extra * f.extra_elements) \
            + self.per_parameter * f.parameters

    @classmethod
    def fit(cls, samples: Sequence[tuple[Footprint, int, float]]) -> "MemoryModel":
        """Non-negative least squares on (footprint, batch, measured bytes) samples, each row divided by
        its measurement so that small and large patches count alike (the check is a relative error)."""
        import numpy as np
        from scipy.optimize import nnls

        design = np.array([[b * f.units, b * f.extra_elements, f.parameters] for f, b, _ in samples], float)
        measured = np.array([m for *_, m in samples], float)
        return cls(*(float(c) for c in nnls(design / measured[:, None], np.ones(len(samples)))[0]))


# PlainConvUNet itself, fitted like the architectures (`nnunet-ext benchmark-memory --fit`).
PLAIN_UNET = {2: MemoryModel(7.512, 0.0, 2.55), 3: MemoryModel(10.34, 0.0, 0.01927)}
REFERENCE = "PlainConvUNet"


def relative_memory(model: MemoryModel, dim: int, net: Footprint, plain: Footprint) -> float:
    """An architecture's training memory relative to PlainConvUNet's on the same plans, at batch 2."""
    return model.estimate(net, FIT_BATCH) / PLAIN_UNET[dim].estimate(plain, FIT_BATCH)


def default_plans_architecture(patch_size: Sequence[int]) -> tuple[list[int], dict]:
    """The patch (rounded to the strides) and the `architecture` entry nnU-Net's default planner writes
    for `patch_size` at isotropic spacing: PlainConvUNet, 32 features doubling per stage up to 320 (3D)
    or 512 (2D), two convolutions per stage, instance norm, leaky ReLU."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    dim = len(patch_size)
    _, strides, kernels, patch, _ = get_pool_and_conv_props([1.0] * dim, list(patch_size), 4, 999999)
    n, cap = len(strides), 320 if dim == 3 else 512
    return [int(p) for p in patch], {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": n, "features_per_stage": [min(cap, 32 * 2 ** i) for i in range(n)],
                        "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels, "strides": strides,
                        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build(name: str, architecture: dict, patch_size: Sequence[int], input_channels: int, num_classes: int):
    """PlainConvUNet (`REFERENCE`) or a registered architecture on a plans `architecture` entry."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunet_ext.registry import get_architecture
    from nnunet_ext.topology import Topology

    if name == REFERENCE:
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      architecture["_kw_requires_import"], input_channels, num_classes,
                                      allow_init=True, deep_supervision=True)
    configuration = ConfigurationManager({"architecture": architecture, "patch_size": list(patch_size)})
    return get_architecture(name).build(Topology.from_plans(configuration), input_channels, num_classes)


def measure(name: str, patch_size: Sequence[int], batch: int = FIT_BATCH, input_channels: int = 1,
            num_classes: int = 3) -> dict:
    """Footprint and measured training peak of `name` on the default plans topology for `patch_size`,
    with Mamba's ops on their PyTorch paths: a GPU without mamba_ssm runs those, and they keep more
    for backward than the compiled CPU loops or mamba_ssm's kernels, so plans fit either way."""
    from nnunet_ext.ops.selective_scan import pytorch_paths_only

    torch.manual_seed(0)
    patch, architecture = default_plans_architecture(patch_size)
    net = build(name, architecture, patch, input_channels, num_classes)
    x = torch.randn(batch, input_channels, *patch)
    with pytorch_paths_only():
        peak = training_peak_bytes(net, x)
    return {"network": name, "patch_size": patch, "batch": batch,
            "footprint": footprint(net, architecture, patch, input_channels, num_classes), "peak_bytes": peak}


def benchmark_memory(names: Sequence[str], dims: Sequence[int], fit: bool = False, progress=print) -> dict:
    """Measured training peaks of PlainConvUNet and `names` at CHECK_PATCHES, each with the registered
    model's estimate and its error; with `fit`, also at FIT_PATCHES, and the models fitted on those
    (to store in the registry) give the estimates instead."""
    from nnunet_ext.registry import get_architecture

    kinds = (("fit", FIT_PATCHES), ("check", CHECK_PATCHES)) if fit else (("check", CHECK_PATCHES),)
    rows, models = [], {}
    for dim in dims:
        for name in (REFERENCE, *names):
            if name != REFERENCE and dim not in get_architecture(name).dims:
                continue
            measured = []
            for kind, patches in kinds:
                for patch in patches[dim]:
                    progress(f"  {name} {dim}D, patch {patch} ({kind}) ...")
                    measured.append({**measure(name, patch), "dim": dim, "kind": kind})
            if fit:
                model = MemoryModel.fit([(r["footprint"], r["batch"], r["peak_bytes"])
                                         for r in measured if r["kind"] == "fit"])
            else:
                model = PLAIN_UNET[dim] if name == REFERENCE else get_architecture(name).memory[dim]
            models[(name, dim)] = model
            for r in measured:
                r["estimate_bytes"] = model.estimate(r["footprint"], r["batch"])
                r["error"] = r["estimate_bytes"] / r["peak_bytes"] - 1
            rows += measured
    return {"rows": rows, "models": models, "fitted": fit, "tolerance": TOLERANCE}
