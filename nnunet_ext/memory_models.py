"""The training-memory models `nnunet-ext plan` sizes patches with (plain Python: the registry reads them).

nnU-Net sizes its patches with one number per patch, the summed feature-map size of its PlainConvUNet
on the topology planned for that patch (`Footprint.units`), and assumes memory is proportional to it.
Our networks add two terms that grow differently: activations a U-Net has no counterpart for
(`Footprint.extra_elements`: attention matrices, quadratic in the tokens, and KAN spline bases) and
gradients (the parameters, which grow with the number of stages). Per architecture and dimension

    peak bytes = batch * (per_unit * units + per_extra * extra_elements) + per_parameter * parameters

is fitted to measurements by `nnunet-ext benchmark-memory --fit --write`, which stores the models in
memory_models.json next to this file; how they are measured and checked is nnunet_ext.tools.memory's
and docs/planning.md's subject. The planner scales nnU-Net's own estimate by the ratio of an
architecture's model to PlainConvUNet's at batch 2, so nnU-Net's calibration of units to GPU memory
carries over.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = Path(__file__).with_name("memory_models.json")
REFERENCE = "PlainConvUNet"  # nnU-Net's own network, fitted like the architectures
FIT_BATCH = 2  # the batch size the models are measured at, and the planner compares at


@dataclass(frozen=True)
class Footprint:
    """What the memory model needs to know about a network on a patch (per sample where it scales)."""

    units: int  # nnU-Net's measure: PlainConvUNet's summed feature-map size on this topology and patch
    extra_elements: int
    parameters: int


@dataclass(frozen=True)
class MemoryModel:
    """peak bytes = batch * (per_unit * units + per_extra * extra_elements) + per_parameter * parameters."""

    per_unit: float
    per_extra: float
    per_parameter: float

    def estimate(self, f: Footprint, batch: int) -> float:
        return batch * (self.per_unit * f.units + self.per_extra * f.extra_elements) \
            + self.per_parameter * f.parameters


class MissingMemoryModel(KeyError):
    """No memory model is stored for a network in a dimension; the message names the command that makes it."""


def load() -> dict[str, dict[int, MemoryModel]]:
    """Every stored model: network -> dimension -> model."""
    stored = json.loads(FILE.read_text())
    return {name: {int(dim): MemoryModel(**model) for dim, model in models.items()} for name, models in stored.items()}


def memory_model(name: str, dim: int) -> MemoryModel:
    """The stored model of `name` (a registered architecture or REFERENCE) in `dim` D."""
    try:
        return load()[name][dim]
    except KeyError:
        raise MissingMemoryModel(
            f"No {dim}D memory model for '{name}' in {FILE.name}, so `nnunet-ext plan` cannot size patches for it. "
            f"Measure and store it with: nnunet-ext benchmark-memory -a {name} --dims {dim} --fit --write "
            "(docs/planning.md).") from None


def relative_memory(model: MemoryModel, dim: int, net: Footprint, plain: Footprint) -> float:
    """An architecture's training memory relative to PlainConvUNet's on the same plans, at batch 2."""
    return model.estimate(net, FIT_BATCH) / memory_model(REFERENCE, dim).estimate(plain, FIT_BATCH)


def save(models: dict[tuple[str, int], MemoryModel]) -> None:
    """Store (network, dimension) -> model, keeping every other stored model."""
    stored = {name: {str(dim): asdict(m) for dim, m in by_dim.items()} for name, by_dim in load().items()}
    for (name, dim), model in models.items():
        stored.setdefault(name, {})[str(dim)] = asdict(model)
    FILE.write_text(json.dumps({name: dict(sorted(by_dim.items())) for name, by_dim in stored.items()}, indent=2)
                    + "\n")
