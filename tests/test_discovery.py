"""Stock nnU-Net finds our trainers through `nnunet-ext env`, as the very classes of nnunet_ext."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


from nnunet_ext import discovery
from nnunet_ext.registry import ARCHITECTURES

TRAINERS = [t for a in ARCHITECTURES.values() for t in a.trainer_names()]


def run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (as nnUNetv2_train would start) with nnUNet_extTrainer set."""
    full_env = {**os.environ, discovery.ENV_VAR: discovery.env_value(""), **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_nnunet_lookup_returns_our_class_which_pickles():
    """Every generated trainer, looked up by name as nnUNetv2_train does, in one fresh interpreter (one per trainer
    took 4 s each, 116 of them)."""
    out = run_python(f"""
        import pickle, sys
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        for trainer in {TRAINERS!r}:
            found = recursive_find_trainer_class_by_name(trainer)  # the first one imports nnunet_ext through nnU-Net
            assert "nnunet_ext_trainers" not in sys.modules  # nnU-Net dropped the thin module...
            import nnunet_ext.trainers as ours
            assert found is getattr(ours, trainer), (found, found.__module__)  # ...our class stayed
            assert pickle.loads(pickle.dumps(found)) is found
            assert pickle.loads(pickle.dumps(found.build_network_architecture)) == found.build_network_architecture
            print("FOUND", found.__module__, found.__qualname__)
    """)
    missing = [t for t in TRAINERS if f"FOUND nnunet_ext.trainers {t}\n" not in out]
    assert not missing, missing


def test_missing_optional_dependencies_do_not_break_the_lookup():
    """With the optional CUDA packages unimportable, every trainer is still found and builds."""
    out = run_python("""
        import sys
        for name in ("mamba_ssm", "causal_conv1d"):
            sys.modules[name] = None  # any import of it raises ImportError
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunet_ext.registry import ARCHITECTURES
        for arch in ARCHITECTURES.values():
            assert recursive_find_trainer_class_by_name(arch.trainer).architecture == arch.name
        print("ALL FOUND")
    """)
    assert "ALL FOUND" in out


def test_the_registry_the_networks_and_the_commands_import_no_optional_package():
    out = run_python("""
        import sys, torch
        from torch import nn
        sys.path.insert(0, "tests")
        from conftest import TOPOLOGIES
        from nnunet_ext.registry import ARCHITECTURES
        from nnunet_ext.tools.cli import COMMANDS, command_module
        for command in COMMANDS:
            command_module(command)
        for topology, channels in TOPOLOGIES.values():
            for arch in ARCHITECTURES.values():
                if topology.dim in arch.dims:
                    arch.build(topology, channels, 2)
        print(sorted(m for m in ("torchvision", "timm", "mamba_ssm", "causal_conv1d") if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_env_line_keeps_other_folders_and_is_idempotent(tmp_path):
    ours = str(discovery.trainer_search_dir())
    other = str(tmp_path)
    assert discovery.env_value("") == ours
    assert discovery.env_value(other) == os.pathsep.join([ours, other])
    assert discovery.env_value(os.pathsep.join([other, ours])) == os.pathsep.join([ours, other])
    shell = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m nnunet_ext.tools.cli env)"; '
                                          'echo "$nnUNet_extTrainer"'],
                           env={**os.environ, discovery.ENV_VAR: other}, text=True, capture_output=True)
    assert shell.stdout.strip() == os.pathsep.join([ours, other]), shell.stderr


def test_unknown_trainer_name_says_where_nnunet_looked():
    proc = subprocess.run([sys.executable, "-c", "from nnunetv2.utilities.find_objects import "
                           "recursive_find_trainer_class_by_name as f; f('nnUNetTrainerAttentionUNett')"],
                          env={**os.environ, discovery.ENV_VAR: discovery.env_value("")},
                          text=True, capture_output=True)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer nnUNetTrainerAttentionUNett" in proc.stderr
    assert str(discovery.trainer_search_dir()) in proc.stderr
