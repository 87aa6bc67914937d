"""The registry is the one source of every architecture: its entries make the trainers, presets, options
and memory models; a sixth architecture is one network module and one entry; the package's imports
have no cycle and the library never imports its tools."""

from __future__ import annotations

import ast
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_ext.trainers as trainers
from nnunet_ext.errors import ConfigurationError
from nnunet_ext.registry import ARCHITECTURES, SCHEDULES, Architecture, register
from nnunet_ext.trainers.base import nnUNetExtTrainer

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nnunet_ext"


def entry(**fields) -> Architecture:
    defaults = dict(name="probe", trainer="nnUNetTrainerProbe", dims=(2, 3), summary="", reference="",
                    network="nnunet_ext.networks.attention_unet:AttentionUNet")
    return Architecture(**{**defaults, **fields})


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_entry_makes_its_trainers(name):
    arch = ARCHITECTURES[name]
    trainer = getattr(trainers, arch.trainer)
    assert trainer.architecture == name and issubclass(trainer, arch.recipe_class())
    assert issubclass(trainer, nnUNetExtTrainer) and trainer.__module__ == "nnunet_ext.trainers"
    for preset, options in arch.presets.items():
        preset_trainer = getattr(trainers, arch.preset_trainer(preset))
        assert issubclass(preset_trainer, trainer) and preset_trainer.network_options == dict(options)
        assert set(options) <= set(arch.options())
    for base in arch.trainers():
        for suffix, schedule in SCHEDULES.items():
            short = getattr(trainers, f"{base}_{suffix}")
            assert short.__bases__ == (getattr(trainers, base),)
            assert f"{schedule.epochs} epoch(s) of {schedule.iterations}" in short.__doc__
    assert set(arch.trainer_names()) <= set(trainers.__all__)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_options_and_their_defaults_come_from_the_network_constructor(name):
    import inspect

    arch = ARCHITECTURES[name]
    signature = inspect.signature(arch.network_class())
    expected = {p: v.default for p, v in signature.parameters.items()
                if p not in ("topology", "input_channels", "num_classes", "deep_supervision")}
    assert arch.options() == expected and expected


def test_entries_that_cannot_work_are_refused_when_registered():
    for fields, message in (({"name": "Probe"}, "name 'Probe' must be a lower-case identifier"),
                            ({"trainer": "ProbeTrainer"}, "must be an identifier starting with nnUNetTrainer"),
                            ({"dims": (1,)}, "dims (1,) must name 2, 3 or both"),
                            ({"network": "nnunet_ext.networks.attention_unet.Net"}, "must read 'module:Class'"),
                            ({"presets": {"Official": {}}}, "preset name 'Official'"),
                            ({"official_weights": "nnunet_ext.networks.lkm_unet:from_official"},
                             "official_weights needs an 'official' preset to load into")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            entry(**fields)
    with pytest.raises(ValueError, match="'attention_unet' is registered twice"):
        register(entry(name="attention_unet"))
    with pytest.raises(ValueError, match="trainer nnUNetTrainerLKMUNet is already lkm_unet's"):
        register(entry(trainer="nnUNetTrainerLKM", presets={"u_net": {}}))
    assert "probe" not in ARCHITECTURES


def test_what_an_entry_needs_is_named_where_it_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ImportError, match="Architecture 'probe' names 'nnunet_ext.networks.nope:Net', which cannot be "
                                          "imported"):
        entry(network="nnunet_ext.networks.nope:Net").options()
    with pytest.raises(ImportError, match="Architecture 'probe' names 'nnunet_ext.trainers.recipes:Nope'"):
        entry(recipe="nnunet_ext.trainers.recipes:Nope").recipe_class()
    (tmp_path / "probe_networks.py").write_text(
        "class NoDefault:\n    def __init__(self, topology, input_channels, num_classes, deep_supervision, width):\n"
        "        pass\n\n\nclass Unusual:\n    def __init__(self, topology, channels, num_classes, deep_supervision):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=r"every option needs a default in the signature; \['width'\] have none"):
        entry(network="probe_networks:NoDefault").options()
    with pytest.raises(TypeError, match="must take topology, input_channels, num_classes, deep_supervision first"):
        entry(network="probe_networks:Unusual").options()


def test_presets_name_their_trainers():
    arch = entry(presets={"official": {}, "paper_text": {}})
    assert arch.trainers() == ["nnUNetTrainerProbe", "nnUNetTrainerProbeOfficial", "nnUNetTrainerProbePaperText"]
    assert arch.trainer_names()[3:6] == [f"nnUNetTrainerProbe_{s}" for s in SCHEDULES]
    assert ARCHITECTURES["lkm_unet"].plans_name(24) == "nnUNetPlans_LKMUNet_24G"


def test_configuration_errors_say_whether_the_plans_or_an_option_are_at_fault():
    assert str(ConfigurationError("too few stages")) == "Plans: too few stages"
    error = ConfigurationError("must be at least 1", "depth")
    assert str(error) == "Option 'depth': must be at least 1" and error.option == "depth"
    assert isinstance(error, ValueError)


def _imports(path: Path) -> set[str]:
    """The nnunet_ext modules a module imports anywhere in it (functions included), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from package import submodule` imports the submodule
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _module_file(candidate) else node.module)
    return {name for name in found if name.split(".")[0] == "nnunet_ext" and _module_file(name)}


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_imports_have_no_cycle_and_the_library_never_imports_its_tools():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    assert len(graph) > 30 and graph["nnunet_ext.tools.plan"]  # the walk found the package and its imports
    library = [m for m in graph if not m.startswith("nnunet_ext.tools")]
    assert {m: sorted(i for i in graph[m] if i.startswith("nnunet_ext.tools")) for m in library} == \
        {m: [] for m in library}

    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:  # depth first; a grey module met again closes a cycle
        state[module] = "grey"
        for imported in sorted(graph[module]):
            assert state.get(imported) != "grey", f"import cycle: {' -> '.join(path + [module, imported])}"
            if imported not in state:
                visit(imported, path + [module])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_registry_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, nnunet_ext.registry as r; r.ARCHITECTURES['ukan']"
                          ".memory_model(3); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# A sixth architecture, as README's "Adding an architecture" says: one network module and one entry.
TINY_NETWORK = '''"""A throw-away architecture: nnU-Net's U-Net with a 1x1 convolution closing every encoder stage."""

from torch import nn

from nnunet_ext.networks.base import SegmentationNetwork, UNetDecoder


class Tiny(SegmentationNetwork):
    def __init__(self, topology, input_channels, num_classes, deep_supervision=True, mix=True):
        super().__init__(topology)

        def stage(s, plans_stage):
            channels = topology.features_per_stage[s]
            return nn.Sequential(plans_stage(), topology.conv_op(channels, channels, 1)) if mix else plans_stage()

        self.encoder = topology.build_encoder(input_channels, stage)
        self.decoder = UNetDecoder(topology, num_classes, deep_supervision)
        self.initialize()
'''
TINY_ENTRY = '''
register(Architecture(
    name="tiny",
    trainer="nnUNetTrainerTiny",
    network="nnunet_ext.networks.tiny:Tiny",
    dims=(2, 3),
    summary="a throw-away U-Net",
    reference="tests/test_registry.py",
    presets={"plain": {"mix": False}},
))
'''
LOOKUP = """
import json, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunet_ext.trainers
found = recursive_find_trainer_class_by_name("nnUNetTrainerTinyPlain_debug")
trainer = get_trainer_from_args("999", "2d", 0, "nnUNetTrainerTinyPlain_debug", device=torch.device("cpu"))
trainer.initialize()
print(json.dumps({"same": found is nnunet_ext.trainers.nnUNetTrainerTinyPlain_debug, "file": nnunet_ext.__file__,
                  "network": type(trainer.network).__name__, "options": found.network_options,
                  "epochs": trainer.num_epochs}))
"""


@pytest.mark.e2e
def test_a_sixth_architecture_is_one_module_and_one_entry(planned, tmp_path):
    """A copy of the project with exactly those two additions: the contract tests, `nnunet-ext list`,
    nnU-Net's trainer lookup, the benchmark and the memory model's command pick it up, and
    `nnunet-ext plan` works once that command has stored the model."""
    copy = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for part in ("nnunet_ext", "trainers", "tests"):
        shutil.copytree(REPO / part, copy / part, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", copy)
    (copy / "nnunet_ext" / "networks" / "tiny.py").write_text(TINY_NETWORK)
    with open(copy / "nnunet_ext" / "registry.py", "a") as registry:
        registry.write(TINY_ENTRY)
    changed = filecmp.dircmp(PACKAGE, copy / "nnunet_ext", ignore=["__pycache__"])
    assert (changed.diff_files, changed.left_only, changed.right_only) == (["registry.py"], [], [])
    assert filecmp.dircmp(PACKAGE / "networks", copy / "nnunet_ext" / "networks",
                          ignore=["__pycache__"]).right_only == ["tiny.py"]

    for folder in ("raw", "preprocessed"):  # plans written here stay here
        shutil.copytree(getattr(planned, folder) / planned.dataset, tmp_path / folder / planned.dataset)
    env = {**planned.env(), "PYTHONPATH": str(copy), "nnUNet_raw": str(tmp_path / "raw"),
           "nnUNet_preprocessed": str(tmp_path / "preprocessed"), "nnUNet_results": str(tmp_path / "results"),
           "nnUNet_extTrainer": str(copy / "trainers")}

    def run(*args, cwd=copy):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True, capture_output=True)

    contract = run("-m", "pytest", "tests/test_networks.py", "-k", "tiny", "-q", "-p", "no:cacheprovider")
    assert contract.returncode == 0 and " passed" in contract.stdout, contract.stdout[-3000:]
    assert "failed" not in contract.stdout and "skipped" not in contract.stdout

    listed = run("-m", "nnunet_ext.tools.cli", "list").stdout
    assert "tiny" in listed and "plain (nnUNetTrainerTinyPlain)" in listed

    lookup = run("-c", LOOKUP, cwd=tmp_path)
    assert lookup.returncode == 0, lookup.stderr[-3000:]
    found = json.loads(lookup.stdout.splitlines()[-1])
    assert found == {"same": True, "file": str(copy / "nnunet_ext" / "__init__.py"), "network": "Tiny",
                     "options": {"mix": False}, "epochs": 1}

    bench = run("-m", "nnunet_ext.tools.cli", "benchmark", "-d", "999", "-c", "2d", "-a", "tiny", "--repeats", "1",
                "-o", str(tmp_path / "reports"), cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert [line.split()[0] for line in bench.stdout.splitlines()[3:5]] == ["nnU-Net", "tiny"]

    unplanned = run("-m", "nnunet_ext.tools.cli", "plan", "-d", "999", "-a", "tiny", "-c", "2d", cwd=tmp_path)
    command = "nnunet-ext benchmark-memory -a tiny --dims 2 --fit --write"
    assert unplanned.returncode == 1 and command in unplanned.stderr and "Traceback" not in unplanned.stderr
    doctor = run("-m", "nnunet_ext.tools.cli", "doctor", cwd=tmp_path)
    assert doctor.returncode == 0 and "[ok  ] nnU-Net finds nnUNetTrainerTiny" in doctor.stdout
    assert "[note] tiny: No 2D memory model for 'tiny'" in doctor.stdout and command in doctor.stdout
    fitted = run("-m", "nnunet_ext.tools.cli", *command.split()[1:], cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert fitted.stdout.splitlines()[-1] == f"Stored in {copy / 'nnunet_ext' / 'memory_models.json'}: tiny 2D."
    stored = json.loads((copy / "nnunet_ext" / "memory_models.json").read_text())
    assert set(stored["tiny"]) == {"2"} and stored["PlainConvUNet"] == \
        json.loads((PACKAGE / "memory_models.json").read_text())["PlainConvUNet"]
    planned_tiny = run("-m", "nnunet_ext.tools.cli", "plan", "-d", "999", "-a", "tiny", "-c", "2d", cwd=tmp_path)
    assert planned_tiny.returncode == 0, planned_tiny.stderr[-3000:]
    assert "nnUNetv2_train 999 2d 0 -tr nnUNetTrainerTiny -p nnUNetPlans_Tiny_8G" in planned_tiny.stdout
