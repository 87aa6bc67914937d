"""Speed and memory, measured against a reference in the same run (`nnunet-ext benchmark*`).

Timings are the median of `repeats` forward+backward passes after one warm-up. Peak memory is
max_memory_allocated on CUDA; on CPU each model runs in a fresh process and we report how much its
peak resident set grew over the forward+backward passes (weights and imports excluded).
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.ops.reference import selective_scan_loop


def timed(step, repeats: int, device: torch.device) -> float:
    """Median seconds of `step()` over `repeats` runs, after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- scan
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


def benchmark_scan(shapes=SCAN_SHAPES, repeats: int = 3, device: str = "cpu", progress=print) -> list[dict]:
    """Forward+backward seconds of our scan, the sequential loop and mambapy's pscan, per shape."""
    device = torch.device(device)
    implementations = {"ours": lambda t: selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"]),
                       "loop": lambda t: selective_scan_loop(t["u"], t["delta"], t["A"], t["B"], t["C"])[0],
                       "mambapy": lambda t: mambapy_selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"])}
    rows = []
    for shape in shapes:
        tensors = scan_inputs(shape, device)
        row = {"shape": shape.name, "rows x d_inner x length x d_state":
               f"{shape.rows}x{shape.d_inner}x{shape.length}x{shape.d_state}"}
        for name, fn in implementations.items():
            progress(f"  scan {shape.name}: {name} ...")
            if name == "mambapy" and not _importable("mambapy"):
                row[name] = None  # reported as missing, with the install command
                continue

            def step():
                for t in tensors.values():
                    t.grad = None
                fn(tensors).square().mean().backward()
            row[name] = timed(step, 1 if name == "loop" else repeats, device)
        rows.append(row)
    return rows


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------ networks
def reference_network(cm, input_channels: int, num_heads: int):
    """nnU-Net's own network for these plans (PlainConvUNet or ResEnc), built as nnU-Net builds it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, input_channels, num_heads,
                                  allow_init=True, deep_supervision=True)


def _measure_network(name: str, dataset, configuration: str, plans: str, device: str, repeats: int) -> dict:
    """Runs in its own process on CPU so that its peak memory is its own."""
    from nnunet_ext.plans_io import load_configuration
    from nnunet_ext.registry import get_architecture
    from nnunet_ext.topology import Topology

    torch.manual_seed(0)
    cm, input_channels, heads = load_configuration(dataset, configuration, plans)
    net = (reference_network(cm, input_channels, heads) if name == "nnU-Net" else
           get_architecture(name).build(Topology.from_plans(cm), input_channels, heads))
    dev = torch.device(device)
    net = net.to(dev)
    x = torch.randn(cm.batch_size, input_channels, *cm.patch_size, device=dev)

    def step():
        net.zero_grad(set_to_none=True)
        outputs = net(x)
        sum(o.float().mean() for o in outputs).backward()

    before = _peak_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = timed(step, repeats, dev)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes() - before
    return {"network": name, "parameters": sum(p.numel() for p in net.parameters()), "seconds": seconds,
            "peak_bytes": peak, "patch_size": tuple(cm.patch_size), "batch_size": cm.batch_size}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def benchmark_networks(architectures, dataset, configuration: str, plans: str = "nnUNetPlans",
                       device: str = "cpu", repeats: int = 3, progress=print) -> list[dict]:
    """Training-step time and peak memory of each architecture and of nnU-Net's own network."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for name in ["nnU-Net", *architectures]:
        progress(f"  {name}: forward+backward x{repeats + 1} at the plans' patch and batch size ...")
        args = (name, dataset, configuration, plans, device, repeats)
        if device == "cpu":
            with context.Pool(1) as pool:
                rows.append(pool.apply(_measure_network, args))
        else:
            rows.append(_measure_network(*args))
    return rows


def ratio(value, reference) -> str:
    return "-" if value is None or reference in (None, 0) else f"{value / reference:.2f}x"


def megabytes(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MB"


def seconds(s) -> str:
    return "-" if s is None or math.isnan(s) else f"{s:.3f} s"
