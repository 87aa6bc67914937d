"""`nnunet-ext compare` on results folders written by real short trainings of two architectures: its
per-fold figures are nnU-Net's own, its statistics match independent computations, and missing
folds, missing trainers and NaN Dice are handled as nnU-Net users expect."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from test_cli import cli

pytestmark = pytest.mark.e2e

from conftest import CROSS_VALIDATED, CROSS_VALIDATION_CONFIGURATION as CONFIGURATION

A, B = CROSS_VALIDATED


def summary(ws, trainer, fold, results=None) -> dict:
    folder = ws.fold_dir(ws.dataset, trainer, CONFIGURATION, fold)
    folder = results / folder.relative_to(ws.results) if results else folder
    return json.loads((folder / "validation" / "summary.json").read_text())


def run_compare(ws, tmp_path, *args, results=None):
    env = {**ws.env(), **({"nnUNet_results": str(results)} if results else {})}
    out = cli("compare", "-d", "999", "-c", CONFIGURATION, "-o", str(tmp_path), *args, env=env)
    rows = {}
    csv_file = tmp_path / f"compare_{ws.dataset}_nnUNetPlans_{CONFIGURATION}.csv"
    if out.returncode == 0:
        rows = {(r["trainer"], r["class"]): r for r in csv.DictReader(open(csv_file))}
    return out, rows


def exact_wilcoxon_p(differences) -> float:
    """Two-sided p of the signed-rank statistic by enumerating every sign assignment (no ties)."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[np.asarray(differences) > 0].sum()
    centre = ranks.sum() / 2
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(ranks))]
    return float(np.mean([abs(t - centre) >= abs(observed - centre) - 1e-9 for t in totals]))


def test_compare_reports_nnunets_fold_means_and_a_paired_test(cross_validated, tmp_path):
    ws = cross_validated
    out, rows = run_compare(ws, tmp_path, "-tr", A, B, "--baseline", A)
    assert out.returncode == 0, out.stderr

    # Per fold: exactly the per-class and foreground means nnU-Net wrote.
    for trainer, folds in ((A, (0, 1)), (B, (0,))):
        for fold in folds:
            s = summary(ws, trainer, fold)
            for c in ("1", "2"):
                assert float(rows[trainer, c][f"fold_{fold}"]) == pytest.approx(s["mean"][c]["Dice"], abs=1e-12)
            foreground_mean = s["foreground_mean"]["Dice"]
            assert float(rows[trainer, "mean"][f"fold_{fold}"]) == pytest.approx(foreground_mean, abs=1e-12)
    # Across folds: the mean and sample standard deviation of the fold means; one fold has no spread.
    fold_means = [summary(ws, A, f)["foreground_mean"]["Dice"] for f in (0, 1)]
    assert float(rows[A, "mean"]["mean"]) == pytest.approx(np.mean(fold_means))
    assert float(rows[A, "mean"]["std"]) == pytest.approx(np.std(fold_means, ddof=1))
    assert rows[A, "1"]["cases"] == str(2 * len(summary(ws, A, 0)["metric_per_case"]))
    assert rows[B, "mean"]["fold_1"] == "" and math.isnan(float(rows[B, "mean"]["std"]))
    assert f"{B}: fold(s) 1, 2, 3, 4 missing" in out.stdout and f"{A}: fold(s) 2, 3, 4 missing" in out.stdout

    # Paired: B - A on the cases both validated (fold 0), matched by file name.
    a_cases = {c["reference_file"]: c["metrics"] for c in summary(ws, A, 0)["metric_per_case"]}
    differences = [c["metrics"]["1"]["Dice"] - a_cases[c["reference_file"]]["1"]["Dice"]
                   for c in summary(ws, B, 0)["metric_per_case"]]
    assert rows[B, "1"]["pairs_vs_baseline"] == str(len(differences))
    assert float(rows[B, "1"]["mean_difference_vs_baseline"]) == pytest.approx(np.mean(differences))
    assert float(rows[B, "1"]["p_value_vs_baseline"]) == pytest.approx(exact_wilcoxon_p(differences))
    assert rows[A, "1"]["pairs_vs_baseline"] == ""  # the baseline is not compared with itself

    table = out.stdout.splitlines()
    assert table[1].split()[:4] == ["trainer", "class", "fold", "0"]
    assert [line.split()[:2] for line in table[3:9]] == [[t, c] for t in (A, B) for c in ("1", "2", "mean")]
    assert table[3].split()[2:5] == [f"{summary(ws, A, 0)['mean']['1']['Dice']:.4f}",
                                     f"{summary(ws, A, 1)['mean']['1']['Dice']:.4f}", "missing"]
    markdown = (tmp_path / f"compare_{ws.dataset}_nnUNetPlans_{CONFIGURATION}.md").read_text()
    assert f"| {B} | mean |" in markdown and "Baseline: " + A in markdown
    png = (tmp_path / f"compare_{ws.dataset}_nnUNetPlans_{CONFIGURATION}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_compare_handles_nan_dice_as_nnunet_does(cross_validated, tmp_path):
    """A class absent from a case's reference and prediction gets Dice NaN from nnU-Net's evaluation,
    which the fold mean skips; the paired test drops that case for that class only."""
    ws = cross_validated
    results = tmp_path / "results"  # a copy: the other tests keep nnU-Net's original summaries
    shutil.copytree(ws.results, results)
    validation = results / ws.fold_dir(ws.dataset, A, CONFIGURATION, 0).relative_to(ws.results) / "validation"
    reference = ws.preprocessed / ws.dataset / "gt_segmentations"
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    refs.mkdir(), preds.mkdir()
    cases = sorted(p.name for p in validation.glob("*.nii.gz"))
    for i, case in enumerate(cases):
        for source, target in ((reference, refs), (validation, preds)):
            image = sitk.ReadImage(str(source / case))
            if i == 0:  # label 2 becomes 1: class 2 is in neither the reference nor the prediction
                array = sitk.GetArrayFromImage(image)
                array[array == 2] = 1
                image = _copy_geometry(array, image)
            sitk.WriteImage(image, str(target / case))
    ws.run("nnUNetv2_evaluate_simple", refs, preds, "-l", "1", "2", "-o", validation / "summary.json", "-np", "1")
    s = summary(ws, A, 0, results)
    assert math.isnan(s["metric_per_case"][0]["metrics"]["2"]["Dice"])

    out, rows = run_compare(ws, tmp_path / "report", "-tr", A, B, "--baseline", B, "-f", "0", results=results)
    assert out.returncode == 0, out.stderr
    assert float(rows[A, "2"]["fold_0"]) == pytest.approx(s["mean"]["2"]["Dice"], abs=1e-12)
    assert float(rows[A, "mean"]["fold_0"]) == pytest.approx(s["foreground_mean"]["Dice"], abs=1e-12)
    assert rows[A, "2"]["cases"] == str(len(cases) - 1) and rows[A, "1"]["cases"] == str(len(cases))
    assert rows[A, "2"]["pairs_vs_baseline"] == str(len(cases) - 1)
    assert rows[A, "mean"]["pairs_vs_baseline"] == str(len(cases))  # the case's mean over its defined class
    assert "missing" not in out.stdout  # -f 0: only fold 0 was asked for


def _copy_geometry(array, like):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def test_compare_names_trainers_without_results(cross_validated, tmp_path):
    ws = cross_validated
    out, rows = run_compare(ws, tmp_path, "-tr", A, "nnUNetTrainerNotTrained")
    assert out.returncode == 0, out.stderr
    assert "nnUNetTrainerNotTrained: no validated fold in" in out.stdout
    assert {t for t, _ in rows} == {A}

    out, _ = run_compare(ws, tmp_path, "--baseline", "nnUNetTrainerNotTrained")
    assert out.returncode == 1
    assert "The baseline nnUNetTrainerNotTrained has no validated fold" in out.stderr
    assert f"Trainers with results: {A}, {B}" in out.stderr  # found without -tr

    out, _ = run_compare(ws, tmp_path, "-c", "2d")
    assert out.returncode == 1 and "No trainer has results for 2d" in out.stderr
