"""Stage `tables`: collect training metrics into results/tables/models.csv and a Markdown copy."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.io import atomic_path, read_json, write_json

REQUIRED_COLUMNS = ("task", "model", "seed", "train_ll_per_token", "heldout_ll_per_token", "train_seconds")
# The circuit's conditionals against the data (trifle.models.circuits.diagnostics); empty for other models.
DIAGNOSTIC_COLUMNS = ("reward_tv", "q_within_state_corr", "value_calibration_error", "value_corr")
MODEL_COLUMNS = REQUIRED_COLUMNS + DIAGNOSTIC_COLUMNS


def write_model_metrics(
    cfg: dict[str, Any],
    model: str,
    metrics: dict[str, Any],
    *,
    train_ll: float | None,
    heldout_ll: float | None,
    **extra: Any,
) -> None:
    """Write a training stage's ``paths.<model>_metrics`` file in the layout :func:`run` tabulates."""
    write_json(
        cfg["paths"][f"{model}_metrics"],
        {
            "task": cfg["task"]["name"],
            "model": model,
            "seed": cfg["seed"],
            **extra,
            "train_ll_per_token": train_ll,
            "heldout_ll_per_token": heldout_ll,
            "train_seconds": metrics["seconds"],
            "details": metrics,
        },
    )


def _row(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    metrics = read_json(path)
    missing = [k for k in REQUIRED_COLUMNS if k not in metrics]
    if missing:
        raise DataError(f"{path}: metrics file lacks keys {missing}")
    return {k: metrics.get(k, "") for k in MODEL_COLUMNS}


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value != value:  # NaN: the quantity does not apply
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Write ``rows`` as CSV at ``path`` and as Markdown beside it (same name, .md)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _fmt(r[c]) for c in columns} for r in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_table(rows, columns))


def run(cfg: dict[str, Any]) -> Path:
    paths = [Path(p) for p in cfg["paths"]["model_metrics"]]
    if not paths:
        raise DataError("paths.model_metrics is empty: expected the training metrics files to tabulate")
    rows = sorted((_row(p) for p in paths), key=lambda r: (r["task"], r["model"], r["seed"]))
    out = Path(cfg["paths"]["models_table"])
    write_table(out, rows, MODEL_COLUMNS)
    return out
