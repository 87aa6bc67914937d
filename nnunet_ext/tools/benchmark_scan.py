"""`nnunet-ext benchmark-scan`: the selective scan at LKM-UNet's window shapes, forward and backward,
against its own PyTorch path, a sequential loop and mambapy's parallel scan."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.ops.reference import selective_scan_loop
from nnunet_ext.ops.selective_scan import pytorch_paths_only
from nnunet_ext.tools.measure import importable, timed
from nnunet_ext.tools.options import add_device_options
from nnunet_ext.tools.report import progress, ratio, seconds, text_table


@dataclass(frozen=True)
class ScanShape:
    name: str
    rows: int  # batch x windows
    d_inner: int
    length: int
    d_state: int = 16


# LKM-UNet's PiM at the first stage: 32 channels (d_inner 64), paper windows 40x40 and 20x28x24.
SCAN_SHAPES = (ScanShape("2D window 40x40", rows=4, d_inner=64, length=1600),
               ScanShape("3D window 20x28x24", rows=2, d_inner=64, length=13440))


def mambapy_selective_scan(u, delta, A, B, C):
    """The selective scan as mambapy builds it around its Blelloch `pscan` (mambapy/mamba.py)."""
    from mambapy.pscan import pscan

    delta = delta.transpose(1, 2)  # (b, l, d)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
    inputs = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)
    states = pscan(decay, inputs)
    return (states @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


def scan_inputs(shape: ScanShape, device):
    g = torch.Generator().manual_seed(0)
    b, d, l, n = shape.rows, shape.d_inner, shape.length, shape.d_state
    tensors = dict(u=torch.randn(b, d, l, generator=g), delta=F.softplus(torch.randn(b, d, l, generator=g) - 4),
                   A=-torch.arange(1.0, n + 1).repeat(d, 1), B=torch.randn(b, n, l, generator=g),
                   C=torch.randn(b, n, l, generator=g))
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def scan_path(device: str) -> str:
    """Which path selective_scan_fn takes for tensors on `device`, and why not a faster one."""
    from nnunet_ext.ops.cpu_kernel import cpu_kernel_off_reason
    from nnunet_ext.ops.selective_scan import kernels_off_reason

    if device == "cpu":
        reason = cpu_kernel_off_reason()
        return "compiled CPU scan" if reason is None else f"PyTorch scan (compiled CPU scan off: {reason})"
    reason = kernels_off_reason()
    return "mamba_ssm CUDA kernels" if reason is None else f"PyTorch scan (mamba_ssm kernels off: {reason})"


def benchmark_scan(shapes=SCAN_SHAPES, repeats: int = 3, device: str = "cpu", progress=print) -> list[dict]:
    """Forward+backward seconds per shape of our scan (the path selective_scan_fn takes), its PyTorch
    path, the sequential loop and mambapy's pscan."""
    device = torch.device(device)

    def pytorch(t):
        with pytorch_paths_only():
            return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"])

    implementations = {"ours": lambda t: selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"]),
                       "pytorch": pytorch,
                       "loop": lambda t: selective_scan_loop(t["u"], t["delta"], t["A"], t["B"], t["C"])[0],
                       "mambapy": lambda t: mambapy_selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"])}
    rows = []
    for shape in shapes:
        tensors = scan_inputs(shape, device)
        row = {"shape": shape.name, "rows x d_inner x length x d_state":
               f"{shape.rows}x{shape.d_inner}x{shape.length}x{shape.d_state}"}
        for name, fn in implementations.items():
            progress(f"  scan {shape.name}: {name} ...")
            if name == "mambapy" and not importable("mambapy"):
                row[name] = None  # reported as missing, with the install command
                continue

            def step():
                for t in tensors.values():
                    t.grad = None
                fn(tensors).square().mean().backward()
            row[name] = timed(step, 1 if name == "loop" else repeats, device)
        rows.append(row)
    return rows


def add_arguments(parser) -> None:
    add_device_options(parser)


def main(args) -> int:
    rows = benchmark_scan(repeats=args.repeats, device=args.device, progress=progress)
    table = [["shape", "rows x d_inner x length x d_state", "ours", "PyTorch path", "sequential loop",
              "mambapy pscan", "PyTorch / ours", "loop / ours", "mambapy / ours"]]
    for r in rows:
        table.append([r["shape"], r["rows x d_inner x length x d_state"],
                      *(seconds(r[k]) for k in ("ours", "pytorch", "loop", "mambapy")),
                      *(ratio(r[k], r["ours"]) for k in ("pytorch", "loop", "mambapy"))])
    print(f"Selective scan, forward+backward, float32, {args.device} (median of {args.repeats}; loop: 1 run); "
          f"ours: {scan_path(args.device)}")
    print(text_table(table))
    if any(r["mambapy"] is None for r in rows):
        print("mambapy is not installed: pip install mambapy (or nnunet-ext[bench]) to compare with its pscan.")
    return 0
