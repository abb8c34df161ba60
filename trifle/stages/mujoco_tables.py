"""Stage `mujoco_tables`: MuJoCo evaluation files -> results/tables/{mujoco,safe_rl}.{csv,md} and a figure.

The Markdown copies are laid out like the paper's Tables 1 and 2, with the published TT and DT scores
beside ours (trifle.evaluation.mujoco_tables); which rows go to which table is the method registry's
``tables``, and the means and standard errors follow trifle.evaluation.aggregate's one convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.mujoco_tables import load_records, plot_scores, write_mujoco_tables


def run(cfg: dict[str, Any]) -> Path:
    paths = cfg["paths"]
    files = [Path(p) for p in paths["eval_files"]]
    if not files:
        raise DataError("paths.eval_files is empty: expected the MuJoCo evaluation files to tabulate")
    records = load_records(files)
    out = Path(paths["mujoco_table"])
    rows = write_mujoco_tables(records, out, Path(paths["safe_table"]))
    plot_scores(rows, Path(paths["scores_figure"]))
    return out
