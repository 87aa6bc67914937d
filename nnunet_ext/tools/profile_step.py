"""`nnunet-ext profile`: where a network's training step and inference patch spend their time.

torch.profiler records one training step (forward with deep supervision, backward) and one patch
prediction at the plans' patch and batch size, after a warm-up of each. Each operator's self time
(what it spends outside the operators it calls; device time on CUDA) is its share of the step's wall
time; autograd functions of our own (the compiled CPU Mamba loops: CompiledScan and its backward)
are rows like operators, and what nothing recorded accounts for (Python between operators) is a row
of its own. The rows show where the FLOP counter of `nnunet-ext benchmark` is blind: elementwise work
(spline bases, gates), gathers and sampling, the scan, layout copies.
"""

from __future__ import annotations

import time

import torch

from nnunet_ext.tools.benchmark import network_on_plans, patch_prediction
from nnunet_ext.tools.options import (add_architectures_option, add_dataset_options, add_output_option,
                                      architectures, available_device)
from nnunet_ext.tools.report import markdown_table, output_paths, progress, text_table, written

OUTSIDE = "(outside operators: Python)"


def profile_call(fn, device: torch.device, top: int) -> dict:
    """Wall seconds of `fn()` and its `top` operators by self time, each with its share of the wall
    time, then what no operator accounts for."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: allocations, one-off kernel selection
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    self_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, e.count, getattr(e, self_time) / 1e6) for e in prof.key_averages()]
    events = sorted((e for e in events if e[2] > 0), key=lambda e: -e[2])
    rows = [{"operation": key, "calls": count, "seconds": seconds, "share": seconds / wall}
            for key, count, seconds in events[:top]]
    if device.type == "cpu":  # on CUDA the host's Python overlaps the device's work
        outside = max(0.0, wall - sum(e[2] for e in events))
        rows.append({"operation": OUTSIDE, "calls": 1, "seconds": outside, "share": outside / wall})
    return {"wall_seconds": wall, "operations": rows}


def profile_network(name: str, dataset, configuration: str, plans: str, device: str, top: int) -> dict:
    """The training step's and one patch prediction's profiles of `name` (a registered architecture or
    one of benchmark's references) on a dataset's plans, measured as `nnunet-ext benchmark` times them."""
    dev = torch.device(device)
    net, x, train_step = network_on_plans(name, dataset, configuration, plans, dev)
    training = profile_call(train_step, dev, top)
    return {"network": name, "patch_size": list(x.shape[2:]), "batch_size": x.shape[0], "training": training,
            "inference": profile_call(patch_prediction(net, x, dev), dev, top)}


def tables(profile: dict) -> dict[str, list[list[str]]]:
    """One table per pass: operation, calls, self seconds, share of the wall time."""
    out = {}
    for kind in ("training", "inference"):
        p = profile[kind]
        table = [["operation", "calls", "self time", "share"]]
        table += [[r["operation"], str(r["calls"]), f"{r['seconds'] * 1e3:.1f} ms", f"{100 * r['share']:.1f}%"]
                  for r in p["operations"]]
        out[kind] = table
    return out


def add_arguments(parser) -> None:
    add_dataset_options(parser)
    add_architectures_option(parser)
    parser.add_argument("--device", default="cpu", type=available_device, help="cpu (default), cuda or mps")
    parser.add_argument("--top", type=int, default=12, help="operators listed per pass (default 12)")
    parser.add_argument("--reference", action="store_true", help="profile nnU-Net's network from the plans too")
    add_output_option(parser)


def main(args) -> int:
    if args.top < 1:
        raise ValueError(f"--top {args.top}: list at least one operator")
    names = (["nnU-Net"] if args.reference else []) + architectures(args)
    sections = []
    for name in names:
        progress(f"  {name}: one training step and one patch prediction under torch.profiler ...")
        profile = profile_network(name, args.dataset, args.configuration, args.plans, args.device, args.top)
        for kind, table in tables(profile).items():
            heading = (f"{name}, {kind} ({args.configuration}, patch {tuple(profile['patch_size'])}, batch "
                       f"{profile['batch_size'] if kind == 'training' else 1}, {args.device}): "
                       f"{profile[kind]['wall_seconds']:.3f} s")
            print(heading)
            print(text_table(table))
            print()
            sections.append(f"### {heading}\n\n{markdown_table(table)}\n")
    paths = output_paths(args.output, f"profile_{args.dataset}_{args.plans}_{args.configuration}_{args.device}",
                         ("md",))
    paths["md"].write_text("\n".join(sections))
    written(paths)
    return 0
