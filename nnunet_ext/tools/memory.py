"""A network's training memory at a patch size, measured exactly, and the footprint the memory models
(nnunet_ext.memory_models) scale with; `nnunet-ext plan` and `nnunet-ext benchmark-memory` use both.

Measured (`training_peak_bytes`): the peak of the bytes held by tensors allocated during one training
step (forward with deep supervision, then backward): activations saved for the backward pass,
temporaries and gradients; the weights and the input batch are not counted. A dispatch mode sees every
tensor an operator allocates and when its storage is freed, so the figure is exact and the same on any
machine, unlike the resident set, which depends on the allocator. It is the CPU counterpart of CUDA's
`max_memory_allocated` over a step (which also holds the weights, the input and cuDNN workspaces).

Footprint (`footprint`): nnU-Net's units, the parameters, and the extra activation elements a forward
pass of one sample forms, counted here for every network alike: attention matrices (each
scaled_dot_product_attention call's batch x heads x queries x keys, and any softmax's output) and
KAN spline bases (each b_spline_bases call's output). The network is built and run on the meta
device, so no data is allocated and a footprint costs well under a second at any patch size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nnunet_ext.memory_models import FIT_BATCH, REFERENCE, Footprint
from nnunet_ext.ops.b_spline import b_spline_bases
from nnunet_ext.ops.selective_scan import pytorch_paths_only
from nnunet_ext.registry import get_architecture
from nnunet_ext.topology import Topology

# Patches the models are fitted on and checked on (isotropic spacing; nnU-Net plans the topology).
FIT_PATCHES = {2: ((64, 64), (96, 160), (128, 128), (160, 160), (256, 256), (320, 320)),
               3: ((32, 32, 32), (48, 48, 48), (64, 64, 64), (32, 64, 64))}
CHECK_PATCHES = {2: ((192, 192), (224, 224), (128, 256)), 3: ((40, 64, 48), (56, 56, 56))}
TOLERANCE = 0.2  # the estimate must be within 20% of the measured peak on CHECK_PATCHES
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


class LiveTensorBytes(TorchDispatchMode):
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
    with LiveTensorBytes(existing=[*net.parameters(), *net.buffers(), x]) as counter:
        outputs = net(x)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
        sum(o.float().mean() for o in outputs).backward()
        del outputs
    return counter.peak


class _ExtraActivations(TorchFunctionMode):
    """Counts the elements of the activations the memory model treats apart (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:  # (..., queries, width) and (..., keys, width)
            query, key = (kwargs[name] if name in kwargs else args[i] for i, name in enumerate(("query", "key")))
            self.elements += query.shape[:-1].numel() * key.shape[-2]
        elif func in _SOFTMAX or func is b_spline_bases:
            self.elements += out.numel()
        return out


def extra_elements(net: torch.nn.Module, input_channels: int, patch_size: Sequence[int]) -> int:
    """The extra activation elements a forward pass of one sample of `patch_size` forms in `net`
    (in training mode: a network in evaluation mode checks its input's values, which meta tensors lack),
    on the PyTorch paths, as `measure` measures: the compiled CPU loops form KAN bases a few rows at a time."""
    device = next(net.parameters()).device
    x = torch.empty(1, input_channels, *patch_size, device=device)
    with torch.no_grad(), pytorch_paths_only(), _ExtraActivations() as counter:
        net.train()(x)
    return counter.elements


def units(architecture: dict, patch_size: Sequence[int], input_channels: int, num_classes: int) -> int:
    """nnU-Net's measure of a patch: its PlainConvUNet's summed feature-map size on the plans
    `architecture` entry's topology, as nnU-Net's planner computes it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plain = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                   architecture["_kw_requires_import"], input_channels, num_classes,
                                   allow_init=False)
    return int(plain.compute_conv_feature_map_size(list(patch_size)))


def footprint(name: str, architecture: dict, patch_size: Sequence[int], input_channels: int,
              num_classes: int) -> Footprint:
    """The footprint of `name` (a registered architecture, or REFERENCE) on the plans `architecture`
    entry at `patch_size`. Raises ConfigurationError where the architecture cannot take that topology."""
    with torch.device("meta"):
        net = build(name, architecture, patch_size, input_channels, num_classes)
    return Footprint(units=units(architecture, patch_size, input_channels, num_classes),
                     extra_elements=extra_elements(net, input_channels, patch_size),
                     parameters=sum(p.numel() for p in net.parameters()))


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
    """PlainConvUNet (`REFERENCE`), as nnU-Net builds it, or a registered architecture on a plans
    `architecture` entry, with deep supervision (as it trains)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if name == REFERENCE:
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      architecture["_kw_requires_import"], input_channels, num_classes,
                                      allow_init=True, deep_supervision=True)
    return get_architecture(name).build(Topology.from_entry(architecture, patch_size), input_channels, num_classes)


def measure(name: str, patch_size: Sequence[int], batch: int = FIT_BATCH, input_channels: int = 1,
            num_classes: int = 3) -> dict:
    """Footprint and measured training peak of `name` on the default plans topology for `patch_size`,
    with Mamba's ops, U-KAN's bases and MedNeXt's pointwise MLP on their PyTorch paths: a GPU without mamba_ssm
    runs those, and they keep more for backward than the CPU paths or mamba_ssm's kernels, so plans fit either
    way."""
    torch.manual_seed(0)
    patch, architecture = default_plans_architecture(patch_size)
    net = build(name, architecture, patch, input_channels, num_classes)
    x = torch.randn(batch, input_channels, *patch)
    with pytorch_paths_only():
        peak = training_peak_bytes(net, x)
    return {"network": name, "patch_size": patch, "batch": batch,
            "footprint": footprint(name, architecture, patch, input_channels, num_classes), "peak_bytes": peak}
