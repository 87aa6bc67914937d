"""`nnunet-ext benchmark-memory`: each architecture's measured training memory against its memory model
on patches the model was not fitted on; with --fit, the models fitted anew (--write stores them in
nnunet_ext/memory_models.json, where `nnunet-ext plan` reads them).

Per network and dimension the fit is non-negative least squares of the model's three coefficients
on measurements at FIT_PATCHES (nnunet_ext.tools.memory), each sample weighted by its measurement so
that small and large patches count alike, since the check is a relative error at CHECK_PATCHES.
"""

from __future__ import annotations

from typing import Sequence

from nnunet_ext import memory_models
from nnunet_ext.memory_models import REFERENCE, Footprint, MemoryModel
from nnunet_ext.registry import get_architecture
from nnunet_ext.tools.memory import CHECK_PATCHES, FIT_PATCHES, TOLERANCE, measure
from nnunet_ext.tools.options import add_architectures_option, architectures
from nnunet_ext.tools.report import megabytes, progress, text_table


def fit(samples: Sequence[tuple[Footprint, int, float]]) -> MemoryModel:
    """The model fitted to (footprint, batch, measured bytes) samples."""
    import numpy as np
    from scipy.optimize import nnls

    design = np.array([[b * f.units, b * f.extra_elements, f.parameters] for f, b, _ in samples], float)
    measured = np.array([m for *_, m in samples], float)
    return MemoryModel(*(float(c) for c in nnls(design / measured[:, None], np.ones(len(samples)))[0]))


def benchmark_memory(names: Sequence[str], dims: Sequence[int], fit_models: bool = False, progress=print) -> dict:
    """Measured training peaks of PlainConvUNet and `names` at CHECK_PATCHES, each with the stored
    model's estimate and its error; with `fit_models`, also at FIT_PATCHES, and the models fitted on
    those give the estimates instead."""
    kinds = (("fit", FIT_PATCHES), ("check", CHECK_PATCHES)) if fit_models else (("check", CHECK_PATCHES),)
    rows, models = [], {}
    for dim in dims:
        for name in (REFERENCE, *names):
            if name != REFERENCE and dim not in get_architecture(name).dims:
                continue
            model = None if fit_models else memory_models.memory_model(name, dim)  # missing: say so before measuring
            measured = []
            for kind, patches in kinds:
                for patch in patches[dim]:
                    progress(f"  {name} {dim}D, patch {patch} ({kind}) ...")
                    measured.append({**measure(name, patch), "dim": dim, "kind": kind})
            if fit_models:
                model = fit([(r["footprint"], r["batch"], r["peak_bytes"]) for r in measured if r["kind"] == "fit"])
            models[(name, dim)] = model
            for r in measured:
                r["estimate_bytes"] = model.estimate(r["footprint"], r["batch"])
                r["error"] = r["estimate_bytes"] / r["peak_bytes"] - 1
            rows += measured
    return {"rows": rows, "models": models, "fitted": fit_models, "tolerance": TOLERANCE}


def add_arguments(parser) -> None:
    add_architectures_option(parser)
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--fit", action="store_true", help="fit the models on these measurements instead of using the "
                                                          "stored ones, and print them")
    parser.add_argument("--write", action="store_true",
                        help=f"with --fit: store the fitted models in nnunet_ext/{memory_models.FILE.name}; "
                             f"{REFERENCE}'s, which every estimate is relative to, only without -a (a refit of all)")


def main(args) -> int:
    if args.write and not args.fit:
        raise ValueError("--write stores the models --fit fits; add --fit.")
    report = benchmark_memory(architectures(args), args.dims, args.fit, progress=progress)
    tolerance = report["tolerance"]
    print("Training peak (forward with deep supervision + backward, batch 2, float32, CPU; bytes of the tensors "
          f"allocated during the step) against the {'model fitted here' if args.fit else 'stored models'}")
    table = [["network", "patch", "patch used for", "units", "extra elements", "parameters", "measured", "estimate",
              "error"]]
    for r in report["rows"]:
        f = r["footprint"]
        flag = "" if r["kind"] == "fit" or abs(r["error"]) <= tolerance else f" (over {tolerance:.0%})"
        table.append([r["network"], "x".join(map(str, r["patch_size"])), r["kind"], f"{f.units / 1e6:.1f} M",
                      f"{f.extra_elements / 1e6:.1f} M", f"{f.parameters / 1e6:.1f} M",
                      megabytes(r["peak_bytes"]), megabytes(r["estimate_bytes"]), f"{r['error']:+.1%}{flag}"])
    print(text_table(table))
    checks = [abs(r["error"]) for r in report["rows"] if r["kind"] == "check"]
    print(f"Largest error on the check patches (never fitted on): {max(checks):.1%}; tolerance {tolerance:.0%}.")
    if args.fit:
        print("Fitted models (per_unit, per_extra, per_parameter):")
        for (name, dim), m in report["models"].items():
            print(f"  {name} {dim}D: MemoryModel({m.per_unit:.4g}, {m.per_extra:.4g}, {m.per_parameter:.4g})")
    if args.write:  # as printed: four significant digits
        stored = {(name, dim): MemoryModel(*(float(f"{c:.4g}") for c in (m.per_unit, m.per_extra, m.per_parameter)))
                  for (name, dim), m in report["models"].items() if name != REFERENCE or not args.architectures}
        memory_models.save(stored)
        print(f"Stored in {memory_models.FILE}: " + ", ".join(f"{name} {dim}D" for name, dim in stored) + ".")
    return 0
