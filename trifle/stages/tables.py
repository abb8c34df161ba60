"""Stage `tables`: collect training metrics into results/tables/models.csv and a Markdown copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.tables import write_table
from trifle.io import read_json
from trifle.models.metrics import MODEL_COLUMNS, REQUIRED_COLUMNS


def _row(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    metrics = read_json(path)
    missing = [k for k in REQUIRED_COLUMNS if k not in metrics]
    if missing:
        raise DataError(f"{path}: metrics file lacks keys {missing}")
    return {k: metrics.get(k, "") for k in MODEL_COLUMNS}


def run(cfg: dict[str, Any]) -> Path:
    paths = [Path(p) for p in cfg["paths"]["model_metrics"]]
    if not paths:
        raise DataError("paths.model_metrics is empty: expected the training metrics files to tabulate")
    rows = sorted((_row(p) for p in paths), key=lambda r: (r["task"], r["model"], r["seed"]))
    out = Path(cfg["paths"]["models_table"])
    write_table(out, rows, MODEL_COLUMNS)
    return out
