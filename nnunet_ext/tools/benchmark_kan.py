"""`nnunet-ext benchmark-kan`: KANLinear at U-KAN's token shapes, forward and backward, against the same
recursion under plain autograd (efficient-kan's way) and a naive per-feature loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnunet_ext.tools.measure import isolated, timed_with_peak
from nnunet_ext.tools.options import add_device_options
from nnunet_ext.tools.report import implementation_table, progress, text_table


@dataclass(frozen=True)
class KANShape:
    name: str
    rows: int  # batch x tokens
    features: int


# U-KAN's tokenized stages at the official widths: 2D 256x256 inputs, batch 8, 320 channels at
# 1/16 and 512 at 1/32; 3D 128^3 inputs, batch 2, 320 channels at 1/16.
KAN_SHAPES = (KANShape("2D tokens at 1/16, 8 x 16x16", 2048, 320),
              KANShape("2D tokens at 1/32, 8 x 8x8", 512, 512),
              KANShape("3D tokens at 1/16, 2 x 8x8x8", 1024, 320))

KAN_IMPLEMENTATIONS = ("ours", "recursion", "per feature")


def _kan_linear_forward(name: str, layer, x):
    from nnunet_ext.ops.b_spline import cox_de_boor
    from nnunet_ext.ops.reference import kan_linear_per_feature

    if name == "ours":
        return layer(x)
    if name == "recursion":  # efficient-kan's way: the same recursion, autograd through every step
        bases = cox_de_boor(x, layer.grid, layer.spline_order)
        return (F.linear(F.silu(x), layer.base_weight)
                + F.linear(bases.flatten(1), layer.scaled_spline_weight.flatten(1)))
    return kan_linear_per_feature(x, layer.base_weight, layer.scaled_spline_weight, layer.grid, layer.spline_order)


def _measure_kan(shape: KANShape, implementation: str, device: str, repeats: int) -> dict:
    from nnunet_ext.blocks.kan import KANLinear

    dev = torch.device(device)
    torch.manual_seed(0)
    layer = KANLinear(shape.features, shape.features).to(dev)
    x = torch.randn(shape.rows, shape.features, device=dev, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        _kan_linear_forward(implementation, layer, x).square().mean().backward()

    seconds, peak = timed_with_peak(step, repeats, dev)
    return {"seconds": seconds, "peak_bytes": peak}


def benchmark_kan_linear(shapes=KAN_SHAPES, repeats: int = 3, device: str = "cpu", progress=print) -> list[dict]:
    """Forward+backward seconds and peak memory of KANLinear (ours), of the same recursion under
    plain autograd, and of the naive per-feature loop (one run), per shape."""
    rows = []
    for shape in shapes:
        row = {"shape": shape.name, "input": f"{shape.rows}x{shape.features}"}
        for name in KAN_IMPLEMENTATIONS:
            progress(f"  {shape.name}: {name} ...")
            row[name] = isolated(_measure_kan, shape, name, device, 1 if name == "per feature" else repeats,
                                 device=device)
        rows.append(row)
    return rows


def add_arguments(parser) -> None:
    add_device_options(parser)


def main(args) -> int:
    rows = benchmark_kan_linear(KAN_SHAPES, args.repeats, args.device, progress=progress)
    print(f"KANLinear (grid 5, order 3), forward+backward, float32, {args.device} (median of {args.repeats}; "
          "per feature: 1 run). recursion: the same bases under plain autograd (efficient-kan's way).")
    print(text_table(implementation_table(rows, "KANLinear", KAN_IMPLEMENTATIONS, args.device)))
    return 0
