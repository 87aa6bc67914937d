"""`nnunet-ext compare`: the accuracy of trainers on one dataset, from nnU-Net's own cross-validation.

nnU-Net writes `fold_k/validation/summary.json` for every fold it validates: the Dice of every case
and class (NaN where neither the reference nor the prediction contains the class), per-class means
over cases ignoring NaN, and their mean over the foreground classes. We read the per-case Dice and
recompute those means, so a fold's figures are the ones nnU-Net reports. Across folds we give the
mean and sample standard deviation of the fold means. The paired comparison with the baseline uses
the cases both trainers validated: per class, the cases where both Dice values are defined; overall,
each case's mean over its defined classes. Its p-value is scipy's two-sided Wilcoxon signed-rank test.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.tools.options import add_dataset_options, add_output_option
from nnunet_ext.tools.report import (figure, markdown_table, output_paths, records, text_table, write_csv,
                                     written)

OVERALL = "mean"  # the row of the foreground mean; classes are named as in summary.json ("1", "(1, 2)")
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
STOCK_BASELINE = "nnUNetTrainer"


@dataclass
class TrainerResults:
    trainer: str
    folder: Path
    folds: dict[int, dict[str, dict[str, float]]]  # fold -> case -> class -> Dice (NaN: class in neither)
    missing_folds: list[int]

    def cases(self) -> dict[str, dict[str, float]]:
        return {case: dice for fold in self.folds.values() for case, dice in fold.items()}


def _dice(value) -> float:
    return math.nan if value is None else float(value)  # nnU-Net writes NaN; strict JSON writers write null


def read_summary(path: Path) -> dict[str, dict[str, float]]:
    """case -> class -> Dice from one of nnU-Net's validation summaries. Cases are named by the
    reference file, which is the same for every trainer on the dataset."""
    summary = json.loads(path.read_text())
    return {Path(c["reference_file"]).name: {k: _dice(m["Dice"]) for k, m in c["metrics"].items()}
            for c in summary["metric_per_case"]}


def results_folder(dataset: str | int) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    root = os.environ.get("nnUNet_results")
    if not root:
        raise FileNotFoundError("nnUNet_results is not set; export it (see `nnunet-ext doctor`).")
    return Path(root) / maybe_convert_to_dataset_name(dataset)  # its error names the folders it searched


def find_trainers(dataset_folder: Path, configuration: str, plans: str) -> list[str]:
    """Trainers with a results folder for this configuration and plans."""
    suffix = f"__{plans}__{configuration}"
    return sorted(p.name[:-len(suffix)] for p in dataset_folder.glob(f"*{suffix}") if p.is_dir())


def load_trainer(dataset_folder: Path, trainer: str, configuration: str, plans: str,
                 folds=DEFAULT_FOLDS) -> TrainerResults:
    folder = dataset_folder / f"{trainer}__{plans}__{configuration}"
    found, missing = {}, []
    for fold in folds:
        summary = folder / f"fold_{fold}" / "validation" / "summary.json"
        if summary.is_file():
            found[fold] = read_summary(summary)
        else:
            missing.append(fold)
    return TrainerResults(trainer, folder, found, missing)


def _class_order(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _nanmean(values) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return statistics.fmean(defined) if defined else math.nan


def case_dice(dice: dict[str, float], c: str) -> float:
    """A case's Dice for class `c`, or for OVERALL its mean over the classes defined for it (NaN if none)."""
    return _nanmean(dice.values()) if c == OVERALL else dice.get(c, math.nan)


def fold_means(cases: dict[str, dict[str, float]], classes: list[str]) -> dict[str, float]:
    """nnU-Net's figures for one fold: per class the mean over cases ignoring NaN, and their mean."""
    means = {c: _nanmean(case_dice(dice, c) for dice in cases.values()) for c in classes}
    means[OVERALL] = statistics.fmean(means.values())
    return means


def wilcoxon_p(differences: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when no pair differs, NaN without pairs."""
    from scipy.stats import wilcoxon

    if not differences:
        return math.nan
    if not any(differences):
        return 1.0
    with warnings.catch_warnings():  # scipy warns that few pairs give a coarse exact distribution; we report n
        warnings.simplefilter("ignore")
        return float(wilcoxon(differences).pvalue)


def paired(results: TrainerResults, baseline: TrainerResults, classes: list[str]) -> dict[str, dict]:
    """Per class and overall: the number of pairs, the mean difference (trainer - baseline) and the
    Wilcoxon p-value, over the cases both trainers validated."""
    ours, theirs = results.cases(), baseline.cases()
    common = sorted(set(ours) & set(theirs))
    comparison = {}
    for c in [*classes, OVERALL]:
        pairs = [(case_dice(ours[k], c), case_dice(theirs[k], c)) for k in common]
        differences = [a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
        comparison[c] = {"pairs": len(differences),
                         "mean_difference": statistics.fmean(differences) if differences else math.nan,
                         "p_value": wilcoxon_p(differences)}
    return comparison


def compare_trainers(dataset, configuration: str, trainers=None, baseline: str | None = None,
                     plans: str = "nnUNetPlans", folds=DEFAULT_FOLDS) -> dict:
    """The report of `nnunet-ext compare` (see the module docstring). Trainers default to every trainer
    with results for the configuration; the baseline to nnU-Net's own trainer if among them, else the
    first. Trainers without any validated fold are named in the notes; raises FileNotFoundError if
    the baseline is one of them or none has results."""
    dataset_folder = results_folder(dataset)
    available = find_trainers(dataset_folder, configuration, plans)
    trainers = list(dict.fromkeys(trainers or available))
    if not trainers:
        raise FileNotFoundError(f"No trainer has results for {configuration} with {plans} in {dataset_folder}; "
                                f"train one with nnUNetv2_train {dataset} {configuration} FOLD -tr TRAINER"
                                + ("" if plans == "nnUNetPlans" else f" -p {plans}") + ".")
    baseline = baseline or (STOCK_BASELINE if STOCK_BASELINE in trainers else trainers[0])
    if baseline not in trainers:
        trainers.insert(0, baseline)
    loaded = [load_trainer(dataset_folder, t, configuration, plans, folds) for t in trainers]
    with_results = [r for r in loaded if r.folds]
    notes = [f"{r.trainer}: no validated fold in {r.folder} (looked for fold_k/validation/summary.json, "
             f"k in {', '.join(map(str, folds))}); left out." for r in loaded if not r.folds]
    by_name = {r.trainer: r for r in with_results}
    if baseline not in by_name:
        others = ", ".join(by_name) or "none"
        raise FileNotFoundError(f"The baseline {baseline} has no validated fold for {configuration} ({plans}) in "
                                f"{dataset_folder}. Trainers with results: {others}; pick one with --baseline.")
    notes += [f"{r.trainer}: fold(s) {', '.join(map(str, r.missing_folds))} missing (no validation/summary.json)."
              for r in with_results if r.missing_folds]

    classes = sorted({c for r in with_results for fold in r.folds.values() for dice in fold.values() for c in dice},
                     key=_class_order)
    rows = []
    for r in with_results:
        per_fold = {fold: fold_means(cases, classes) for fold, cases in r.folds.items()}
        comparison = paired(r, by_name[baseline], classes) if r.trainer != baseline else {}
        all_cases = r.cases().values()
        for c in [*classes, OVERALL]:
            means = [m for m in (per_fold[f][c] for f in sorted(per_fold)) if not math.isnan(m)]
            rows.append({"trainer": r.trainer, "class": c,
                         **{f"fold_{f}": per_fold[f][c] if f in per_fold else None for f in folds},
                         "mean": statistics.fmean(means) if means else math.nan,
                         "std": statistics.stdev(means) if len(means) > 1 else math.nan, "folds": len(per_fold),
                         "cases": sum(not math.isnan(case_dice(d, c)) for d in all_cases),
                         **{f"{k}_vs_baseline": v for k, v in comparison.get(c, {}).items()}})
    return {"dataset": dataset_folder.name, "configuration": configuration, "plans": plans, "folds": list(folds),
            "baseline": baseline, "trainers": [r.trainer for r in with_results], "classes": classes, "rows": rows,
            "per_case": {r.trainer: r.cases() for r in with_results}, "notes": notes}


def _dice_text(v) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def comparison_table(report: dict) -> list[list[str]]:
    """One line per trainer and class: Dice per fold, mean ± std over folds, cases, and the paired
    comparison with the baseline."""
    folds = [f"fold_{f}" for f in report["folds"]]
    table = [["trainer", "class", *(f.replace("_", " ") for f in folds), "mean ± std", "cases",
              "diff vs baseline", "p (Wilcoxon)", "pairs"]]
    for r in report["rows"]:
        spread = "" if math.isnan(r["std"]) else f" ± {r['std']:.4f}"
        is_baseline = r["trainer"] == report["baseline"]
        table.append([r["trainer"], r["class"], *("missing" if r[f] is None else _dice_text(r[f]) for f in folds),
                      _dice_text(r["mean"]) + spread, str(r["cases"]),
                      "baseline" if is_baseline else f"{r['mean_difference_vs_baseline']:+.4f}"
                      if r["pairs_vs_baseline"] else "-",
                      "" if is_baseline else _p_text(r["p_value_vs_baseline"]),
                      "" if is_baseline else str(r["pairs_vs_baseline"])])
    return table


def _p_text(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3g}"


def markdown_report(report: dict) -> str:
    lines = [f"# {report['dataset']} {report['configuration']} ({report['plans']}): validation Dice",
             "", f"Baseline: {report['baseline']}. Mean ± std over folds of nnU-Net's per-fold means; the paired "
             "comparison uses the cases both trainers validated (see nnunet_ext/tools/compare.py).", "",
             markdown_table(comparison_table(report))]
    if report["notes"]:
        lines += ["", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def per_case_chart(report: dict, path) -> None:
    """A PNG with one panel per class and one overall: each trainer's per-case Dice (box and points)."""
    panels = [*report["classes"], OVERALL]
    trainers = report["trainers"]
    fig, axes = figure(2.5 + 3.0 * len(panels), 1.2 + 0.5 * len(trainers), ncols=len(panels), sharey=True,
                       squeeze=False)
    positions = range(1, len(trainers) + 1)
    for ax, c in zip(axes[0], panels):
        values = []
        for t in trainers:
            dice = (case_dice(d, c) for d in report["per_case"][t].values())
            values.append([v for v in dice if not math.isnan(v)])
        ax.boxplot(values, positions=list(positions), orientation="horizontal", showfliers=False, widths=0.6)
        for i, v in zip(positions, values):
            ax.scatter(v, [i] * len(v), s=10, alpha=0.6, color="C1", zorder=3)
        ax.set_title("foreground mean" if c == OVERALL else f"class {c}", fontsize=10)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("Dice per case")
    axes[0][0].set_yticks(list(positions), trainers)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{report['dataset']} {report['configuration']} ({report['plans']}): validation Dice per case")
    fig.savefig(path, dpi=120)


def add_arguments(parser) -> None:
    add_dataset_options(parser)
    parser.add_argument("-tr", "--trainers", nargs="+",
                        help="default: every trainer with results for the configuration")
    parser.add_argument("--baseline", help="default: nnUNetTrainer if it has results, else the first trainer")
    parser.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add_output_option(parser)


def main(args) -> int:
    report = compare_trainers(args.dataset, args.configuration, args.trainers, args.baseline, args.plans,
                                      args.folds)
    print(f"{report['dataset']} {args.configuration} ({args.plans}): validation Dice per fold (nnU-Net's "
          f"summary.json); baseline {report['baseline']}")
    print(text_table(comparison_table(report)))
    for note in report["notes"]:
        print(note)
    paths = output_paths(args.output, f"compare_{report['dataset']}_{args.plans}_{args.configuration}",
                         ("md", "csv", "png"))
    paths["md"].write_text(markdown_report(report))
    write_csv(paths["csv"], records(report, ("dataset", "configuration", "plans", "baseline")))
    per_case_chart(report, paths["png"])
    written(paths)
    return 0
