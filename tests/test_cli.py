"""The `nnunet-ext` command: list, doctor, make-dataset, demo's guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nnunet_ext import discovery
from nnunet_ext.registry import ARCHITECTURES


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnunet_ext.tools.cli", *args], text=True, capture_output=True,
                          env={**os.environ, **(env or {})} if env is not None else os.environ)


def test_list_names_every_architecture_and_trainer():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    for arch in ARCHITECTURES.values():
        assert arch.name in out.stdout and arch.trainer in out.stdout
        assert all(f"{p} ({arch.preset_trainer(p)})" in out.stdout for p in arch.presets)
    assert "official (nnUNetTrainerLKMUNetOfficial)" in out.stdout


def test_doctor_reports_unset_variables_with_the_fix():
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    out = subprocess.run([sys.executable, "-m", "nnunet_ext.tools.cli", "doctor"], text=True, capture_output=True, env=env)
    assert out.returncode == 1
    assert "[FAIL] nnUNet_extTrainer=(unset)" in out.stdout
    assert 'fix: eval "$(nnunet-ext env)"' in out.stdout
    assert "[FAIL] nnUNet_results=(unset)" in out.stdout


def test_doctor_passes_on_a_configured_machine_and_checks_plans(planned):
    out = cli("doctor", "-d", "999", "-c", "3d_fullres", env=planned.env())
    assert out.returncode == 0, out.stdout + out.stderr
    for arch in ARCHITECTURES.values():
        assert f"[ok  ] nnU-Net finds {arch.trainer}" in out.stdout
        assert f"[ok  ] {arch.name} builds" in out.stdout


def test_doctor_names_a_configuration_that_does_not_exist(planned):
    out = cli("doctor", "-d", "999", "-c", "3d_cascade_fullres", env=planned.env())
    assert out.returncode == 1
    assert "Configuration '3d_cascade_fullres' is not in nnUNetPlans.json; available: 2d, 3d_fullres" in out.stdout


def test_doctor_finds_a_shadowing_trainer(planned, tmp_path):
    """Another folder on nnUNet_extTrainer defining our class name first is reported, not ignored."""
    (tmp_path / "shadow.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        f"class {next(iter(ARCHITECTURES.values())).trainer}(nnUNetTrainer):\n    pass\n")
    env = {**planned.env(), discovery.ENV_VAR: os.pathsep.join([str(tmp_path), discovery.env_value("")])}
    out = cli("doctor", env=env)
    assert out.returncode == 1
    assert "but as a different class (shadow)" in out.stdout


def test_make_dataset(tmp_path):
    out = cli("make-dataset", "--raw", str(tmp_path), "--dataset-id", "7", "--dim", "2", "--channels", "2",
              "--shape", "32", "32", "--spacing", "1", "1")
    assert out.returncode == 0, out.stderr
    dataset = json.loads((tmp_path / "Dataset007_Synthetic" / "dataset.json").read_text())
    assert len(dataset["channel_names"]) == 2
    again = cli("make-dataset", "--raw", str(tmp_path), "--dataset-id", "7")
    assert again.returncode == 1 and "already used" in again.stderr


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = cli("demo", "--dir", str(tmp_path))
    assert out.returncode == 2 and "is not an nnunet-ext demo folder" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_help_names_every_command_and_env_stays_light():
    """Only the command that runs is imported: `nnunet-ext env`, in a shell profile, does not load torch."""
    from nnunet_ext.tools.cli import COMMANDS

    out = cli("--help")
    assert out.returncode == 0 and all(command in out.stdout for command in COMMANDS)
    light = subprocess.run([sys.executable, "-c", "import sys; from nnunet_ext.tools.cli import main; main(['env']); "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nnunetv2')))"],
                           text=True, capture_output=True, check=True)
    assert light.stdout.splitlines() == [discovery.env_line(), "[]"]
    unknown = cli("benchmrk")
    assert unknown.returncode == 2 and "invalid choice: 'benchmrk'" in unknown.stderr


def test_every_architecture_option_counts_once():
    """-a given twice adds to the first (argparse would keep only the last), and a name given twice runs once."""
    from nnunet_ext.tools.cli import build_parser
    from nnunet_ext.tools.options import architectures

    args = build_parser("benchmark").parse_args(["benchmark", "-d", "999", "-a", "ukan", "lkm_unet", "-a", "ukan",
                                                 "mednext_s"])
    assert architectures(args) == ["ukan", "lkm_unet", "mednext_s"]
