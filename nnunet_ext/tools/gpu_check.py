"""`nnunet-ext gpu-check`: the GPU acceptance run, one command on a bare CUDA machine.

For every architecture and nnU-Net's PlainConvUNet, on realistic plans (3d_fullres 128x128x128 at
batch 2, 2d 512x512 at batch 12, the topology nnU-Net's planner gives those patches):
- training as nnU-Net's train_step runs it on CUDA: float16 autocast, a GradScaler, gradients
  unscaled and clipped to norm 12, nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov), its loss (Dice +
  cross-entropy with deep supervision), `--steps` steps on one fixed batch: every loss finite, the
  last below the first;
- compiled as nnU-Net compiles on CUDA (torch.compile, inductor) unless the architecture's entry turns
  compile off (then its reason): the first compiled step's loss against eager's, the compile time,
  and the compiled step time;
- the median eager step time and the peak memory over the steps (CUDA: max_memory_allocated less what
  was allocated before them), each as a ratio to PlainConvUNet's, and the peak ratio against the one
  the memory model promises (`nnunet-ext plan` sizes patches with it);
then the selective scan on the device (mamba_ssm's kernels where they import, else our PyTorch path)
against a float64 sequential loop, and mamba_ssm's kernels against our PyTorch path when they import.

It needs torch and this package's pure-Python dependencies only (docs/testing.md: what to carry to a
machine without network). `--device cpu --quick` runs every part on small plans in CI; on CPU the
peak is the exact count of the bytes the step's tensors hold (nnunet_ext.tools.memory) and autocast
is to bfloat16 (`AUTOCAST`), and the quick run compiles with aot_eager (inductor is
tests/test_compile.py's). Writes a markdown and a JSON report; exits with 1 when a check fails.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from datetime import date

import torch

from nnunet_ext.memory_models import REFERENCE, relative_memory
from nnunet_ext.registry import ARCHITECTURES, get_architecture
from nnunet_ext.tools.memory import LiveTensorBytes, build, default_plans_architecture, footprint
from nnunet_ext.tools.options import (add_architectures_option, add_output_option, architectures, available_device,
                                      positive_int)
from nnunet_ext.tools.report import (error_text, markdown_table, megabytes, output_paths, progress, seconds,
                                     write_json, written)

# configuration -> (patch, batch): nnU-Net's plans for a 128^3 and a 512^2 image, and the quick run's
# (its plans' networks are 4 and 5 stages deep; at nnU-Net's, one step of PlainConvUNet alone takes a
# minute under autocast on two cores).
PLANS = {"3d_fullres": ((128, 128, 128), 2), "2d": ((512, 512), 12)}
QUICK_PLANS = {"3d_fullres": ((32, 32, 32), 2), "2d": ((64, 64), 2)}
INPUT_CHANNELS, NUM_CLASSES = 1, 3
COMPILED_LOSS_TOLERANCE = 2e-2  # relative, first step: float16 rounds differently in fused kernels
MEMORY_TOLERANCE = 0.2  # the measured peak ratio may exceed the model's by this much (tests/test_memory.py's)
SCAN_TOLERANCE = 1e-4  # float32 against float64, relative to the largest value
# nnU-Net's autocast on CUDA is float16. CPUs have no fast float16 convolutions (a 32^3 training step of
# PlainConvUNet takes 70 s), so the CPU run autocasts to bfloat16; tests/test_mixed_precision.py runs
# float16 on CPU at small sizes.
AUTOCAST = {"cuda": torch.float16, "cpu": torch.bfloat16}


def nnunet_loss(num_outputs: int):
    """nnU-Net's loss for label (not region) training with deep supervision, as its trainer builds it."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = torch.tensor([0.5 ** i for i in range(num_outputs)])
    weights[-1] = 0  # nnU-Net leaves the lowest output out
    return DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist())


class Training:
    """One network on the plans for `configuration` (the quick run's with `quick`), with nnU-Net's
    optimiser, loss and CUDA train_step on a fixed batch of the plans' patch and batch size."""

    def __init__(self, name: str, configuration: str, device: torch.device, quick: bool):
        self.device = device
        torch.manual_seed(0)
        patch, self.batch = (QUICK_PLANS if quick else PLANS)[configuration]
        self.patch, self.entry = default_plans_architecture(patch)
        self.network = build(name, self.entry, self.patch, INPUT_CHANNELS, NUM_CLASSES).to(device)
        generator = torch.Generator().manual_seed(1)
        self.data = torch.randn(self.batch, INPUT_CHANNELS, *self.patch, generator=generator).to(device)
        labels = torch.randint(0, NUM_CLASSES, (self.batch, 1, *self.patch), generator=generator).float().to(device)
        with torch.no_grad():
            sizes = [o.shape[2:] for o in self.network(self.data[:1])]
        self.target = [torch.nn.functional.interpolate(labels, size=s, mode="nearest") for s in sizes]
        self.loss = nnunet_loss(len(sizes))
        self.optimizer = torch.optim.SGD(self.network.parameters(), 1e-2, momentum=0.99, nesterov=True,
                                         weight_decay=3e-5)
        self.scaler = torch.amp.GradScaler(device.type)
        self.model = self.network

    def compile(self, backend: str) -> None:
        self.model = torch.compile(self.network, backend=backend)

    def step(self) -> float:
        """nnU-Net's train_step on CUDA (nnUNetTrainer.train_step), on any device."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=AUTOCAST[self.device.type]):
            loss = self.loss(self.model(self.data), self.target)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()  # synchronises, so a step's time is its own

    def timed_steps(self, steps: int, peak: bool = True) -> tuple[list[float], list[float], int | None]:
        """Losses, seconds per step and (with `peak`) the peak bytes allocated over `steps` steps."""
        losses, times = [], []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        counter = (LiveTensorBytes(existing=[*self.network.parameters(), *self.network.buffers(), self.data,
                                             *self.target])
                   if peak and self.device.type == "cpu" else contextlib.nullcontext())
        with counter:
            for _ in range(steps):
                start = time.perf_counter()
                losses.append(self.step())
                times.append(time.perf_counter() - start)
        if not peak:
            return losses, times, None
        return losses, times, (torch.cuda.max_memory_allocated(self.device) - before if self.device.type == "cuda"
                               else counter.peak)


def check_network(name: str, configuration: str, device: torch.device, quick: bool, steps: int,
                  compile_backend: str) -> dict:
    """The training, compile and measurement checks of one network on one configuration."""
    run = Training(name, configuration, device, quick)
    losses, times, peak = run.timed_steps(steps)
    row = {"configuration": configuration, "network": name, "patch_size": run.patch, "batch_size": run.batch,
           "parameters": sum(p.numel() for p in run.network.parameters()), "steps": steps,
           "first_loss": losses[0], "last_loss": losses[-1], "step_seconds": statistics.median(times[1:]),
           "peak_bytes": peak, "compile": _compile_check(name, configuration, device, quick, losses[0],
                                                         compile_backend)}
    row["finite"] = all(torch.isfinite(torch.tensor(losses)).tolist())
    row["loss_falls"] = losses[-1] < losses[0]
    if name != REFERENCE:
        dim = len(run.patch)
        row["estimated_peak_vs_nnunet"] = relative_memory(
            get_architecture(name).memory_model(dim), dim,
            footprint(name, run.entry, run.patch, INPUT_CHANNELS, NUM_CLASSES),
            footprint(REFERENCE, run.entry, run.patch, INPUT_CHANNELS, NUM_CLASSES))
    return row


def _compile_check(name, configuration, device, quick, eager_first_loss, backend) -> dict:
    off = "" if name == REFERENCE else get_architecture(name).compile_off
    if off:
        return {"status": "off", "reason": off}
    run = Training(name, configuration, device, quick)  # the same initial weights and batch as eager's
    run.compile(backend)
    start = time.perf_counter()
    try:
        first = run.step()
    except Exception as e:  # dynamo and inductor fail with many exception types; the report goes on
        return {"status": "failed", "backend": backend, "error": f"{type(e).__name__}: {error_text(e)}"[:400]}
    first_seconds = time.perf_counter() - start
    _, times, _ = run.timed_steps(3, peak=False)
    step_seconds = statistics.median(times)
    difference = abs(first - eager_first_loss) / abs(eager_first_loss)
    return {"status": "ok" if difference <= COMPILED_LOSS_TOLERANCE else "differs", "backend": backend,
            "compile_seconds": first_seconds - step_seconds, "step_seconds": step_seconds,
            "first_loss_difference": difference}


def check_scan(device: torch.device, quick: bool) -> list[dict]:
    """The scan the device runs against a float64 sequential loop, forward and gradients; mamba_ssm's
    kernels against our PyTorch path when they import."""
    from nnunet_ext.ops import selective_scan_fn
    from nnunet_ext.ops.reference import selective_scan_loop
    from nnunet_ext.ops.selective_scan import pytorch_paths_only
    from nnunet_ext.tools.benchmark_scan import SCAN_SHAPES, ScanShape, scan_inputs, scan_path

    shapes = (ScanShape("window 16x16", rows=2, d_inner=16, length=256),) if quick else SCAN_SHAPES

    def run(fn, tensors):
        out = fn(*(tensors[k] for k in "u delta A B C".split()))
        out.square().mean().backward()
        return [out.detach().double().cpu(), *(tensors[k].grad.double().cpu() for k in "u delta A B C".split())]

    def error(result, reference):
        return max(((r - e).abs().max() / e.abs().max()).item() for r, e in zip(result, reference))

    path = scan_path(device.type)
    rows = []
    for shape in shapes:
        progress(f"  scan {shape.name} ...")
        reference = run(lambda *t: selective_scan_loop(*t)[0],
                        {k: v.detach().double().requires_grad_() for k, v in scan_inputs(shape, "cpu").items()})
        ours = run(selective_scan_fn, scan_inputs(shape, device))
        with pytorch_paths_only():
            pytorch = run(selective_scan_fn, scan_inputs(shape, device))
        rows.append({"shape": shape.name, "path": path, "error_vs_float64": error(ours, reference),
                     "pytorch_error_vs_float64": error(pytorch, reference),
                     "kernels_vs_pytorch": error(ours, pytorch) if path == "mamba_ssm CUDA kernels" else None})
    return rows


def gpu_check(names, configurations, device: str, quick: bool, steps: int, backend: str,
              progress=print) -> dict:
    """The report: one row per network and configuration, one per scan shape, and whether all passed."""
    dev = torch.device(device)
    rows = []
    for configuration in configurations:
        for name in (REFERENCE, *names):
            if name != REFERENCE and len(PLANS[configuration][0]) not in get_architecture(name).dims:
                continue
            progress(f"  {configuration} {name}: {steps} training steps, then compiled ...")
            rows.append(check_network(name, configuration, dev, quick, steps, backend))
    for row in rows:
        plain = next(r for r in rows if r["configuration"] == row["configuration"] and r["network"] == REFERENCE)
        row["step_vs_nnunet"] = row["step_seconds"] / plain["step_seconds"]
        row["peak_vs_nnunet"] = row["peak_bytes"] / plain["peak_bytes"]
        row["failures"] = failures(row, judge_memory=not quick)
    scan = check_scan(dev, quick)
    for row in scan:
        row["failures"] = [f"{k} {row[k]:.1e} > {SCAN_TOLERANCE:g}" for k in
                           ("error_vs_float64", "pytorch_error_vs_float64", "kernels_vs_pytorch")
                           if row[k] is not None and not row[k] <= SCAN_TOLERANCE]
    return {"date": date.today().isoformat(), "device": _device_name(dev), "torch": torch.__version__,
            "python": platform.python_version(), "quick": quick, "steps": steps, "compile_backend": backend,
            "autocast": str(AUTOCAST[dev.type]).removeprefix("torch."), "networks": rows, "scan": scan,
            "passed": not any(r["failures"] for r in (*rows, *scan))}


def failures(row: dict, judge_memory: bool) -> list[str]:
    """What went wrong for one network, in words. The memory model's promise is judged on realistic plans
    only: on the quick run's small plans, what training holds per parameter dominates, and the models
    count gradients there but not the optimiser's momentum or autocast's copies of the weights."""
    found = []
    if not row["finite"]:
        found.append("a loss is not finite")
    if not row["loss_falls"]:
        found.append(f"the loss did not fall ({row['first_loss']:.4f} -> {row['last_loss']:.4f})")
    if row["compile"]["status"] == "differs":
        found.append(f"compiled loss {row['compile']['first_loss_difference']:.1e} off eager's")
    if row["compile"]["status"] == "failed":
        found.append(f"torch.compile failed ({row['compile']['error']})")
    promised = row.get("estimated_peak_vs_nnunet")
    if judge_memory and promised is not None and row["peak_vs_nnunet"] > promised * (1 + MEMORY_TOLERANCE):
        found.append(f"peak {row['peak_vs_nnunet']:.2f}x nnU-Net's, the memory model promises {promised:.2f}x")
    return found


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _compile_cell(c: dict) -> str:
    if c["status"] == "off":
        return "off (the entry's reason, below)"
    if c["status"] == "failed":
        return "failed (result)"
    return (f"{c['compile_seconds']:.0f} s to compile, step {seconds(c['step_seconds'])}, first loss "
            f"{c['first_loss_difference']:.0e} off eager's")


def markdown(report: dict) -> str:
    networks = [["configuration", "network", "patch x batch", "loss first -> last", "step", "vs nnU-Net",
                 "peak", "vs nnU-Net", "model promises", f"compiled ({report['compile_backend']})", "result"]]
    for r in report["networks"]:
        promised = r.get("estimated_peak_vs_nnunet")
        networks.append([
            r["configuration"], r["network"], f"{'x'.join(map(str, r['patch_size']))} x {r['batch_size']}",
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}", seconds(r["step_seconds"]), f"{r['step_vs_nnunet']:.2f}x",
            megabytes(r["peak_bytes"]), f"{r['peak_vs_nnunet']:.2f}x", "-" if promised is None else f"{promised:.2f}x",
            _compile_cell(r["compile"]), "; ".join(r["failures"]) or "passed"])
    scan = [["shape", "path", "vs float64", "PyTorch path vs float64", "kernels vs PyTorch path", "result"]]
    for r in report["scan"]:
        scan.append([r["shape"], r["path"], f"{r['error_vs_float64']:.1e}", f"{r['pytorch_error_vs_float64']:.1e}",
                     "-" if r["kernels_vs_pytorch"] is None else f"{r['kernels_vs_pytorch']:.1e}",
                     "; ".join(r["failures"]) or "passed"])
    quick = " (quick: small plans, memory not judged)" if report["quick"] else ""
    return "\n".join([
        f"# nnunet-ext gpu-check, {report['date']}", "",
        f"{report['device']}, torch {report['torch']}, Python {report['python']}{quick}: "
        f"{'PASSED' if report['passed'] else 'FAILED'}", "",
        f"{report['steps']} steps of nnU-Net's CUDA train_step ({report['autocast']} autocast, GradScaler) on a "
        "fixed batch; step: median eager seconds; peak: memory allocated over the steps beyond the weights and "
        "the batch; model promises: the peak ratio `nnunet-ext plan` sizes patches with.", "",
        markdown_table(networks), "", "Compile is off for:",
        *(f"- {n}: {a.compile_off}." for n, a in ARCHITECTURES.items() if a.compile_off), "",
        "Selective scan, forward and gradients, largest difference relative to the largest value:", "",
        markdown_table(scan), ""])


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=available_device,
                        help="cuda (default where available) or cpu")
    parser.add_argument("--quick", action="store_true", help="small plans, 4 steps, aot_eager compile: CI's "
                        "run on CPU")
    parser.add_argument("-c", "--configurations", nargs="+", choices=list(PLANS), default=list(PLANS))
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per network (default: 30; quick: 4)")
    parser.add_argument("--backend", default=None, help="torch.compile's backend (default: inductor, nnU-Net's; "
                        "quick: aot_eager)")
    add_architectures_option(parser)
    add_output_option(parser)


def main(args) -> int:
    steps = args.steps or (4 if args.quick else 30)
    if steps < 2:
        raise ValueError(f"--steps {steps}: at least 2 (the loss must fall from the first)")
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    report = gpu_check(architectures(args), args.configurations, args.device, args.quick, steps, backend,
                       progress=progress)
    text = markdown(report)
    print(text)
    paths = output_paths(args.output, f"gpu_check_{args.device}{'_quick' if args.quick else ''}", ("md", "json"))
    paths["md"].write_text(text)
    write_json(paths["json"], report)
    written(paths)
    return 0 if report["passed"] else 1
