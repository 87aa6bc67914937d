"""`nnunet-ext benchmark-dlka`: the deformable convolution, forward and backward, against torchvision (2D)
and an unfused reference, and D-LKA Net's size at the paper's configuration against the paper's numbers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nnunet_ext.tools.measure import importable, isolated, timed_with_peak
from nnunet_ext.tools.options import add_device_options
from nnunet_ext.tools.report import implementation_table, progress, ratio, text_table


@dataclass(frozen=True)
class DeformShape:
    name: str
    batch: int
    channels: int
    size: tuple[int, ...]
    kernel: int
    dilation: int = 1
    depthwise: bool = False


# D-LKA's deformable convolutions: the 2D depthwise pair at the paper's 2D decoder (96 channels at
# 56x56) and the 3D 3x3x3 convolution at the first D-LKA stages of the Synapse network.
DEFORM_SHAPES = (DeformShape("2D depthwise 5x5", 4, 96, (56, 56), 5, depthwise=True),
                 DeformShape("2D depthwise 7x7 dil. 3", 4, 96, (56, 56), 7, dilation=3, depthwise=True),
                 DeformShape("3D 3x3x3, 32 ch", 2, 32, (32, 32, 32), 3),
                 DeformShape("3D 3x3x3, 64 ch", 2, 64, (16, 32, 32), 3))


def deform_implementations(dim: int) -> dict:
    """The implementations to compare at `dim`: ours, the unfused column-matrix reference and, in 2D,
    torchvision's operator (lazily imported: it is optional)."""
    from nnunet_ext.ops.deform_conv import deform_conv
    from nnunet_ext.ops.reference import deform_conv_unfused

    implementations = {"ours": deform_conv, "unfused": deform_conv_unfused}
    if dim == 2 and importable("torchvision"):
        from torchvision.ops import deform_conv2d

        implementations["torchvision"] = deform_conv2d
    return implementations


def _measure_deform(shape: DeformShape, implementation: str, device: str, repeats: int) -> dict:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    dim, k = len(shape.size), shape.kernel
    x = torch.randn(shape.batch, shape.channels, *shape.size, generator=g)
    weight = torch.randn(shape.channels, 1 if shape.depthwise else shape.channels, *(k,) * dim, generator=g) * 0.1
    offset = torch.randn(shape.batch, dim * k ** dim, *shape.size, generator=g)  # fractional, about a pixel
    x, weight, offset = (t.to(dev).requires_grad_() for t in (x, weight, offset))
    fn = deform_implementations(dim)[implementation]
    padding = shape.dilation * (k - 1) // 2

    def step():
        for t in (x, weight, offset):
            t.grad = None
        fn(x, offset, weight, padding=padding, dilation=shape.dilation).square().mean().backward()

    seconds, peak = timed_with_peak(step, repeats, dev)
    return {"seconds": seconds, "peak_bytes": peak}


def benchmark_deform_conv(shapes=DEFORM_SHAPES, repeats: int = 3, device: str = "cpu", progress=print) -> list[dict]:
    """Forward+backward seconds and peak memory of each deformable convolution implementation, per shape."""
    rows = []
    for shape in shapes:
        row = {"shape": shape.name, "input": "x".join(map(str, (shape.batch, shape.channels, *shape.size)))}
        for name in ("ours", "unfused", "torchvision"):
            if name not in deform_implementations(len(shape.size)):
                row[name] = None  # 3D, or torchvision missing
                continue
            progress(f"  {shape.name}: {name} ...")
            row[name] = isolated(_measure_deform, shape, name, device, repeats, device=device)
        rows.append(row)
    return rows


# The paper's Table (Synapse, 3D): parameters and "GFLOPs" (fvcore's count, i.e. multiply-accumulates).
DLKA_PAPER = {"parameters": 42.35e6, "macs": 66.96e9}


def dlka_paper_comparison() -> list[dict]:
    """D-LKA Net at the paper's Synapse configuration (one 64x128x128 input), as the paper's text
    describes it and as the `official` preset builds the official network, with MACs counted with and without
    the deformable convolutions' own products (fvcore, which the paper used, cannot see the official CUDA
    operator). The preset's parameters leave out the deep-supervision head that the official network lacks."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_ext.blocks.deformable_lka import DeformableConv
    from nnunet_ext.networks.base import deep_supervision_heads
    from nnunet_ext.networks.dlka_net import SYNAPSE_PATCH_SIZE, DLKANet
    from nnunet_ext.registry import ARCHITECTURES

    rows = []
    for name, options in (("paper's text (3/2/3 blocks)", {}),
                          ("ours, official preset", ARCHITECTURES["dlka_net"].presets["official"])):
        net = DLKANet.synapse(**options).eval()
        lacking = deep_supervision_heads(net.state_dict(), 3) if options else []  # the official network's: 3 heads
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 1, *SYNAPSE_PATCH_SIZE))
        counts = counter.get_flop_counts()
        deformable = sum(sum(counts[f"DLKANet.{n}"].values()) - sum(counts[f"DLKANet.{n}.conv_offset"].values())
                         for n, m in net.named_modules() if isinstance(m, DeformableConv))
        total = counter.get_total_flops()
        parameters = sum(p.numel() for k, p in net.named_parameters() if k not in lacking)
        rows.append({"network": name, "parameters": parameters,
                     "macs": total // 2, "macs_without_deformable": (total - deformable) // 2})
    return rows


def add_arguments(parser) -> None:
    add_device_options(parser)


def main(args) -> int:
    rows = benchmark_deform_conv(DEFORM_SHAPES, args.repeats, args.device, progress=progress)
    print(f"Deformable convolution, forward+backward, float32, {args.device} (median of {args.repeats}; "
          "torchvision: 2D only)")
    print(text_table(implementation_table(rows, "deformable convolution", ("ours", "unfused", "torchvision"),
                                           args.device)))

    progress("  D-LKA Net at the paper's Synapse configuration ...")
    table = [["D-LKA Net, Synapse 64x128x128", "parameters", "vs paper", "GMACs", "GMACs without deformable convs",
              "vs paper"]]
    paper = DLKA_PAPER
    table.append(["paper (Azad et al., WACV 2024)", f"{paper['parameters'] / 1e6:.2f} M", "1.00x", "-",
                  f"{paper['macs'] / 1e9:.2f}", "1.00x"])
    for r in dlka_paper_comparison():
        table.append([r["network"], f"{r['parameters'] / 1e6:.2f} M", ratio(r["parameters"], paper["parameters"]),
                      f"{r['macs'] / 1e9:.2f}", f"{r['macs_without_deformable'] / 1e9:.2f}",
                      ratio(r["macs_without_deformable"], paper["macs"])])
    print()
    print(text_table(table))
    return 0
