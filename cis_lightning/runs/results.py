"""What a run writes besides its weights, in one place: results.csv and results_by_p.csv (columns,
writer, reader) and the TensorBoard tag of each instance's training curve.

`cis test` writes the files (`write_results`, through the LightningModule); the report, the
figure callbacks and `load_run` read them back with `read_results`. Pure Python: no torch, no
Lightning.

results.csv: one row per instance, the RESULT_COLUMNS first, then every instance setting.
results_by_p.csv: one row per (instance, evaluation p), with `eval_p` beside the training `p`.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

RESULTS = "results.csv"
RESULTS_BY_P = "results_by_p.csv"

RESULT_COLUMNS = (
    "instance",
    "model",
    "mixing",
    "sigma",
    "p",
    "seed",
    "loss_per_feature",
    "loss_per_feature_stderr",
    "naive_loss_per_feature",
)


def instance_tag(k: int) -> str:
    """The TensorBoard tag of instance k's training L / p in a run of several instances."""
    return f"train/loss_per_feature/instance_{k}"


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` (same keys) as a CSV file with a header, written atomically (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.getvalue())
    os.replace(tmp, path)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.csv or results_by_p.csv, values parsed back (bool, int, float, None for
    an empty cell, else the text); no rows if the file is missing."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{key: parse_value(value) for key, value in row.items()} for row in csv.DictReader(f)]


def parse_value(value: str) -> Any:
    """A CSV cell as the value `write_results` wrote: True/False, int, float, None for empty, or text."""
    if value in ("True", "False"):
        return value == "True"
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def format_results(rows: list[dict[str, Any]]) -> str:
    """The results table for the terminal: one line per instance."""
    header = (
        f"{'inst':>4}  {'model':<12} {'mixing':<18} {'sigma':>7} {'p':>7} {'seed':>4}  "
        f"{'L/p':>9} {'+-':>8}  {'naive':>7}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['instance']:>4}  {r['model']:<12} {r['mixing']:<18} {r['sigma']:>7.4f} {r['p']:>7.4g} {r['seed']:>4}  "
            f"{r['loss_per_feature']:>9.5f} {r['loss_per_feature_stderr']:>8.5f}  {r['naive_loss_per_feature']:>7.5f}"
        )
    return "\n".join(lines)
