"""The error a network raises when it cannot be built as asked (plain Python: no torch)."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A network that cannot be built from these plans (their topology or patch size) or with these
    options. `option` names the option at fault; without it the plans are. The message starts with
    "Option 'name':" or "Plans:", so the two stay apart wherever it is printed."""

    def __init__(self, message: str, option: str | None = None):
        self.option = option
        super().__init__(f"Option '{option}': {message}" if option else f"Plans: {message}")
