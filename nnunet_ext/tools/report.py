"""What the commands print and write: aligned text tables, markdown tables, CSV, JSON, PNG charts,
numbers in their units, and progress lines. Charts use matplotlib's object API (no pyplot), so they
need no display and leave the caller's matplotlib backend alone."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path


def progress(text: str) -> None:
    """A progress line, on stderr so that stdout holds only the results."""
    print(text, file=sys.stderr, flush=True)


def error_text(error: Exception) -> str:
    """An exception's message (KeyError's str() would quote it)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def written(paths: dict) -> None:
    print("Written: " + ", ".join(str(p) for p in paths.values()))


def ratio(value, reference) -> str:
    return "-" if value is None or reference in (None, 0) else f"{value / reference:.2f}x"


def megabytes(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MB"


def seconds(s) -> str:
    return "-" if s is None or math.isnan(s) else f"{s:.3f} s"


def memory_label(device: str) -> str:
    """What a peak-memory column measures on `device` (nnunet_ext.tools.timing.timed_with_peak)."""
    return "peak CUDA memory" if device == "cuda" else "peak RSS growth"


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


def implementation_table(rows: list[dict], first: str, names: tuple[str, ...], device: str) -> list[list[str]]:
    """One row per shape of an operator benchmark: seconds per implementation, their ratios to the
    first, and peak memory (`row[name]` holds "seconds" and "peak_bytes", or None where it did not run)."""
    def field(row, name, key):
        return None if row[name] is None else row[name][key]

    table = [[first, "input", *names, *(f"{n} / {names[0]}" for n in names[1:]),
              *(f"{memory_label(device)}: {n}" if i == 0 else n for i, n in enumerate(names))]]
    for r in rows:
        table.append([r["shape"], r["input"], *(seconds(field(r, n, "seconds")) for n in names),
                      *(ratio(field(r, n, "seconds"), r[names[0]]["seconds"]) for n in names[1:]),
                      *("-" if field(r, n, "peak_bytes") is None else megabytes(field(r, n, "peak_bytes"))
                        for n in names)])
    return table
