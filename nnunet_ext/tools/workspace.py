"""Run the stock nnUNetv2_* commands in a self-contained workspace (raw, preprocessed, results).

`nnunet-ext demo`, `real-data` and the end-to-end tests use this, so all exercise exactly what a user types.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nnunet_ext.discovery import ENV_VAR, env_value


def stock_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one next to this Python interpreter."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found next to {sys.executable} or on PATH; install nnunetv2 "
                                "into this environment (pip install nnunet-ext pulls it in).")
    return found


class Workspace:
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results under one folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.raw, self.preprocessed, self.results = (self.root / d for d in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        for folder in (self.raw, self.preprocessed, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), **{ENV_VAR: env_value()})
        # nnU-Net starts 12 augmentation workers and 8 export workers by default; small machines do better
        # with fewer (each spawned worker imports torch: on 2 cores, 8 of them add ~30 s to a validation).
        workers = str(min(4, os.cpu_count() or 1))
        env.setdefault("nnUNet_n_proc_DA", workers)
        env.setdefault("nnUNet_def_n_proc", workers)
        return env

    def run(self, command: str, *args, log: Path | None = None) -> str:
        """Run a stock command; returns its output, raises RuntimeError with the output's tail on failure."""
        proc = subprocess.run([stock_command(command), *map(str, args)], env=self.env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"$ {command} {' '.join(map(str, args))}\n{proc.stdout}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"{command} {' '.join(map(str, args))} failed (exit {proc.returncode}):\n"
                               + "\n".join(proc.stdout.splitlines()[-40:]))
        return proc.stdout

    def fold_dir(self, dataset: str, trainer: str, configuration: str, fold: int = 0,
                 plans: str = "nnUNetPlans") -> Path:
        return self.results / dataset / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"

    def validation_dice(self, dataset: str, trainer: str, configuration: str, fold: int = 0,
                        plans: str = "nnUNetPlans") -> dict:
        """Mean Dice per label and over foreground from nnU-Net's own validation summary."""
        summary = json.loads((self.fold_dir(dataset, trainer, configuration, fold, plans)
                              / "validation" / "summary.json").read_text())
        dice = {label: m["Dice"] for label, m in summary["mean"].items()}
        dice["foreground_mean"] = summary["foreground_mean"]["Dice"]
        return dice
