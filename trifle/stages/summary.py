"""Stage `summary`: evaluation files -> results/tables/summary.{csv,md} and the returns figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.summary import load_evaluation, plot_returns, summarize, write_summary


def run(cfg: dict[str, Any]) -> Path:
    paths = [Path(p) for p in cfg["paths"]["eval_files"]]
    if not paths:
        raise DataError("paths.eval_files is empty: expected the evaluation files to summarize")
    rows = summarize([load_evaluation(p) for p in paths])
    out = Path(cfg["paths"]["summary_table"])
    write_summary(out, rows)
    plot_returns(rows, Path(cfg["paths"]["returns_figure"]))
    return out
