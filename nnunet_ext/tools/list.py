"""`nnunet-ext list`: the registered architectures, their trainers and presets, 2D/3D support, which
optional fast paths are active, and the short-schedule variants."""

from __future__ import annotations

from nnunet_ext.registry import ARCHITECTURES, SCHEDULES
from nnunet_ext.tools.report import text_table


def add_arguments(parser) -> None:
    """No arguments."""


def main(args) -> int:
    rows = [["architecture", "trainer", "presets", "2D", "3D", "fast paths", "summary"]]
    for arch in ARCHITECTURES.values():
        paths = ", ".join(f"{p.name}: {'off (nnunet-ext doctor says why)' if p.missing() else 'active'}"
                          for p in arch.fast_paths) or "-"
        presets = ", ".join(f"{name} ({arch.preset_trainer(name)})" for name in arch.presets) or "-"
        rows.append([arch.name, arch.trainer, presets, "yes" if 2 in arch.dims else "no",
                     "yes" if 3 in arch.dims else "no", paths, arch.summary])
    print(text_table(rows))
    print("\nShort-schedule variants (tests, demos, real-data), also of nnUNetTrainer: "
          + ", ".join(f"<trainer>_{name} ({s.epochs} epoch(s) x {s.iterations} iterations"
                      f"{'' if s.mirroring else ', no test-time mirroring'})" for name, s in SCHEDULES.items()))
    return 0
