"""The benchmarks compare like with like and their commands print complete tables (no timing asserts)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
import torch

from conftest import architectures_in_turn
from nnunet_ext.ops import selective_scan_fn
from nnunet_ext.ops.reference import selective_scan_loop
from nnunet_ext.ops.selective_scan import pytorch_paths_only
from nnunet_ext.tools import benchmark as bm, benchmark_dlka, benchmark_kan, benchmark_scan as scan
from nnunet_ext.tools.cli import main
from nnunet_ext.tools.measure import isolated
from test_cli import cli


def test_the_four_scans_compute_the_same_thing():
    t = scan.scan_inputs(scan.ScanShape("tiny", rows=2, d_inner=6, length=37, d_state=5), "cpu")
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    assert scan.scan_path("cpu") == "compiled CPU scan"
    ours = selective_scan_fn(*args)
    with pytorch_paths_only():
        torch.testing.assert_close(selective_scan_fn(*args), ours, rtol=1e-4, atol=1e-5)
    assert scan.scan_path("cpu") == "compiled CPU scan"  # switched back on
    torch.testing.assert_close(scan.mambapy_selective_scan(*args), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(selective_scan_loop(*args)[0], ours, rtol=1e-4, atol=1e-5)


def test_scan_benchmark_times_every_implementation():
    shapes = (scan.ScanShape("tiny", rows=2, d_inner=4, length=50, d_state=4),)
    rows = scan.benchmark_scan(shapes, repeats=1, progress=lambda _: None)
    assert [r["shape"] for r in rows] == ["tiny"]
    assert all(rows[0][k] > 0 for k in ("ours", "pytorch", "loop", "mambapy"))


def test_a_killed_measurement_process_is_an_error_not_a_hang():
    """The CPU measurements run in a fresh process; one that dies (here it exits at once, as when the
    out-of-memory killer takes it) ends the benchmark with a message instead of waiting forever."""
    with pytest.raises(RuntimeError, match=r"the process measuring 9 was killed, most likely for lack of memory "
                                           r"\(\d+ GB of RAM here\)"):
        isolated(os._exit, 9)


def test_benchmark_command_compares_with_nnunets_network_and_primus(planned, tmp_path):
    chosen = architectures_in_turn(2)
    out = cli("benchmark", "-d", "999", "-c", "3d_fullres", "-a", *chosen, "--repeats", "1", "-o", str(tmp_path),
              env=planned.env())
    assert out.returncode == 0, out.stderr
    names = ["nnU-Net", "Primus-B", *chosen]  # the tiny 3d plans' patch divides by 8
    runs = len(names) + 1  # nnU-Net's network timed again at the end
    assert f"[{len(names)}/{runs}] {names[-1]}" in out.stderr and f"[{runs}/{runs}] nnU-Net again" in out.stderr
    lines = out.stdout.splitlines()
    assert "patch (" in lines[0] and "batch 2" in lines[0] and "its PlainConvUNet" in lines[0]
    assert lines[1].split()[:4] == ["network", "parameters", "vs", "nnU-Net"]
    assert [line.split()[0] for line in lines[3:3 + len(names)]] == names
    assert lines[3].count("1.00x") == len(bm.NETWORK_FIGURES)

    stem = tmp_path / f"benchmark_{planned.dataset}_nnUNetPlans_3d_fullres_cpu"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert [r["network"] for r in report["rows"]] == names
    reference = report["rows"][0]
    for key in bm.REFERENCE_TIMES:  # the mean of the two measurements, each a median of its repeats
        assert reference[key] == pytest.approx((reference[f"{key}_first"] + reference[f"{key}_last"]) / 2)
    for r in report["rows"]:
        for key in bm.NETWORK_FIGURES:
            assert r[key] > 0 and r[f"{key}_vs_nnunet"] == pytest.approx(r[key] / reference[key])
        for key, time_key in (("train", "train_seconds"), ("inference", "inference_seconds")):
            expected = (r["flops"] / r[time_key]) / (reference["flops"] / reference[time_key])
            assert r[f"{key}_throughput_vs_nnunet"] == pytest.approx(expected)
    assert lines[1].split()[-4:] == ["throughput,", "training", "throughput,", "inference"]
    assert lines[3].split()[-2:] == ["1.00", "1.00"]
    written = list(csv.DictReader(open(stem.with_suffix(".csv"))))
    assert [(w["network"], float(w["train_seconds"])) for w in written] == \
        [(r["network"], r["train_seconds"]) for r in report["rows"]]
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "architecture 'nope'" in cli("benchmark", "-d", "999", "-a", "nope", env=planned.env()).stderr


def test_benchmark_needs_only_the_plans_and_leaves_primus_out_of_2d(planned, tmp_path):
    plans_only = tmp_path / "preprocessed" / planned.dataset
    plans_only.mkdir(parents=True)
    for name in ("nnUNetPlans.json", "dataset.json"):
        shutil.copy(planned.preprocessed / planned.dataset / name, plans_only)
    env = {**planned.env(), "nnUNet_preprocessed": str(tmp_path / "preprocessed")}
    out = cli("benchmark", "-d", "999", "-c", "2d", "-a", "vit_hybrid", "--repeats", "1", "-o", str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[3:-2]] == ["nnU-Net", "vit_hybrid"]
    assert lines[-2] == "Primus-B left out: Primus is 3D only."
    assert lines[-1].startswith("Written: ")


def test_rounds_report_the_median_of_each_rounds_ratios(planned, monkeypatch, tmp_path, capsys):
    """With --rounds, every network's ratio is the median of its rounds' ratios, each against the reference
    times of its own round (not the ratio of the medians), and the table shows the rounds' range. The
    measurements are stand-ins: seconds per (round, network), nnU-Net's twice per round."""
    seconds = {1: {"nnU-Net": [1.0, 1.0], "vit_hybrid": [3.0]}, 2: {"nnU-Net": [2.0, 2.0], "vit_hybrid": [2.0]},
               3: {"nnU-Net": [3.0, 5.0], "vit_hybrid": [8.0]}}
    calls = []

    def measured(function, name, *args, device):
        assert function is bm._measure_network and device == "cpu"
        calls.append(name)
        round_ = 1 + sum(c == "nnU-Net" for c in calls[:-1]) // 2
        t = seconds[round_][name].pop(0)
        return {"network": name, "parameters": 10, "flops": 2e9 if name == "vit_hybrid" else 1e9,
                "train_seconds": t, "inference_seconds": t / 10, "peak_bytes": 100 * round_}

    monkeypatch.setattr(bm, "isolated", measured)
    monkeypatch.setenv("nnUNet_preprocessed", str(planned.preprocessed))
    assert main(["benchmark", "-d", planned.dataset, "-c", "2d", "-a", "vit_hybrid", "--repeats", "1",
                 "--rounds", "3", "-o", str(tmp_path)]) == 0
    assert calls == ["nnU-Net", "vit_hybrid", "nnU-Net"] * 3
    report = json.loads((tmp_path / f"benchmark_{planned.dataset}_nnUNetPlans_2d_cpu.json").read_text())
    assert report["rounds"] == 3 and len(report["round_rows"]) == 3
    reference, network = report["rows"]
    # the rounds' times: vit_hybrid 3, 2, 8 s against nnU-Net's means 1, 2, 4 s: ratios 3, 1, 2
    assert [rows[1]["train_seconds_vs_nnunet"] for rows in report["round_rows"]] == [3.0, 1.0, 2.0]
    assert network["train_seconds_vs_nnunet"] == 2.0  # the ratio of the medians would be 3 / 2
    assert network["train_seconds"] == 3.0 and reference["train_seconds"] == 2.0
    assert reference["train_seconds_first"] == 2.0 and reference["train_seconds_last"] == 2.0  # (3 + 5) / 2 is 4
    assert network["train_throughput_vs_nnunet"] == 1.0  # 2x the FLOPs: 2 / 3, 2, 1
    assert network["peak_bytes"] == 200 and network["flops_vs_nnunet"] == 2.0
    out = capsys.readouterr().out.splitlines()
    assert "median of 3 rounds (their range)" in out[0]
    cells = out[4].split()
    assert cells[0] == "vit_hybrid" and "2.00x" in cells and "1.50x" not in cells  # the median ratio, as above
    assert cells[-4:] == ["1.00", "(0.67-2.00)"] * 2 and out[3].split()[-4:] == ["1.00", "(1.00-1.00)"] * 2


def test_counts_must_be_whole_numbers_of_at_least_one(capsys):
    for command, option, value in (("benchmark", "--repeats", "0"), ("benchmark", "--rounds", "-2"),
                                   ("benchmark", "--rounds", "two"), ("benchmark-scan", "--repeats", "0"),
                                   ("gpu-check", "--steps", "0")):
        with pytest.raises(SystemExit) as stopped:
            main([command, option, value] + (["-d", "999"] if command == "benchmark" else []))
        assert stopped.value.code == 2
        assert f"argument {option}: '{value}' is not a whole number of at least 1" in capsys.readouterr().err


def test_flop_count_is_two_per_multiply_accumulate_of_every_convolution():
    """forward_flops against a count from the layers' shapes (forward hooks) on nnU-Net's U-Net."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(2, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), conv_bias=True,
                        deep_supervision=True)
    x = torch.randn(1, 2, 8, 12, 16)
    expected = []

    def count(module, inputs, output):
        kernel = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.ConvTranspose3d):  # every input voxel scatters into a kernel
            expected.append(2 * inputs[0].numel() * module.out_channels // module.groups * kernel)
        else:
            expected.append(2 * output.numel() * module.in_channels // module.groups * kernel)

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(count)
    with torch.no_grad():
        net(x)
    from_shapes = sum(expected)  # before forward_flops runs the hooks again
    assert bm.forward_flops(net, x) == from_shapes


def test_flop_count_includes_both_products_of_every_attention():
    """Fused attention kernels have no formula in torch's counter (on CPU it would count nothing): the count
    is the two products of softmax(Q K^T) V at their own widths, for ours (v wider than q and k, which the
    CPU path pads for its kernel) and for the transformer's multi-head attention."""
    from nnunet_ext.blocks.attention import NonLocalSelfAttention
    from nnunet_ext.blocks.transformer import MultiHeadSelfAttention

    block, x = NonLocalSelfAttention(torch.nn.Conv2d, channels=16, reduction=8), torch.randn(1, 16, 6, 7)
    n, projections = 42, 2 * 42 * 16 * (2 + 2 + 16)  # 1x1 query, key (2 channels) and value convolutions
    assert bm.forward_flops(block, x) == projections + 2 * n * n * 2 + 2 * n * n * 16
    heads, width, n = 4, 32, 20
    linear = 2 * n * width * 3 * width + 2 * n * width * width
    assert bm.forward_flops(MultiHeadSelfAttention(width, heads), torch.randn(1, n, width)) \
        == linear + 2 * 2 * heads * n * n * (width // heads)


def test_deform_conv_benchmark_measures_every_implementation():
    shapes = (benchmark_dlka.DeformShape("tiny 2D", 1, 4, (8, 8), 3, depthwise=True),
              benchmark_dlka.DeformShape("tiny 3D", 1, 2, (4, 4, 4), 3))
    rows = benchmark_dlka.benchmark_deform_conv(shapes, repeats=1, progress=lambda _: None)
    assert [r["shape"] for r in rows] == ["tiny 2D", "tiny 3D"]
    assert all(rows[0][k]["seconds"] > 0 and rows[0][k]["peak_bytes"] >= 0 for k in ("ours", "unfused", "torchvision"))
    assert rows[1]["torchvision"] is None and rows[1]["ours"]["seconds"] > 0


def test_benchmark_dlka_command_prints_both_tables(monkeypatch, capsys):
    shapes = (benchmark_dlka.DeformShape("tiny 2D", 1, 4, (8, 8), 3, depthwise=True),
              benchmark_dlka.DeformShape("tiny 3D", 1, 2, (4, 4, 4), 3))
    monkeypatch.setattr(benchmark_dlka, "DEFORM_SHAPES", shapes)
    assert main(["benchmark-dlka", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Deformable convolution, forward+backward")
    assert [line.split()[:2] for line in out[3:5]] == [["tiny", "2D"], ["tiny", "3D"]]
    assert out[4].split()[7] == "-"  # no torchvision in 3D
    papers = {line.split("  ")[0].split(" (")[0]: line for line in out[8:]}
    assert set(papers) == {"paper", "paper's text", "ours, official preset"}
    assert "42.35 M" in papers["paper"] and "66.96" in papers["paper"] and "42.35 M" in papers["ours, official preset"]


def test_the_three_kan_linears_compute_the_same_thing():
    from nnunet_ext.blocks.kan import KANLinear

    torch.manual_seed(0)
    layer, x = KANLinear(6, 5), torch.randn(30, 6) * 1.5
    outputs = [benchmark_kan._kan_linear_forward(name, layer, x) for name in benchmark_kan.KAN_IMPLEMENTATIONS]
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-5)


def test_benchmark_kan_command_prints_every_implementation(monkeypatch, capsys):
    monkeypatch.setattr(benchmark_kan, "KAN_SHAPES", (benchmark_kan.KANShape("tiny", 16, 4),
                                                      benchmark_kan.KANShape("tiny wide", 8, 12)))
    assert main(["benchmark-kan", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("KANLinear (grid 5, order 3), forward+backward")
    assert out[1].split()[:5] == ["KANLinear", "input", "ours", "recursion", "per"]
    rows = [line.split() for line in out[3:]]
    assert [r[:2] for r in rows] == [["tiny", "16x4"], ["tiny", "wide"]]
    assert all(r.count("MB") == 3 and sum(v.endswith("x") for v in r) == 2 for r in rows)


def test_benchmark_commands_refuse_a_device_torch_cannot_use(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        main(["benchmark", "-d", "999", "--device", "cuda"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "cuda is not available to torch" in err and "use --device cpu" in err
