"""Checkpoints written by earlier releases keep loading: nnU-Net loads a checkpoint's state dict strictly
(`--c`, `--val`, prediction), so every tensor name and shape must stay.

tests/data/state_dict_layouts.json records each architecture's state dict (default options) on a 2D
and a 3D ResEnc topology, written by commit 256282e, before the registry generated the trainers and
the networks built their stages through the stage hooks; U-Mamba's and MedNeXt's entries were added
once users could train them from main (after e90e9fa). A change that breaks old checkpoints must be a
decision: rewrite the file with `python tests/test_checkpoints.py` and say so in the docs. An
architecture added later joins the file the same way once it has been released.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TOPOLOGIES
from nnunet_ext.registry import ARCHITECTURES

LAYOUTS = Path(__file__).with_name("data") / "state_dict_layouts.json"
RECORDED = json.loads(LAYOUTS.read_text())


def layout(name: str, topology_name: str) -> list[str]:
    """'name shape' per tensor of the architecture's state dict, built on the meta device (no data needed)."""
    topology, channels = TOPOLOGIES[topology_name]
    with torch.device("meta"):
        net = ARCHITECTURES[name].build(topology, channels, 3)
    return [f"{k} {'x'.join(map(str, v.shape))}" for k, v in net.state_dict().items()]


@pytest.mark.parametrize("name,topology_name", [(n, t) for n, by in RECORDED.items() for t in by])
def test_state_dict_layout_is_the_recorded_one(name, topology_name):
    ours, recorded = layout(name, topology_name), RECORDED[name][topology_name]
    assert sorted(ours) == sorted(recorded), (
        f"{name}'s state dict changed: missing {sorted(set(recorded) - set(ours))[:5]}, new "
        f"{sorted(set(ours) - set(recorded))[:5]}; old checkpoints would no longer load")


if __name__ == "__main__":  # rewrite the record from the current code
    LAYOUTS.write_text(json.dumps({n: {t: layout(n, t) for t in ("2d_4stages_1ch", "3d_4stages_resenc_1ch")}
                                   for n in ARCHITECTURES}, indent=1) + "\n")
