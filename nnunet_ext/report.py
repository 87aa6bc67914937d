"""What the comparison commands print and write: aligned text tables, markdown tables, CSV, JSON and
PNG charts. Charts use matplotlib's object API (no pyplot), so they need no display and leave the
caller's matplotlib backend alone."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def text_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    escape = [[c.replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(rows[0])]
                     + ["| " + " | ".join(r) + " |" for r in escape[1:]])


def records(report: dict, context: tuple[str, ...]) -> list[dict]:
    """A report's rows, each prefixed with the report's `context` fields: one self-describing CSV line
    per row, so files from several runs can be concatenated."""
    return [{k: report[k] for k in context} | row for row in report["rows"]]


def write_csv(path: Path, records: list[dict]) -> None:
    """One line per record; the columns are the keys of all records, in order of first appearance."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(records)


def write_json(path: Path, data) -> None:
    """Strict JSON: NaN and infinities become null (the stdlib would write the non-standard NaN)."""
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def figure(width: float, height: float, **subplots):
    """A matplotlib Figure and its axes (`Figure.subplots` arguments)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(**subplots)


def output_paths(folder: str | Path, stem: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """`folder/stem.suffix` for each suffix, creating the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {s: folder / f"{stem}.{s}" for s in suffixes}
