"""What follows from the plans' layer choices and the number of spatial dimensions, in one place.

Norm and nonlinearity come as nnU-Net's (op, kwargs) pairs, the convention of
dynamic_network_architectures; every block takes them so and builds them here. The functional
convolution and the linear interpolation mode of a dimension are chosen here too, as
`convert_conv_op_to_dim` chooses the dimension from `conv_op`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def norm(norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None, channels: int) -> nn.Module:
    """`norm_op` for `channels` (Identity where there is none)."""
    return norm_op(channels, **(norm_op_kwargs or {})) if norm_op else nn.Identity()


def nonlinearity(nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None) -> nn.Module:
    """`nonlin` (Identity where there is none)."""
    return nonlin(**(nonlin_kwargs or {})) if nonlin else nn.Identity()


def convolution(dim: int) -> Callable:
    """F.conv1d, F.conv2d or F.conv3d."""
    return _CONVOLUTIONS[dim]


def linear_mode(dim: int) -> str:
    """F.interpolate's linear mode for `dim` spatial axes: linear, bilinear or trilinear."""
    return _LINEAR_MODES[dim]
