"""The `nnunet-ext` command. Each subcommand is a module of nnunet_ext.tools with `add_arguments(parser)`
and `main(args)`; only the one that runs is imported, so `nnunet-ext env` (in a shell profile) stays
quick however heavy the benchmarks' imports are."""

from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_ext.tools.report import error_text

# command -> (module in nnunet_ext.tools, one line of help)
COMMANDS = {
    "env": ("env", 'print the export line for nnUNet_extTrainer; use: eval "$(nnunet-ext env)"'),
    "list": ("list", "architectures, trainers, presets, 2D/3D support and optional fast paths"),
    "doctor": ("doctor", "check nnU-Net, its variables, trainer discovery, torch and extras (and a dataset's plans)"),
    "make-dataset": ("make_dataset", "write a tiny synthetic nnU-Net raw dataset"),
    "demo": ("demo", "synthetic dataset -> plan -> train (short) -> predict -> Dice, on CPU"),
    "real-data": ("real_data", "small real images from packages on the index -> nnU-Net datasets -> train every "
                               "architecture and nnU-Net's default (short CPU schedule) -> compare (docs/results.md)"),
    "benchmark": ("benchmark", "parameters, FLOPs, training-step and inference time, peak memory of architectures vs "
                               "nnU-Net's own network (and Primus-B on 3D plans), at a dataset's plans (no "
                               "preprocessed data needed); prints a table, writes CSV, JSON and a PNG chart"),
    "compare": ("compare", "validation Dice of trainers per fold and class from nnUNet_results, mean ± std over "
                           "folds, paired Wilcoxon test against a baseline; prints a table, writes markdown, CSV and "
                           "a PNG plot"),
    "import-official": ("import_official", "a checkpoint of an architecture's official code -> a fold folder of its "
                                           "official preset's trainer, for nnUNetv2_predict and -pretrained_weights "
                                           "(read without unpickling code; refused unless every tensor fits)"),
    "upkern": ("upkern", "MedNeXt's UpKern: a trained kernel-3 MedNeXt checkpoint -> the weights its kernel-5 twin "
                         "starts from (nnUNetv2_train -pretrained_weights), kernels resized by interpolation"),
    "plan": ("plan", "plan patch and batch size for one architecture within a GPU memory target: nnU-Net's planner "
                     "with the architecture's memory model; writes nnUNetPlans_<Arch>_<GB>G.json next to nnU-Net's "
                     "plans, for nnUNetv2_train -p"),
    "profile": ("profile_step", "where a training step and a patch prediction spend their time, per operator "
                                "(torch.profiler), at a dataset's plans: each operator's share of the wall time"),
    "benchmark-memory": ("benchmark_memory", "measured training memory of every architecture and PlainConvUNet at "
                                             "the patches the memory models are fitted on and at others, against "
                                             "the models' estimates; --fit --write makes and stores the models"),
    "gpu-check": ("gpu_check", "the GPU acceptance run: every architecture's fp16 training steps, compiled and "
                               "eager, step time and peak memory against nnU-Net's network and the memory model, "
                               "the selective scan against float64; writes markdown and JSON (--device cpu --quick "
                               "in CI)"),
    "benchmark-scan": ("benchmark_scan", "selective scan vs a sequential loop and mambapy's pscan, at LKM-UNet's "
                                         "window shapes"),
    "benchmark-dlka": ("benchmark_dlka", "deformable convolution vs torchvision (2D) and an unfused reference, and "
                                         "D-LKA Net's size at the paper's configuration"),
    "benchmark-kan": ("benchmark_kan", "KANLinear vs the same recursion under plain autograd and a naive "
                                       "per-feature loop, at U-KAN's token shapes"),
}


def command_module(command: str):
    return importlib.import_module(f"nnunet_ext.tools.{COMMANDS[command][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its help; the arguments of `command` only (the one that runs)."""
    parser = argparse.ArgumentParser(prog="nnunet-ext", description="Recent segmentation architectures as "
                                     "trainers for stock nnU-Net v2: setup checks, benchmarks, comparison, planning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == command:
            command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return command_module(args.command).main(args)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        print(f"nnunet-ext {args.command}: error: {error_text(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
