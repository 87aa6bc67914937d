"""How far each of our defaults moves the output away from the official network, on the official weights.

    python scripts/official_differences.py [ARCH ...]

For every golden configuration (tests/data/official), the `official` preset loads the official state
dict; then one difference at a time is switched back to our default (and all of them together, the
default network), the weights mapped where the default has other parameters, and the relative max
difference of the highest-resolution output from the official one is printed per input, as the docs'
tables report it. Differences whose parameters do not map are not in the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_official import OFFICIAL, goldens, official_state, relative_error  # noqa: E402

from nnunet_ext.networks.base import with_zero_heads  # noqa: E402
from nnunet_ext.registry import ARCHITECTURES  # noqa: E402
from nnunet_ext.topology import Topology  # noqa: E402


def lkm_projection(state: dict) -> dict:
    """The official BiM projection W (d_inner -> C) in the default BiM: each Mamba's out_proj = W, then
    the Linear(C, C) an identity, so the default computes W y_f + W y_b = W (y_f + y_b) exactly."""
    state = dict(state)
    for name, tensor in list(state.items()):
        if name.endswith("mamba.out_proj.weight") and tensor.shape[1] != tensor.shape[0]:
            bim = name.removesuffix("out_proj.weight")
            state[f"{bim}forward_mamba.out_proj.weight"] = state[f"{bim}backward_mamba.out_proj.weight"] = tensor
            state[name] = torch.eye(tensor.shape[0])
            state[f"{bim}out_proj.bias"] = torch.zeros(tensor.shape[0])
    return state


# architecture -> (what changes, options switched back to the default, weight mapping or None)
DIFFERENCES = {
    "lkm_unet": [
        ("contiguous windows sized from the patch (default) instead of the official grids",
         {"window_layout": "contiguous"}, None),
        ("layers over one token left out (default)", {"single_token_layers": False}, None),
        ("each Mamba's out_proj, then Linear(C, C) (default); official weights mapped", {"shared_out_proj": False},
         lkm_projection),
        ("the default network; official weights mapped",
         {"window_layout": "contiguous", "single_token_layers": False, "shared_out_proj": False}, lkm_projection),
    ],
    # The default's stages, upsampling and norms have other parameters than the official ones: only the shift maps.
    "ukan": [("tokens shifted along each axis in turn (default)", {"token_shift": True}, None)],
    # The default's stages, norms and biases have other parameters; these two leave official tensors out.
    "dlka_net": [("no positional embeddings (default)", {"position_embedding": False}, None),
                 ("2 bottleneck blocks, as the paper's text (default)", {"bottleneck_blocks": 2}, None)],
}


def main(names: list[str]) -> None:
    for name in names or OFFICIAL:
        arch = ARCHITECTURES[name]
        meta, arrays = goldens(name)
        print(f"\n{name}: relative max difference from the official output, per golden input\n")
        print("| difference | " + " | ".join(case["name"] for case in meta["cases"]) + " |")
        print("|---|" + "---|" * len(meta["cases"]))
        for label, options, mapping in [("none (the `official` preset)", {}, None), *DIFFERENCES.get(name, [])]:
            cells = []
            for case in meta["cases"]:
                topology = Topology.from_entry(case["architecture"], case["patch_size"])
                network = arch.build(topology, case["input_channels"], case["num_classes"],
                                     **{**arch.presets[case.get("preset", "official")], **options}).eval()
                state = arch.official_state_dict(official_state(arrays, case), network.state_dict())
                state = with_zero_heads(network.state_dict(), mapping(state) if mapping else state)
                network.load_state_dict({k: state[k] for k in network.state_dict()}, strict=True)
                errors = []
                for i in range(case["inputs"]):
                    with torch.no_grad():
                        out = network(torch.from_numpy(arrays[f"{case['name']}/input/{i}"]))[0]
                    errors.append(relative_error(out, torch.from_numpy(arrays[f"{case['name']}/output/{i}/0"])))
                cells.append(" / ".join(f"{e:.2g}" for e in errors))
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
