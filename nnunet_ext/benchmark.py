"""Speed and memory, measured against a reference in the same run (`nnunet-ext benchmark*`).

Timings are the median of `repeats` runs after one warm-up. Peak memory is max_memory_allocated on
CUDA; on CPU each measurement runs in a fresh process and we report how much its peak resident set
grew over the forward+backward passes (weights and imports excluded). Operations are counted by
torch's FlopCounterMode (two FLOPs per multiply-accumulate).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.ops.selective_scan import pytorch_paths_only
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


def primus_network(cm, input_channels: int, num_heads: int):
    """nnU-Net's Primus-B (Wald et al. 2025, a pure ViT: 8^3 patches, width 792, 12 blocks), built by
    nnU-Net's own nnUNet_Primus_B_Trainer for these plans."""
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_B_Trainer

    return nnUNet_Primus_B_Trainer.build_network_architecture(None, cm, input_channels, num_heads, False)


def primus_unsupported(cm) -> str | None:
    """Why Primus cannot be built on these plans, or None."""
    if len(cm.patch_size) != 3:
        return "Primus is 3D only"
    if any(p % 8 for p in cm.patch_size):
        return f"Primus needs a patch divisible by 8, the plans have {tuple(cm.patch_size)}"
    return None


# The networks every benchmark compares with: nnU-Net's default, and its own transformer.
REFERENCES = {"nnU-Net": reference_network, "Primus-B": primus_network}


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward pass as torch's FlopCounterMode counts them: two per
    multiply-accumulate of convolutions and matrix products; interpolation and elementwise work are
    not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def mixed_precision(device: torch.device):
    """nnU-Net trains and predicts under autocast on CUDA and in float32 elsewhere; so do we."""
    return torch.autocast(device.type, enabled=device.type == "cuda")


def _measure_network(name: str, dataset, configuration: str, plans: str, device: str, repeats: int) -> dict:
    from nnunet_ext.plans_io import load_configuration
    from nnunet_ext.registry import get_architecture
    from nnunet_ext.topology import Topology

    torch.manual_seed(0)
    cm, input_channels, heads = load_configuration(dataset, configuration, plans)
    net = (REFERENCES[name](cm, input_channels, heads) if name in REFERENCES else
           get_architecture(name).build(Topology.from_plans(cm), input_channels, heads))
    dev = torch.device(device)
    net = net.to(dev)
    x = torch.randn(cm.batch_size, input_channels, *cm.patch_size, device=dev)

    def train_step():
        net.zero_grad(set_to_none=True)
        with mixed_precision(dev):
            outputs = net(x)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs  # Primus: no deep supervision
        sum(o.float().mean() for o in outputs).backward()

    train_seconds, peak = timed_with_peak(train_step, repeats, dev)
    flops = forward_flops(net, x[:1])
    # Sliding-window inference as nnU-Net's predictor runs it: one patch, evaluation mode, no deep supervision.
    net.eval()
    if hasattr(net, "decoder"):
        net.decoder.deep_supervision = False
    with torch.inference_mode(), mixed_precision(dev):
        inference_seconds = timed(lambda: net(x[:1]), repeats, dev)
    return {"network": name, "parameters": sum(p.numel() for p in net.parameters()), "flops": flops,
            "train_seconds": train_seconds, "inference_seconds": inference_seconds, "peak_bytes": peak}


def timed_with_peak(step, repeats: int, device: torch.device) -> tuple[float, int]:
    """`timed`, and the peak memory of the runs: max_memory_allocated on CUDA, growth of the peak
    resident set on CPU (meaningful in a fresh process: see `isolated`)."""
    before = _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes() - before
    return seconds, peak


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def isolated(fn, *args, device: str = "cpu"):
    """fn(*args), in a fresh process on CPU so that its peak resident set is its own. A process that
    is killed (the out-of-memory killer, typically) is an error, not a wait for a result that never
    comes, as it would be with multiprocessing.Pool, which quietly replaces dead workers."""
    if device != "cpu":
        return fn(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the process measuring {args[0]} was killed, most likely for lack of memory "
                f"({_total_memory()} here); measure smaller plans (a 2d configuration, or plans from "
                "`nnunet-ext plan` for a smaller memory target) or use a machine with more memory") from None


def _total_memory() -> str:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return f"{pages * page_size / 2 ** 30:.0f} GB of RAM"


# The figures measured per network; each also comes as a ratio to nnU-Net's network (`<figure>_vs_nnunet`).
NETWORK_FIGURES = {"parameters": "parameters", "flops": "GFLOPs/patch", "train_seconds": "train step",
                   "inference_seconds": "inference/patch", "peak_bytes": "peak memory"}

MEMORY_MEASURES = {"cuda": "torch.cuda.max_memory_allocated over the training steps",
                   "cpu": "growth of the peak resident set over the training steps, in a fresh process "
                          "(weights, inputs and imports excluded)"}


def benchmark_networks(architectures, dataset, configuration: str, plans: str = "nnUNetPlans",
                       device: str = "cpu", repeats: int = 3, progress=print) -> dict:
    """Parameters, forward FLOPs per patch, training-step time, one-patch inference time and peak
    memory of each architecture and of the references (nnU-Net's own network first, then Primus
    where the plans allow it), at the plans' patch and batch size. Needs the plans only, not
    preprocessed data. Returns the report: the setting, one row per network with each figure and its
    ratio to nnU-Net's network, and notes on references left out."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ext.plans_io import load_configuration

    cm = load_configuration(dataset, configuration, plans)[0]
    notes = [f"Primus-B left out: {why}."] if (why := primus_unsupported(cm)) else []
    names = [n for n in REFERENCES if not (n == "Primus-B" and why)] + list(architectures)
    rows = []
    for i, name in enumerate(names, 1):
        progress(f"  [{i}/{len(names)}] {name}: {repeats + 1} training steps and {repeats + 1} patch "
                 "predictions at the plans' patch and batch size ...")
        rows.append(isolated(_measure_network, name, dataset, configuration, plans, device, repeats, device=device))
    for row in rows:
        for key in NETWORK_FIGURES:
            row[f"{key}_vs_nnunet"] = row[key] / rows[0][key] if rows[0][key] else None
    return {"dataset": maybe_convert_to_dataset_name(dataset), "configuration": configuration, "plans": plans,
            "device": device, "repeats": repeats, "patch_size": list(cm.patch_size), "batch_size": cm.batch_size,
            "reference": cm.network_arch_class_name.rsplit(".", 1)[-1], "torch": torch.__version__,
            "memory_measure": MEMORY_MEASURES["cuda" if device == "cuda" else "cpu"], "rows": rows, "notes": notes}


def network_table(report: dict) -> list[list[str]]:
    """The report as table rows: each figure, then its ratio to nnU-Net's network."""
    formats = {"parameters": lambda v: f"{v / 1e6:.2f} M", "flops": lambda v: f"{v / 1e9:.2f}",
               "train_seconds": seconds, "inference_seconds": seconds, "peak_bytes": megabytes}
    header = ["network"]
    for key, label in NETWORK_FIGURES.items():
        header += [memory_label(report["device"]) if key == "peak_bytes" else label, "vs nnU-Net"]
    table = [header]
    for r in report["rows"]:
        table.append([r["network"]] + [cell for key in NETWORK_FIGURES
                                       for cell in (formats[key](r[key]), ratio(r[key], report["rows"][0][key]))])
    return table


def network_chart(report: dict, path) -> None:
    """A PNG with one panel per figure: each network's ratio to nnU-Net's network, as a bar from 1x on
    a log scale (so halving and doubling look alike)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from nnunet_ext.report import figure

    rows = report["rows"]
    fig, axes = figure(3.2 * len(NETWORK_FIGURES), 0.45 * len(rows) + 1.6, ncols=len(NETWORK_FIGURES), sharey=True)
    positions = range(len(rows))
    for ax, (key, label) in zip(axes, NETWORK_FIGURES.items()):
        values = [r[f"{key}_vs_nnunet"] or float("nan") for r in rows]
        ax.barh(positions, [v - 1 for v in values], left=1, color=["0.6"] + ["C0"] * (len(rows) - 1))
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(memory_label(report["device"]) if key == "peak_bytes" else label, fontsize=10)
    axes[0].set_yticks(list(positions), [r["network"] for r in rows])
    axes[0].invert_yaxis()
    fig.suptitle(f"{report['dataset']} {report['configuration']} ({report['plans']}), patch "
                 f"{tuple(report['patch_size'])}, batch {report['batch_size']}, {report['device']}: ratio to nnU-Net")
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- deformable convolution
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
    if dim == 2 and _importable("torchvision"):
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
    """D-LKA Net at the paper's Synapse configuration (one 64x128x128 input), as the paper describes
    it and as the official code builds it, with MACs counted with and without the deformable
    convolutions' own products (fvcore, which the paper used, cannot see the official CUDA operator)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_ext.blocks.deformable_lka import DeformableConv
    from nnunet_ext.networks.dlka_net import SYNAPSE_PATCH_SIZE, DLKANet

    rows = []
    for name, options in (("paper's text (3/2/3 blocks)", {}),
                          ("official code (3/3/3 blocks, position embedding)",
                           {"bottleneck_blocks": 3, "position_embedding": True})):
        net = DLKANet.synapse(**options).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 1, *SYNAPSE_PATCH_SIZE))
        counts = counter.get_flop_counts()
        deformable = sum(sum(counts[f"DLKANet.{n}"].values()) - sum(counts[f"DLKANet.{n}.conv_offset"].values())
                         for n, m in net.named_modules() if isinstance(m, DeformableConv))
        total = counter.get_total_flops()
        rows.append({"network": name, "parameters": sum(p.numel() for p in net.parameters()),
                     "macs": total // 2, "macs_without_deformable": (total - deformable) // 2})
    return rows


# ------------------------------------------------------------------------------------ KANLinear
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


def ratio(value, reference) -> str:
    return "-" if value is None or reference in (None, 0) else f"{value / reference:.2f}x"


def memory_label(device: str) -> str:
    """What the peak-memory column measures on `device` (see `timed_with_peak`)."""
    return "peak CUDA memory" if device == "cuda" else "peak RSS growth"


def megabytes(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MB"


def seconds(s) -> str:
    return "-" if s is None or math.isnan(s) else f"{s:.3f} s"
