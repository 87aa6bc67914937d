"""Operators in plain PyTorch that run on any device, with optional CUDA fast paths."""

from nnunet_ext.ops.selective_scan import selective_scan_fn

__all__ = ["selective_scan_fn"]
