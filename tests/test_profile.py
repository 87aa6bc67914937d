"""`nnunet-ext profile`: per-operator shares of a training step's and a patch prediction's wall time."""

from __future__ import annotations

import time

import torch

from nnunet_ext.tools.cli import main
from nnunet_ext.tools.profile_step import OUTSIDE, profile_call


def test_operators_and_what_runs_outside_them_share_the_wall_time():
    conv, x = torch.nn.Conv2d(4, 8, 3), torch.randn(2, 4, 64, 64)

    def work():
        with torch.no_grad():
            conv(x)
        time.sleep(0.05)  # what no operator accounts for, like Python between operators

    result = profile_call(work, torch.device("cpu"), top=3)
    *operations, outside = result["operations"]
    assert len(operations) == 3 and outside["operation"] == OUTSIDE
    assert outside["seconds"] >= 0.05 and outside["share"] == outside["seconds"] / result["wall_seconds"]
    assert [r["seconds"] for r in operations] == sorted((r["seconds"] for r in operations), reverse=True)
    assert any("conv" in r["operation"] for r in operations)
    assert sum(r["share"] for r in result["operations"]) <= 1.0 + 1e-6


def test_profile_command_prints_and_writes_both_passes(nnunet_env, tmp_path, capsys):
    assert main(["profile", "-d", nnunet_env.dataset, "-c", "2d", "-a", "ukan", "--reference", "--top", "4",
                 "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("nnU-Net", "ukan"):
        for kind in ("training", "inference"):
            assert f"{name}, {kind} (2d, patch (" in out
    assert out.count(OUTSIDE) == 4
    markdown = next(tmp_path.glob("profile_*_2d_cpu.md")).read_text()
    assert markdown.count("| operation | calls | self time | share |") == 4
    assert main(["profile", "-d", nnunet_env.dataset, "--top", "0"]) == 1
    assert "--top 0: list at least one operator" in capsys.readouterr().err
