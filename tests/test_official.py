"""The `official` presets compute what the official code computes.

Golden files (tests/data/official/<arch>.npz and .json) were made by running the official code at its
pinned commit with scripts/official_goldens.py: its state dict with every parameter randomised, inputs,
and every deep-supervision output in eval mode, float32. Here the state dict goes through our converter
(the one `nnunet-ext import-official` uses) into the preset's network, built from the same nnU-Net
configuration (nnU-Net's deep-supervision heads at zero where the official network has none), and the
outputs must agree to 1e-5 relative; each tensor must be initialised as the official
code initialises it, and the parameter counts at the papers' configurations must equal the official
network's (not counting heads it does not have).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_ext.networks.base import deep_supervision_heads, with_zero_heads
from nnunet_ext.registry import ARCHITECTURES
from nnunet_ext.topology import Topology

GOLDENS = Path(__file__).with_name("data") / "official"
OFFICIAL = [name for name, arch in ARCHITECTURES.items() if "official" in arch.presets]


def goldens(name: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    meta = GOLDENS / f"{name}.json"
    assert meta.is_file(), f"{name} has an official preset but no goldens: run scripts/official_goldens.py"
    return json.loads(meta.read_text()), np.load(GOLDENS / f"{name}.npz")


def official_state(arrays, case: dict) -> dict[str, torch.Tensor]:
    """The official network's whole state dict: the floating-point tensors (stored as integer multiples of
    the step, in the order of `case["state"]`), the integer ones, and the names that share them."""
    values = torch.from_numpy(arrays[f"{case['name']}/state"].astype(np.float32)) * case["state_step"]
    sizes = [math.prod(shape) for _, shape in case["state"]]
    assert sum(sizes) == values.numel()
    state = {name: tensor.view(shape) for (name, shape), tensor in zip(case["state"], values.split(sizes))}
    prefix = f"{case['name']}/state/"
    state |= {k.removeprefix(prefix): torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith(prefix)}
    return state | {alias: state[name] for alias, name in case["aliases"].items()}


def preset_network(name: str, configuration: dict, device=None, deep_supervision: bool = True):
    """The network of the preset a golden case proves (`official`, or MedNeXt's `official_k5`)."""
    arch = ARCHITECTURES[name]
    topology = Topology.from_entry(configuration["architecture"], configuration["patch_size"])
    with torch.device(device or "cpu"):
        return arch.build(topology, configuration["input_channels"], configuration["num_classes"],
                          deep_supervision, **arch.presets[configuration.get("preset", "official")])


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_preset_computes_the_official_outputs(name):
    meta, arrays = goldens(name)
    assert meta["cases"], "goldens without a configuration prove nothing"
    for case in meta["cases"]:
        network = preset_network(name, case, deep_supervision=meta["heads"] != 1).eval()
        state = ARCHITECTURES[name].official_state_dict(official_state(arrays, case), network.state_dict())
        network.load_state_dict(with_zero_heads(network.state_dict(), state), strict=True)
        for i in range(case["inputs"]):
            with torch.no_grad():
                outputs = network(torch.from_numpy(arrays[f"{case['name']}/input/{i}"]))
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
            expected = [arrays[f"{case['name']}/output/{i}/{j}"] for j in range(meta["heads"] or len(outputs))]
            assert f"{case['name']}/output/{i}/{len(expected)}" not in arrays.files  # as many outputs as theirs
            for j, (ours, theirs) in enumerate(zip(outputs, expected)):
                error = relative_error(ours, torch.from_numpy(theirs))
                assert error <= 1e-5, f"{name} {case['name']} input {i} output {j}: {error:.2e} relative"


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_preset_initialises_every_tensor_as_the_official_code(name):
    """Each tensor's mean and spread at initialisation against the official network's (seed 0). Two
    draws from one distribution: their means differ by less than 5 standard errors (of the pooled spread),
    their standard deviations by less than 5 relative standard errors; what the official code sets to a
    constant (norms, zero-initialised residual branches, Mamba's D) is that constant here. Under 16 values
    a sample's spread says too little to compare: there the tensor must merely not be constant; of one value,
    nothing is compared."""
    meta, _ = goldens(name)
    compared = drawn = 0
    for case in [*meta["cases"], *meta.get("blocks", [])]:  # blocks: as the preset's network initialises them
        torch.manual_seed(0)
        ours = preset_network(name, case)
        ours = (ours.get_submodule(case["path"]) if "path" in case else ours).state_dict()
        official = ARCHITECTURES[name].official_state_dict(case["initialisation"])
        assert set(official) <= set(ours)
        for tensor_name, (mean, std, size) in official.items():
            tensor = ours[tensor_name].double()
            assert tensor.numel() == size, tensor_name
            if size == 1:  # one value (MedNeXt's cases at width 1) tells neither a spread nor a constant
                continue
            if std == 0:
                assert torch.allclose(tensor, torch.full_like(tensor, mean), atol=1e-6), tensor_name
                continue
            assert tensor.std() > 0, f"{tensor_name} is constant here, not in the official network"
            drawn += size
            if size < 16:
                continue
            compared += size
            error, spread = math.sqrt(2 / size), math.sqrt((std ** 2 + tensor.std().item() ** 2) / 2)
            assert abs(tensor.mean().item() - mean) < 5 * spread * error, f"{tensor_name}: mean " \
                f"{tensor.mean():.4g}, official {mean:.4g}"
            assert abs(tensor.std().item() / std - 1) < 5 * error, f"{tensor_name}: std {tensor.std():.4g}, " \
                f"official {std:.4g}"
    assert compared >= drawn / 2  # most drawn values are in tensors large enough to compare


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_preset_has_the_official_parameter_count_at_the_papers_configurations(name):
    meta, _ = goldens(name)
    for paper, entry in meta["paper_parameters"].items():
        network = preset_network(name, entry, device="meta")
        lacking = deep_supervision_heads(network.state_dict(), meta["heads"]) if meta["heads"] else []
        assert sum(p.numel() for k, p in network.named_parameters() if k not in lacking) == entry["parameters"], paper


BLOCKS = [name for name in OFFICIAL if goldens(name)[0].get("blocks")]


@pytest.mark.parametrize("name", BLOCKS)
def test_official_blocks_compute_the_official_outputs(name):
    """Blocks whose official network cannot be built here (D-LKA Net's 2D decoder block: its network needs a
    pretrained MaxViT), taken from the preset's network where it holds them."""
    meta, arrays = goldens(name)
    for block in meta["blocks"]:
        module = preset_network(name, block).eval().get_submodule(block["path"])
        module.load_state_dict(ARCHITECTURES[name].official_state_dict(official_state(arrays, block)), strict=True)
        with torch.no_grad():
            out = module(torch.from_numpy(arrays[f"{block['name']}/input/0"]))
        error = relative_error(out, torch.from_numpy(arrays[f"{block['name']}/output/0/0"]))
        assert error <= 1e-5, f"{name} {block['name']}: {error:.2e} relative"


def test_goldens_stay_small():
    """Numbers only, and under 3 MB together (2.35 MB for nine architectures): the repository carries them."""
    files = list(GOLDENS.iterdir())
    assert {f.suffix for f in files} <= {".npz", ".json"}
    assert sum(f.stat().st_size for f in files) < 3 * 2 ** 20
