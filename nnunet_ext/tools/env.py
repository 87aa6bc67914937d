"""`nnunet-ext env`: the line that lets stock nnU-Net find our trainers; use `eval "$(nnunet-ext env)"`."""

from __future__ import annotations

from nnunet_ext import discovery


def add_arguments(parser) -> None:
    """No arguments."""


def main(args) -> int:
    print(discovery.env_line())
    return 0
