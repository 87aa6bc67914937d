"""Regions that compute in float32 whatever autocast says."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device | str):
    """A context in which autocast leaves the computation alone (its dtype is the inputs').

    The meta device has no autocast, so there is nothing to switch off: networks run there without
    data to count their activations (nnunet_ext.tools.memory)."""
    device_type = torch.device(device).type
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 if it is in a narrower float type (fp16, bf16 under autocast); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
