"""The `nnunet-ext` command: env, list, doctor, make-dataset, demo, real-data, benchmark, compare,
benchmark-scan, benchmark-dlka, benchmark-kan, plan, benchmark-memory."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from nnunet_ext import discovery
from nnunet_ext.registry import ARCHITECTURES, fast_path_state
from nnunet_ext.report import text_table

SUPPORTED_NNUNET = ("2.8", "2.9")  # [lower, upper) of the nnunetv2 releases this version is tested on


def _message(error: Exception) -> str:
    """An exception's text (KeyError's str() would quote it)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def cmd_env(args) -> int:
    print(discovery.env_line())
    return 0


def cmd_list(args) -> int:
    rows = [["architecture", "trainer", "2D", "3D", "fast paths", "summary"]]
    for arch in ARCHITECTURES.values():
        paths = ", ".join(f"{p.name}: {'off (nnunet-ext doctor says why)' if p.missing() else 'active'}"
                          for p in arch.fast_paths) or "-"
        rows.append([arch.name, arch.trainer, "yes" if 2 in arch.dims else "no", "yes" if 3 in arch.dims else "no",
                     paths, arch.summary])
    print(text_table(rows))
    from nnunet_ext.trainers import SCHEDULES

    print("\nShort-schedule variants (tests, demos, real-data), also of nnUNetTrainer: "
          + ", ".join(f"<trainer>_{s} ({e} epoch(s) x {i} iterations)" for s, (e, i, _) in SCHEDULES.items()))
    return 0


def _doctor_checks(args):
    """Yield (ok, what, fix) triples; ok is True, False (a problem) or None (a note)."""
    version = importlib.metadata.version("nnunetv2")
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    low, high = (tuple(int(p) for p in v.split(".")) for v in SUPPORTED_NNUNET)
    yield (low <= major_minor < high, f"nnunetv2 {version}",
           f"pip install 'nnunetv2>={SUPPORTED_NNUNET[0]},<{SUPPORTED_NNUNET[1]}'")

    import torch

    cuda = torch.cuda.is_available()
    device = f"CUDA ({torch.cuda.get_device_name(0)})" if cuda else "no CUDA GPU: train and predict with -device cpu"
    yield True, f"torch {torch.__version__}, {device}", ""

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        yield (value is not None and Path(value).is_dir(), f"{var}={value or '(unset)'}",
               f"export {var}=/path/to/{var} (an existing folder; see nnU-Net's setting_up_paths.md)")

    yield (discovery.is_configured(), f"{discovery.ENV_VAR}={os.environ.get(discovery.ENV_VAR) or '(unset)'}",
           'eval "$(nnunet-ext env)"')
    if discovery.is_configured():
        import nnunet_ext.trainers as ours

        for arch in ARCHITECTURES.values():
            try:
                found = discovery.find_trainer_like_nnunet(arch.trainer)
                ok = found is getattr(ours, arch.trainer)
                what = f"nnU-Net finds {arch.trainer}" + ("" if ok else f" but as a different class ({found.__module__})")
            except Exception as e:  # any failure of the lookup is what this check reports
                ok, what = False, f"nnU-Net cannot find {arch.trainer}: {type(e).__name__}: {e}"
            yield ok, what, f"another folder on {discovery.ENV_VAR} defines {arch.trainer}, or an import fails there"

    for arch in ARCHITECTURES.values():
        for path in arch.fast_paths:
            missing = path.missing()
            yield None if missing else True, f"{arch.name}: {path.name} {fast_path_state(missing)}", ""

    if args.dataset is not None:
        yield from _doctor_plans(args)


def _doctor_plans(args):
    """Can every architecture be built from this dataset's plans configuration?"""
    from nnunet_ext.plans_io import load_configuration
    from nnunet_ext.topology import Topology

    try:
        cm, num_inputs, num_heads = load_configuration(args.dataset, args.configuration, args.plans)
        topology = Topology.from_plans(cm)
    except Exception as e:  # reported with its message, which says what to do
        yield False, f"plans {args.dataset}/{args.plans}/{args.configuration}: {_message(e)}", ""
        return
    yield True, f"plans {args.plans} '{args.configuration}': {topology.dim}D, {topology.n_stages} stages, " \
                f"patch {list(topology.patch_size)}", ""
    for arch in ARCHITECTURES.values():
        try:
            net = arch.build(topology, num_inputs, num_heads)
            yield True, f"{arch.name} builds: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", ""
        except Exception as e:
            yield False, f"{arch.name} cannot take these plans: {_message(e)}", ""


def cmd_doctor(args) -> int:
    problems = 0
    for ok, what, fix in _doctor_checks(args):
        mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
        print(f"[{mark}] {what}")
        if ok is False:
            problems += 1
            if fix:
                print(f"       fix: {fix}")
    print(f"\n{problems} problem(s) found." if problems else "\nAll checks passed.")
    return 1 if problems else 0


def cmd_make_dataset(args) -> int:
    from nnunet_ext.synthetic import make_dataset

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        print("error: give --raw or set nnUNet_raw", file=sys.stderr)
        return 2
    folder = make_dataset(raw, args.dataset_id, args.name, dim=args.dim, n_cases=args.cases,
                          n_channels=args.channels, n_labels=args.labels, regions=args.regions,
                          ignore_label=args.ignore_label, object_scale=args.object_scale, seed=args.seed,
                          **({"shape": args.shape} if args.shape else {}),
                          **({"spacing": args.spacing} if args.spacing else {}))
    print(folder)
    return 0


DEMO_MARKER = ".nnunet_ext_demo"


def cmd_demo(args) -> int:
    from nnunet_ext.pipeline import Workspace
    from nnunet_ext.synthetic import make_dataset

    root = Path(args.dir).resolve()
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).exists():
        print(f"error: {root} exists and is not an nnunet-ext demo folder; choose another --dir "
              "(the demo replaces its folder's contents).", file=sys.stderr)
        return 2
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / DEMO_MARKER).touch()
    ws, log = Workspace(root), root / "demo.log"
    dataset, cfg, trainer = "999", args.configuration, args.trainer

    def step(text, command, *cmd_args):
        print(f"==> {text}", flush=True)
        ws.run(command, *cmd_args, log=log)

    print(f"==> Writing a tiny synthetic dataset to {ws.raw}", flush=True)
    make_dataset(ws.raw, 999, "Demo")
    step(f"nnUNetv2_plan_and_preprocess -d {dataset} -c {cfg}", "nnUNetv2_plan_and_preprocess",
         "-d", dataset, "-c", cfg, "-np", "2", "--verify_dataset_integrity")
    step(f"nnUNetv2_train {dataset} {cfg} 0 -tr {trainer} -device {args.device}", "nnUNetv2_train",
         dataset, cfg, "0", "-tr", trainer, "-device", args.device)
    predictions = root / "predictions"
    step(f"nnUNetv2_predict -i imagesTs -o {predictions} -d {dataset} -c {cfg} -f 0 -tr {trainer}",
         "nnUNetv2_predict", "-i", ws.raw / "Dataset999_Demo" / "imagesTs", "-o", predictions,
         "-d", dataset, "-c", cfg, "-f", "0", "-tr", trainer, "-device", args.device)
    dice = ws.validation_dice("Dataset999_Demo", trainer, cfg)
    print(f"\nValidation Dice (nnU-Net's evaluation of fold 0): "
          + ", ".join(f"label {k}: {v:.3f}" for k, v in dice.items() if k != "foreground_mean")
          + f"; foreground mean {dice['foreground_mean']:.3f}")
    print(f"Predictions: {predictions}\nFull log: {log}")
    return 0


def cmd_real_data(args) -> int:
    from nnunet_ext import real_data

    unknown = sorted(set(args.datasets) - set(real_data.DATASETS))
    if unknown:
        print(f"error: unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(real_data.DATASETS)}",
              file=sys.stderr)
        return 2
    cache = Path(args.cache).resolve()
    if args.fetch_only:
        from nnunet_ext.pipeline import Workspace

        raw = Workspace(args.dir).raw
        for name in args.datasets:
            print(real_data.write_raw(real_data.DATASETS[name], raw, cache))
        return 0
    trainers = args.trainers or [f"{t}_{real_data.SCHEDULE}" for t in
                                 ("nnUNetTrainer", *(a.trainer for a in ARCHITECTURES.values()))]
    reports = real_data.run(Path(args.dir), args.datasets, trainers, cache, args.folds, args.device,
                            log=lambda text: print(text, flush=True))
    for name, folder in reports.items():
        print(f"{name}: reports in {folder}")
    return 0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_benchmark_scan(args) -> int:
    from nnunet_ext import benchmark as bm

    rows = bm.benchmark_scan(repeats=args.repeats, device=args.device, progress=_progress)
    table = [["shape", "rows x d_inner x length x d_state", "ours", "PyTorch path", "sequential loop",
              "mambapy pscan", "PyTorch / ours", "loop / ours", "mambapy / ours"]]
    for r in rows:
        table.append([r["shape"], r["rows x d_inner x length x d_state"],
                      *(bm.seconds(r[k]) for k in ("ours", "pytorch", "loop", "mambapy")),
                      *(bm.ratio(r[k], r["ours"]) for k in ("pytorch", "loop", "mambapy"))])
    print(f"Selective scan, forward+backward, float32, {args.device} (median of {args.repeats}; loop: 1 run); "
          f"ours: {bm.scan_path(args.device)}")
    print(text_table(table))
    if any(r["mambapy"] is None for r in rows):
        print("mambapy is not installed: pip install mambapy (or nnunet-ext[bench]) to compare with its pscan.")
    return 0


def _field(row: dict, implementation: str, key: str):
    """One measurement of a benchmark row, None where the implementation did not run."""
    return None if row[implementation] is None else row[implementation][key]


def _implementation_table(rows: list[dict], first: str, names: tuple[str, ...], device: str) -> list[list[str]]:
    """Seconds per implementation, their ratios to the first, and peak memory, one row per shape."""
    from nnunet_ext import benchmark as bm

    table = [[first, "input", *names, *(f"{n} / {names[0]}" for n in names[1:]),
              *(f"{bm.memory_label(device)}: {n}" if i == 0 else n for i, n in enumerate(names))]]
    for r in rows:
        table.append([r["shape"], r["input"], *(bm.seconds(_field(r, n, "seconds")) for n in names),
                      *(bm.ratio(_field(r, n, "seconds"), r[names[0]]["seconds"]) for n in names[1:]),
                      *("-" if _field(r, n, "peak_bytes") is None else bm.megabytes(_field(r, n, "peak_bytes"))
                        for n in names)])
    return table


def cmd_benchmark_kan(args) -> int:
    from nnunet_ext import benchmark as bm

    rows = bm.benchmark_kan_linear(bm.KAN_SHAPES, args.repeats, args.device, progress=_progress)
    print(f"KANLinear (grid 5, order 3), forward+backward, float32, {args.device} (median of {args.repeats}; "
          "per feature: 1 run). recursion: the same bases under plain autograd (efficient-kan's way).")
    print(text_table(_implementation_table(rows, "KANLinear", bm.KAN_IMPLEMENTATIONS, args.device)))
    return 0


def cmd_benchmark_dlka(args) -> int:
    from nnunet_ext import benchmark as bm

    rows = bm.benchmark_deform_conv(bm.DEFORM_SHAPES, args.repeats, args.device, progress=_progress)
    print(f"Deformable convolution, forward+backward, float32, {args.device} (median of {args.repeats}; "
          "torchvision: 2D only)")
    print(text_table(_implementation_table(rows, "deformable convolution", ("ours", "unfused", "torchvision"),
                                           args.device)))

    _progress("  D-LKA Net at the paper's Synapse configuration ...")
    table = [["D-LKA Net, Synapse 64x128x128", "parameters", "vs paper", "GMACs", "GMACs without deformable convs",
              "vs paper"]]
    paper = bm.DLKA_PAPER
    table.append(["paper (Azad et al., WACV 2024)", f"{paper['parameters'] / 1e6:.2f} M", "1.00x", "-",
                  f"{paper['macs'] / 1e9:.2f}", "1.00x"])
    for r in bm.dlka_paper_comparison():
        table.append([r["network"], f"{r['parameters'] / 1e6:.2f} M", bm.ratio(r["parameters"], paper["parameters"]),
                      f"{r['macs'] / 1e9:.2f}", f"{r['macs_without_deformable'] / 1e9:.2f}",
                      bm.ratio(r["macs_without_deformable"], paper["macs"])])
    print()
    print(text_table(table))
    return 0


def cmd_benchmark(args) -> int:
    from nnunet_ext import benchmark as bm
    from nnunet_ext.registry import get_architecture
    from nnunet_ext.report import output_paths, records, write_csv, write_json

    names = [get_architecture(a).name for a in (args.architectures or ARCHITECTURES)]
    report = bm.benchmark_networks(names, args.dataset, args.configuration, args.plans, args.device, args.repeats,
                                   progress=_progress)
    print(f"{report['dataset']} {args.configuration} ({args.plans}): patch {tuple(report['patch_size'])}, batch "
          f"{report['batch_size']}, {args.device}; median of {args.repeats}; nnU-Net: its {report['reference']} "
          "from these plans")
    print(text_table(bm.network_table(report)))
    for note in report["notes"]:
        print(note)
    paths = output_paths(args.output, f"benchmark_{report['dataset']}_{args.plans}_{args.configuration}_{args.device}",
                         ("csv", "json", "png"))
    write_csv(paths["csv"], records(report, ("dataset", "configuration", "plans", "device")))
    write_json(paths["json"], report)
    bm.network_chart(report, paths["png"])
    _written(paths)
    return 0


def cmd_compare(args) -> int:
    from nnunet_ext import compare
    from nnunet_ext.report import output_paths, records, write_csv

    report = compare.compare_trainers(args.dataset, args.configuration, args.trainers, args.baseline, args.plans,
                                      args.folds)
    print(f"{report['dataset']} {args.configuration} ({args.plans}): validation Dice per fold (nnU-Net's "
          f"summary.json); baseline {report['baseline']}")
    print(text_table(compare.comparison_table(report)))
    for note in report["notes"]:
        print(note)
    paths = output_paths(args.output, f"compare_{report['dataset']}_{args.plans}_{args.configuration}",
                         ("md", "csv", "png"))
    paths["md"].write_text(compare.markdown_report(report))
    write_csv(paths["csv"], records(report, ("dataset", "configuration", "plans", "baseline")))
    compare.per_case_chart(report, paths["png"])
    _written(paths)
    return 0


def cmd_plan(args) -> int:
    from nnunet_ext.planning import DEFAULT_GPU_MEMORY, plan
    from nnunet_ext.registry import get_architecture

    arch = get_architecture(args.architecture)
    gpu_memory = DEFAULT_GPU_MEMORY if args.gpu_memory is None else args.gpu_memory
    _progress(f"  planning {args.dataset} for {arch.name} within {gpu_memory:g} GB ...")
    summary = plan(args.dataset, arch, gpu_memory, args.configurations)
    print(f"{summary['dataset']}: plans {summary['plans']} for {arch.name}, GPU memory target "
          f"{gpu_memory:g} GB (nnU-Net's estimate scaled by {arch.name}'s memory model)")
    table = [["configuration", "patch", "batch", "estimated GPU memory", "nnU-Net's patch", "nnU-Net's batch",
              "preprocessed data"]]
    missing = []
    for c, r in summary["configurations"].items():
        default = "x".join(map(str, r["default_patch_size"])) if r["default_patch_size"] else "-"
        data = f"{r['reused_data']} (nnU-Net's)" if r["reused_data"] else "its own"
        if not r["preprocessed"]:
            missing.append(c)
            data += ", not preprocessed yet"
        table.append([c, "x".join(map(str, r["patch_size"])), str(r["batch_size"]), f"{r['estimated_gb']:.3g} GB",
                      default, str(r["default_batch_size"] or "-"), data])
    print(text_table(table))
    print(f"Written: {summary['file']}")
    if missing:
        print(f"Preprocess first: nnUNetv2_preprocess -d {args.dataset} -plans_name {summary['plans']} -c "
              + " ".join(missing))
    configurations = summary["configurations"]
    first = "3d_fullres" if "3d_fullres" in configurations else next(iter(configurations))
    print(f"Train: nnUNetv2_train {args.dataset} {first} 0 -tr {arch.trainer} -p {summary['plans']}")
    return 0


def cmd_benchmark_memory(args) -> int:
    from nnunet_ext import benchmark as bm
    from nnunet_ext.memory import benchmark_memory
    from nnunet_ext.registry import get_architecture

    names = [get_architecture(a).name for a in (args.architectures or ARCHITECTURES)]
    report = benchmark_memory(names, args.dims, args.fit, progress=_progress)
    tolerance = report["tolerance"]
    print("Training peak (forward with deep supervision + backward, batch 2, float32, CPU; bytes of the tensors "
          f"allocated during the step) against the {'model fitted here' if args.fit else 'registered models'}")
    table = [["network", "patch", "patch used for", "units", "extra elements", "parameters", "measured", "estimate",
              "error"]]
    for r in report["rows"]:
        f = r["footprint"]
        flag = "" if r["kind"] == "fit" or abs(r["error"]) <= tolerance else f" (over {tolerance:.0%})"
        table.append([r["network"], "x".join(map(str, r["patch_size"])), r["kind"], f"{f.units / 1e6:.1f} M",
                      f"{f.extra_elements / 1e6:.1f} M", f"{f.parameters / 1e6:.1f} M",
                      bm.megabytes(r["peak_bytes"]), bm.megabytes(r["estimate_bytes"]), f"{r['error']:+.1%}{flag}"])
    print(text_table(table))
    checks = [abs(r["error"]) for r in report["rows"] if r["kind"] == "check"]
    print(f"Largest error on the check patches (never fitted on): {max(checks):.1%}; tolerance {tolerance:.0%}.")
    if args.fit:
        print("Fitted models (per_unit, per_extra, per_parameter), for nnunet_ext/registry.py and "
              "nnunet_ext/memory.py:")
        for (name, dim), m in report["models"].items():
            print(f"  {name} {dim}D: MemoryModel({m.per_unit:.4g}, {m.per_extra:.4g}, {m.per_parameter:.4g})")
    return 0


def _written(paths: dict) -> None:
    print("Written: " + ", ".join(str(p) for p in paths.values()))


def _available_device(name: str) -> str:
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise argparse.ArgumentTypeError(f"'{name}' is not one of {', '.join(available)}")
    if not available[name]:
        raise argparse.ArgumentTypeError(f"{name} is not available to torch {torch.__version__} on this machine; "
                                         "use --device cpu")
    return name


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark command takes."""
    parser.add_argument("--device", default="cpu", type=_available_device, help="cpu (default), cuda or mps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the tables report their median")


def _add_dataset_options(parser: argparse.ArgumentParser, required: bool = True, help: str = "name or id") -> None:
    parser.add_argument("-d", "--dataset", required=required, help=help)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")


def _add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="nnunet_ext_reports",
                        help="folder for the files it writes (default: ./nnunet_ext_reports)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("env", help=f"print the export line for {discovery.ENV_VAR}; use: eval \"$(nnunet-ext env)\"")
    sub.add_parser("list", help="architectures, trainers, 2D/3D support and optional fast paths")

    p = sub.add_parser("doctor", help="check nnU-Net, its variables, trainer discovery, torch and extras")
    _add_dataset_options(p, required=False, help="also check that every architecture can be built from this "
                                                 "dataset's plans (name or id)")

    p = sub.add_parser("make-dataset", help="write a tiny synthetic nnU-Net raw dataset")
    p.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--dataset-id", type=int, default=999)
    p.add_argument("--name", default="Synthetic")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--labels", type=int, default=2)
    p.add_argument("--shape", type=int, nargs="+", help="array order, e.g. 40 48 48")
    p.add_argument("--spacing", type=float, nargs="+", help="array order, e.g. 2 1 1")
    p.add_argument("--regions", action="store_true")
    p.add_argument("--ignore-label", action="store_true")
    p.add_argument("--object-scale", type=float, default=1.0,
                   help="scale of the objects' radii (0.2 to 0.3 of the extent); 0.2 gives very small structures")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("benchmark", help="parameters, FLOPs, training-step and inference time, peak memory of "
                                         "architectures vs nnU-Net's own network (and Primus-B on 3D plans), at a "
                                         "dataset's plans (no preprocessed data needed); prints a table, writes "
                                         "CSV, JSON and a PNG chart")
    _add_dataset_options(p)
    p.add_argument("-a", "--architectures", nargs="+", help="registered names (default: all)")
    _add_device_options(p)
    _add_output_option(p)

    p = sub.add_parser("compare", help="validation Dice of trainers per fold and class from nnUNet_results, "
                                       "mean ± std over folds, paired Wilcoxon test against a baseline; prints a "
                                       "table, writes markdown, CSV and a PNG plot")
    _add_dataset_options(p)
    p.add_argument("-tr", "--trainers", nargs="+", help="default: every trainer with results for the configuration")
    p.add_argument("--baseline", help="default: nnUNetTrainer if it has results, else the first trainer")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    _add_output_option(p)

    p = sub.add_parser("plan", help="plan patch and batch size for one architecture within a GPU memory target: "
                                    "nnU-Net's planner with the architecture's memory model; writes "
                                    "nnUNetPlans_<Arch>_<GB>G.json next to nnU-Net's plans, for nnUNetv2_train -p")
    p.add_argument("-d", "--dataset", required=True, help="name or id (its fingerprint must exist)")
    p.add_argument("-a", "--architecture", required=True, help="registered name (nnunet-ext list)")
    p.add_argument("--gpu-memory", type=float, help="GB of GPU memory to plan for (default: nnU-Net's, 8)")
    p.add_argument("-c", "--configurations", nargs="+", help="configurations to write (default: all nnU-Net plans)")

    p = sub.add_parser("benchmark-memory", help="measured training memory of every architecture and PlainConvUNet "
                                                "at the patches the memory models are fitted on and at others, "
                                                "against the models' estimates")
    p.add_argument("-a", "--architectures", nargs="+", help="registered names (default: all)")
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    p.add_argument("--fit", action="store_true", help="fit the models on these measurements instead of using the "
                                                      "registered ones, and print them")

    p = sub.add_parser("benchmark-scan", help="selective scan vs a sequential loop and mambapy's pscan, "
                                              "at LKM-UNet's window shapes")
    _add_device_options(p)

    p = sub.add_parser("benchmark-dlka", help="deformable convolution vs torchvision (2D) and an unfused reference, "
                                              "and D-LKA Net's size at the paper's configuration")
    _add_device_options(p)

    p = sub.add_parser("benchmark-kan", help="KANLinear vs the same recursion under plain autograd and a naive "
                                             "per-feature loop, at U-KAN's token shapes")
    _add_device_options(p)

    p = sub.add_parser("real-data", help="small real images from packages on the index -> nnU-Net datasets -> "
                                         "train every architecture and nnU-Net's default (short CPU schedule) -> "
                                         "compare (docs/results.md)")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="Nuclei2D, SpineCT, SpineMR, Lesions")
    p.add_argument("--dir", default="nnunet_ext_real_data", help="workspace (nnUNet_raw, _preprocessed, _results, "
                                                                 "logs, reports); finished folds are kept")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "nnunet-ext" / "real-data"),
                   help="where downloaded archives and checked files are kept")
    p.add_argument("-tr", "--trainers", nargs="+", help="the first is the baseline (default: nnUNetTrainer, then "
                                                        "every registered trainer, each with the _real schedule)")
    p.add_argument("-f", "--folds", type=int, nargs="+", help="default: as many as train in an hour on 2 CPU cores "
                                                               "(docs/results.md)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--fetch-only", action="store_true", help="only write the raw datasets into DIR/nnUNet_raw")

    p = sub.add_parser("demo", help="synthetic dataset -> plan -> train (short) -> predict -> Dice, on CPU")
    p.add_argument("--dir", default="nnunet_ext_demo", help="workspace folder (replaced on each run)")
    p.add_argument("-c", "--configuration", default="3d_fullres", choices=("2d", "3d_fullres"))
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerAttentionUNet_demo")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    return parser


COMMANDS = {"env": cmd_env, "list": cmd_list, "doctor": cmd_doctor, "make-dataset": cmd_make_dataset,
            "demo": cmd_demo, "benchmark": cmd_benchmark, "compare": cmd_compare, "benchmark-scan": cmd_benchmark_scan,
            "benchmark-dlka": cmd_benchmark_dlka, "benchmark-kan": cmd_benchmark_kan, "plan": cmd_plan,
            "benchmark-memory": cmd_benchmark_memory, "real-data": cmd_real_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        print(f"nnunet-ext {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
