"""How stock nnU-Net finds our trainers (the nnUNet_extTrainer folder) and checks of it."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def trainer_search_dir() -> Path:
    """The folder to put on nnUNet_extTrainer: shipped inside the package in a wheel
    (`_trainer_search`), the repository's `trainers/` in a source checkout or editable install."""
    package = Path(__file__).resolve().parent
    shipped = package / "_trainer_search"
    return shipped if shipped.is_dir() else package.parent / "trainers"


def env_value(current: str | None = None) -> str:
    """nnUNet_extTrainer with our folder first, keeping any other folders the user set."""
    ours = str(trainer_search_dir())
    current = os.environ.get(ENV_VAR, "") if current is None else current
    others = [p for p in current.split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


def env_line() -> str:
    return f"export {ENV_VAR}={shlex.quote(env_value())}"


def is_configured() -> bool:
    ours = str(trainer_search_dir())
    return any(os.path.abspath(p) == ours for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p)


def find_trainer_like_nnunet(name: str) -> type:
    """Look `name` up exactly as nnUNetv2_train/predict do (quietly); raises RuntimeError if not found."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):
        return recursive_find_trainer_class_by_name(name)
