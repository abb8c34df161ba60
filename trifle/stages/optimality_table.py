"""Stage `optimality_table`: optimality files -> results/tables/optimality.{csv,md} and its figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.optimality_table import (
    load_optimality,
    optimality_rows,
    plot_optimality,
    write_optimality,
)


def run(cfg: dict[str, Any]) -> Path:
    paths = [Path(p) for p in cfg["paths"]["optimality_files"]]
    if not paths:
        raise DataError("paths.optimality_files is empty: expected the optimality files to tabulate")
    rows = optimality_rows([load_optimality(p) for p in paths])
    out = Path(cfg["paths"]["optimality_table"])
    write_optimality(out, rows)
    plot_optimality(rows, Path(cfg["paths"]["optimality_figure"]))
    return out
