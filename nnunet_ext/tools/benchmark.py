"""`nnunet-ext benchmark`: what each architecture costs on a dataset's plans, against nnU-Net's own networks.

Every network is built from the same plans, at their patch and batch size, each measured in a fresh
process (nnunet_ext.tools.measure): parameters, forward FLOPs per patch (torch's FlopCounterMode, two
FLOPs per multiply-accumulate), the training step's and one patch's inference time, and peak memory,
each also as a ratio to nnU-Net's network from these plans. nnU-Net's network is timed first and last and its
times averaged; with `--rounds N` all of it runs N times over and every figure and ratio is the median of the
rounds', each ratio against its own round's reference: a shared machine's slow or quick minutes move single runs
by a tenth or more.
"""

from __future__ import annotations

import statistics

import torch

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunet_ext.registry import get_architecture
from nnunet_ext.tools.measure import MEMORY_MEASURES, isolated, timed, timed_with_peak
from nnunet_ext.tools.options import (add_architectures_option, add_dataset_options, add_device_options,
                                      add_output_option, architectures, positive_int)
from nnunet_ext.tools.plans_io import load_configuration
from nnunet_ext.tools.report import (figure, megabytes, memory_label, output_paths, progress, ratio, records, seconds,
                                     text_table, write_csv, write_json, written)
from nnunet_ext.topology import Topology


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
    not counted. Attention is counted as its two products (scaled_dot_product_attention's math
    backend): the counter has no formula for the fused CPU kernel, which it would miss entirely."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def mixed_precision(device: torch.device):
    """nnU-Net trains and predicts under autocast on CUDA and in float32 elsewhere; so do we."""
    return torch.autocast(device.type, enabled=device.type == "cuda")


def network_on_plans(name: str, dataset, configuration: str, plans: str, device: torch.device):
    """`name` (a registered architecture or one of REFERENCES) built from a dataset's plans on `device`,
    a random batch of the plans' patch and batch size, and a training step on it (forward with deep
    supervision, backward; under autocast on CUDA, as nnU-Net trains)."""
    torch.manual_seed(0)
    cm, input_channels, heads = load_configuration(dataset, configuration, plans)
    net = (REFERENCES[name](cm, input_channels, heads) if name in REFERENCES else
           get_architecture(name).build(Topology.from_plans(cm), input_channels, heads)).to(device)
    x = torch.randn(cm.batch_size, input_channels, *cm.patch_size, device=device)

    def train_step():
        net.zero_grad(set_to_none=True)
        with mixed_precision(device):
            outputs = net(x)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs  # Primus: no deep supervision
        sum(o.float().mean() for o in outputs).backward()

    return net, x, train_step


def patch_prediction(net: torch.nn.Module, x: torch.Tensor, device: torch.device):
    """One patch of sliding-window inference as nnU-Net's predictor runs it: evaluation mode, no deep
    supervision, autocast on CUDA. Switches `net` to evaluation; returns the call."""
    net.eval()
    if hasattr(net, "decoder"):
        net.decoder.deep_supervision = False

    def predict():
        with torch.inference_mode(), mixed_precision(device):
            return net(x[:1])

    return predict


def _measure_network(name: str, dataset, configuration: str, plans: str, device: str, repeats: int) -> dict:
    dev = torch.device(device)
    net, x, train_step = network_on_plans(name, dataset, configuration, plans, dev)
    train_seconds, peak = timed_with_peak(train_step, repeats, dev)
    flops = forward_flops(net, x[:1])
    inference_seconds = timed(patch_prediction(net, x, dev), repeats, dev)
    return {"network": name, "parameters": sum(p.numel() for p in net.parameters()), "flops": flops,
            "train_seconds": train_seconds, "inference_seconds": inference_seconds, "peak_bytes": peak}


# The figures measured per network; each also comes as a ratio to nnU-Net's network (`<figure>_vs_nnunet`).
NETWORK_FIGURES = {"parameters": "parameters", "flops": "GFLOPs/patch", "train_seconds": "train step",
                   "inference_seconds": "inference/patch", "peak_bytes": "peak memory"}
# Arithmetic throughput (forward FLOPs per second) relative to nnU-Net's network's, in training and in
# inference: below 1, a network spends more time than its counted arithmetic explains (work the FLOP
# counter does not see, such as sampling, spline bases or the scan, or slow kernels).
THROUGHPUTS = {"train_throughput_vs_nnunet": ("train_seconds", "throughput, training"),
               "inference_throughput_vs_nnunet": ("inference_seconds", "throughput, inference")}


# The reference's figures measured at both ends of a round and averaged.
REFERENCE_TIMES = ("train_seconds", "inference_seconds")


def _ratios(rows: list[dict]) -> list[dict]:
    """Each row's figures as ratios to the first row's (nnU-Net's network), and its throughputs."""
    for row in rows:
        for key in NETWORK_FIGURES:
            row[f"{key}_vs_nnunet"] = row[key] / rows[0][key] if rows[0][key] else None
        for key, (time_key, _) in THROUGHPUTS.items():
            row[key] = (row["flops_vs_nnunet"] / row[f"{time_key}_vs_nnunet"]
                        if row["flops_vs_nnunet"] and row[f"{time_key}_vs_nnunet"] else None)
    return rows


def _median_row(measured: tuple[dict, ...]) -> dict:
    """One network's rounds as one row: each figure and each ratio the median of the rounds' (a ratio is
    the median of the rounds' ratios, each against the reference of its own round)."""
    row = dict(measured[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and all(m[key] is not None for m in measured):
            row[key] = statistics.median(m[key] for m in measured)
    return row


def benchmark_networks(names, dataset, configuration: str, plans: str = "nnUNetPlans",
                       device: str = "cpu", repeats: int = 3, progress=print, rounds: int = 1) -> dict:
    """Parameters, forward FLOPs per patch, training-step time, one-patch inference time and peak
    memory of each architecture and of the references (nnU-Net's own network first, then Primus
    where the plans allow it), at the plans' patch and batch size; nnU-Net's network is timed again at the
    end (`REFERENCE_TIMES`). With `rounds` > 1 all of it is repeated and every figure and ratio is the median
    of the rounds'. Needs the plans only, not preprocessed data. Returns the report: the setting, one
    row per network with each figure and its ratio to nnU-Net's network, every round's rows, and notes on
    references left out."""
    cm = load_configuration(dataset, configuration, plans)[0]
    notes = [f"Primus-B left out: {why}."] if (why := primus_unsupported(cm)) else []
    names = [n for n in REFERENCES if not (n == "Primus-B" and why)] + list(names)
    # nnU-Net's network once more at the end: every ratio divides by its times, which a quick or slow minute of a
    # shared machine would otherwise set alone; its times are the mean of both measurements.
    runs = names + names[:1]
    measured_rounds = []
    for r in range(1, rounds + 1):
        rows = []
        for i, name in enumerate(runs, 1):
            step = f"round {r}/{rounds}, [{i}/{len(runs)}]" if rounds > 1 else f"[{i}/{len(runs)}]"
            again = " again, its times the mean of both" if i == len(runs) else ""
            progress(f"  {step} {name}{again}: {repeats + 1} training steps and {repeats + 1} patch "
                     "predictions at the plans' patch and batch size ...")
            rows.append(isolated(_measure_network, name, dataset, configuration, plans, device, repeats,
                                 device=device))
        last = rows.pop()
        for key in REFERENCE_TIMES:
            rows[0][f"{key}_first"], rows[0][f"{key}_last"] = rows[0][key], last[key]
            rows[0][key] = (rows[0][key] + last[key]) / 2
        measured_rounds.append(_ratios(rows))
    return {"dataset": maybe_convert_to_dataset_name(dataset), "configuration": configuration, "plans": plans,
            "device": device, "repeats": repeats, "rounds": rounds, "patch_size": list(cm.patch_size),
            "batch_size": cm.batch_size, "reference": cm.network_arch_class_name.rsplit(".", 1)[-1],
            "torch": torch.__version__, "memory_measure": MEMORY_MEASURES["cuda" if device == "cuda" else "cpu"],
            "rows": [_median_row(m) for m in zip(*measured_rounds)], "round_rows": measured_rounds, "notes": notes}


def network_table(report: dict) -> list[list[str]]:
    """The report as table rows: each figure, then its ratio to nnU-Net's network; then the throughputs."""
    formats = {"parameters": lambda v: f"{v / 1e6:.2f} M", "flops": lambda v: f"{v / 1e9:.2f}",
               "train_seconds": seconds, "inference_seconds": seconds, "peak_bytes": megabytes}
    header = ["network"]
    for key, label in NETWORK_FIGURES.items():
        header += [memory_label(report["device"]) if key == "peak_bytes" else label, "vs nnU-Net"]
    table = [header + [label for _, label in THROUGHPUTS.values()]]
    for i, r in enumerate(report["rows"]):
        table.append([r["network"]] + [cell for key in NETWORK_FIGURES
                                       for cell in (formats[key](r[key]), ratio(r[f"{key}_vs_nnunet"], 1))]
                     + [_throughput(r[key], [rows[i][key] for rows in report["round_rows"]]) for key in THROUGHPUTS])
    return table


def _throughput(median: float | None, rounds: list[float | None]) -> str:
    """A throughput ratio, with the range of the rounds' after it where there were several."""
    if median is None:
        return "-"
    if len(rounds) == 1 or None in rounds:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def network_chart(report: dict, path) -> None:
    """A PNG with one panel per figure: each network's ratio to nnU-Net's network, as a bar from 1x on
    a log scale (so halving and doubling look alike)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


def add_arguments(parser) -> None:
    add_dataset_options(parser)
    add_architectures_option(parser)
    add_device_options(parser)
    add_output_option(parser)
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="measure every network this many times over, each round with its own reference "
                             "times, and report the medians of the rounds' figures and ratios (default: 1)")


def main(args) -> int:
    report = benchmark_networks(architectures(args), args.dataset, args.configuration, args.plans, args.device,
                                args.repeats, progress=progress, rounds=args.rounds)
    rounds = f"; the median of {args.rounds} rounds (their range)" if args.rounds > 1 else ""
    print(f"{report['dataset']} {args.configuration} ({args.plans}): patch {tuple(report['patch_size'])}, batch "
          f"{report['batch_size']}, {args.device}; median of {args.repeats} runs{rounds}; nnU-Net: its "
          f"{report['reference']} from these plans, timed first and last in each round (the mean)")
    print(text_table(network_table(report)))
    for note in report["notes"]:
        print(note)
    paths = output_paths(args.output, f"benchmark_{report['dataset']}_{args.plans}_{args.configuration}_{args.device}",
                         ("csv", "json", "png"))
    write_csv(paths["csv"], records(report, ("dataset", "configuration", "plans", "device")))
    write_json(paths["json"], report)
    network_chart(report, paths["png"])
    written(paths)
    return 0
