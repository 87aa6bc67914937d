"""The benchmarks compare like with like and their commands print complete tables (no timing asserts)."""

from __future__ import annotations

import torch

from nnunet_ext import benchmark as bm
from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.cli import main
from test_cli import cli


def test_the_three_scans_compute_the_same_thing():
    t = bm.scan_inputs(bm.ScanShape("tiny", rows=2, d_inner=6, length=37, d_state=5), "cpu")
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    ours = selective_scan_fn(*args)
    torch.testing.assert_close(bm.mambapy_selective_scan(*args), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bm.selective_scan_loop(*args)[0], ours, rtol=1e-4, atol=1e-5)


def test_scan_benchmark_times_every_implementation():
    shapes = (bm.ScanShape("tiny", rows=2, d_inner=4, length=50, d_state=4),)
    rows = bm.benchmark_scan(shapes, repeats=1, progress=lambda _: None)
    assert [r["shape"] for r in rows] == ["tiny"]
    assert all(rows[0][k] > 0 for k in ("ours", "loop", "mambapy"))


def test_benchmark_command_compares_with_nnunets_network_and_primus(planned):
    out = cli("benchmark", "-d", "999", "-c", "3d_fullres", "--repeats", "1", env=planned.env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "patch (" in lines[0] and "batch 2" in lines[0]
    assert lines[1].split()[:6] == ["network", "parameters", "GMACs/patch", "vs", "nnU-Net", "train"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"nnU-Net", "Primus-B", *ARCHITECTURES}  # the tiny 3d plans' patch divides by 8
    assert rows["nnU-Net"][4] == rows["nnU-Net"][7] == "1.00x"  # the reference row's MACs and time ratios
    assert all(float(r[3]) > 0 for r in rows.values())
    assert "architecture 'nope'" in cli("benchmark", "-d", "999", "-a", "nope", env=planned.env()).stderr


def test_benchmark_leaves_primus_out_of_2d_plans_and_says_why(planned):
    out = cli("benchmark", "-d", "999", "-c", "2d", "-a", "vit_hybrid", "--repeats", "1", env=planned.env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[3:-1]] == ["nnU-Net", "vit_hybrid"]
    assert lines[-1] == "Primus-B left out: Primus is 3D only."


def test_deform_conv_benchmark_measures_every_implementation():
    shapes = (bm.DeformShape("tiny 2D", 1, 4, (8, 8), 3, depthwise=True), bm.DeformShape("tiny 3D", 1, 2, (4, 4, 4), 3))
    rows = bm.benchmark_deform_conv(shapes, repeats=1, progress=lambda _: None)
    assert [r["shape"] for r in rows] == ["tiny 2D", "tiny 3D"]
    assert all(rows[0][k]["seconds"] > 0 and rows[0][k]["peak_bytes"] >= 0 for k in ("ours", "unfused", "torchvision"))
    assert rows[1]["torchvision"] is None and rows[1]["ours"]["seconds"] > 0


def test_benchmark_dlka_command_prints_both_tables(monkeypatch, capsys):
    monkeypatch.setattr(bm, "DEFORM_SHAPES", (bm.DeformShape("tiny 2D", 1, 4, (8, 8), 3, depthwise=True),
                                              bm.DeformShape("tiny 3D", 1, 2, (4, 4, 4), 3)))
    assert main(["benchmark-dlka", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Deformable convolution, forward+backward")
    assert [line.split()[:2] for line in out[3:5]] == [["tiny", "2D"], ["tiny", "3D"]]
    assert out[4].split()[7] == "-"  # no torchvision in 3D
    papers = {line.split(" (")[0]: line for line in out[8:]}
    assert set(papers) == {"paper", "paper's text", "official code"}
    assert "42.35 M" in papers["paper"] and "66.96" in papers["paper"]


def test_the_three_kan_linears_compute_the_same_thing():
    from nnunet_ext.blocks.kan import KANLinear

    torch.manual_seed(0)
    layer, x = KANLinear(6, 5), torch.randn(30, 6) * 1.5
    outputs = [bm._kan_linear_forward(name, layer, x) for name in bm.KAN_IMPLEMENTATIONS]
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-5)


def test_benchmark_kan_command_prints_every_implementation(monkeypatch, capsys):
    monkeypatch.setattr(bm, "KAN_SHAPES", (bm.KANShape("tiny", 16, 4), bm.KANShape("tiny wide", 8, 12)))
    assert main(["benchmark-kan", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("KANLinear (grid 5, order 3), forward+backward")
    assert out[1].split()[:5] == ["KANLinear", "input", "ours", "recursion", "per"]
    rows = [line.split() for line in out[3:]]
    assert [r[:2] for r in rows] == [["tiny", "16x4"], ["tiny", "wide"]]
    assert all(r.count("MB") == 3 and sum(v.endswith("x") for v in r) == 2 for r in rows)
