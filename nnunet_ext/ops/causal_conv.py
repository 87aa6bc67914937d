"""Mamba's causal depthwise convolution with its SiLU, the op mamba_ssm takes from causal-conv1d."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_ext.ops.cpu_kernel import CompiledCausalConv, cpu_kernel_available
from nnunet_ext.ops.precision import autocast_off


# torch.compile calls it as it is, like selective_scan_fn: a ctypes call cannot be traced.
@torch.compiler.disable
def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(bias + causal depthwise convolution): x (batch, d, L), weight (d, width), bias (d,) or None.

    Output position t sees inputs t - width + 1 .. t, as mamba_ssm.Mamba's conv1d with padding
    width - 1 cut to L. It computes in float32 and returns x's dtype. CPU tensors take the compiled
    loop of nnunet_ext.ops.cpu_kernel where it is available (in x's layout); everything else runs
    F.conv1d.
    """
    with autocast_off(x.device):
        x32, weight, bias = x.float(), weight.float(), None if bias is None else bias.float()
        if x.device.type == "cpu" and cpu_kernel_available():
            u = CompiledCausalConv.apply(x32, weight, bias)
        else:
            pre = F.conv1d(x32, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])
            u = F.silu(pre[..., :x.shape[-1]])
    return u.to(x.dtype)
