"""Operators in plain PyTorch that run on any device, with optional CUDA fast paths."""

from nnunet_ext.ops.causal_conv import causal_conv1d_silu
from nnunet_ext.ops.selective_scan import selective_scan_fn

__all__ = ["causal_conv1d_silu", "selective_scan_fn"]
