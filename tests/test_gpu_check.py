"""`nnunet-ext gpu-check`, the GPU acceptance run, as CI runs it: --device cpu --quick.

The whole command (training steps, compile, peaks, the scan checks, both reports) for one
architecture and configuration, nnU-Net's PlainConvUNet beside it. Its cases join the `compile`
rotation of tests/test_compile.py, one case per run between them (a case takes one to three minutes
on two cores); --full-matrix runs every case, as `nnunet-ext gpu-check --device cpu --quick` does in
4 to 5 minutes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nnunet_ext.memory_models import REFERENCE
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.tools import gpu_check
from nnunet_ext.tools.cli import main

CASES = [(name, configuration) for name, arch in ARCHITECTURES.items()
         for configuration, (patch, _) in gpu_check.QUICK_PLANS.items() if len(patch) in arch.dims]


@pytest.mark.parametrize("name,configuration", [
    pytest.param(n, c, marks=pytest.mark.matrix("compile", f"gpu-check-{n}-{c}", group="compile"), id=f"{n}-{c}")
    for n, c in CASES])
def test_the_quick_cpu_run_checks_every_part_and_writes_both_reports(name, configuration, tmp_path, capsys):
    assert main(["gpu-check", "--device", "cpu", "--quick", "-a", name, "-c", configuration, "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())
    assert report["passed"] and report["autocast"] == "bfloat16" and report["compile_backend"] == "aot_eager"
    reference, row = report["networks"]
    assert (reference["network"], row["network"]) == (REFERENCE, name)
    assert row["configuration"] == configuration and row["steps"] == 4
    assert math.isfinite(row["last_loss"]) and row["last_loss"] < row["first_loss"]
    assert row["peak_bytes"] > 0 and row["peak_vs_nnunet"] == row["peak_bytes"] / reference["peak_bytes"]
    assert row["estimated_peak_vs_nnunet"] > 0
    compiled = row["compile"]
    if ARCHITECTURES[name].compile_off:
        assert compiled == {"status": "off", "reason": ARCHITECTURES[name].compile_off}
    else:  # the same weights and batch: aot_eager computes what eager does
        assert compiled["status"] == "ok" and compiled["first_loss_difference"] <= 1e-6
    for scan in report["scan"]:
        assert scan["path"] == "compiled CPU scan" and scan["kernels_vs_pytorch"] is None
        assert scan["error_vs_float64"] < 1e-5 and scan["pytorch_error_vs_float64"] < 1e-5
    markdown = (tmp_path / "gpu_check_cpu_quick.md").read_text()
    assert markdown in capsys.readouterr().out and "PASSED" in markdown
    assert f"| {configuration} | {name} |" in markdown


def test_each_failure_is_named():
    row = {"finite": False, "loss_falls": False, "first_loss": 1.0, "last_loss": 1.5,
           "compile": {"status": "differs", "first_loss_difference": 0.1}, "peak_vs_nnunet": 3.0,
           "estimated_peak_vs_nnunet": 2.0}
    assert gpu_check.failures(row, judge_memory=True) == [
        "a loss is not finite", "the loss did not fall (1.0000 -> 1.5000)", "compiled loss 1.0e-01 off eager's",
        "peak 3.00x nnU-Net's, the memory model promises 2.00x"]
    assert len(gpu_check.failures(row, judge_memory=False)) == 3  # the quick run does not judge memory
    within = {**row, "finite": True, "loss_falls": True, "compile": {"status": "off"}, "peak_vs_nnunet": 2.4}
    assert gpu_check.failures(within, judge_memory=True) == []


def test_a_compile_failure_is_reported_and_the_run_goes_on(monkeypatch):
    def broken(self, backend):
        def model(x):
            raise RuntimeError("InductorError: cannot determine truth value of Relational")
        self.model = model

    monkeypatch.setattr(gpu_check.Training, "compile", broken)
    result = gpu_check._compile_check("vit_hybrid", "2d", torch.device("cpu"), True, 1.0, "inductor")
    assert result == {"status": "failed", "backend": "inductor",
                      "error": "RuntimeError: InductorError: cannot determine truth value of Relational"}
    row = {"finite": True, "loss_falls": True, "compile": result, "peak_vs_nnunet": 1.0}
    assert gpu_check.failures(row, judge_memory=False) == [
        "torch.compile failed (RuntimeError: InductorError: cannot determine truth value of Relational)"]


def test_too_few_steps_is_a_clear_error(capsys):
    assert main(["gpu-check", "--device", "cpu", "--quick", "--steps", "1"]) == 1
    assert "--steps 1: at least 2" in capsys.readouterr().err
