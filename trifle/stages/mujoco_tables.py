"""Stage `mujoco_tables`: MuJoCo evaluation files -> results/tables/{mujoco,safe_rl}.{csv,md} and a figure.

The Markdown copies are laid out like the paper's Tables 1 and 2, with the published TT and DT scores
beside ours (trifle.evaluation.mujoco_tables); which rows go to which table is the method registry's
``tables``, and the means and standard errors follow trifle.evaluation.aggregate's one convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.mujoco_tables import behaviour_score, load_records, plot_scores, write_mujoco_tables


def run(cfg: dict[str, Any]) -> Path:
    paths = cfg["paths"]
    files = [Path(p) for p in paths["eval_files"]]
    if not files:
        raise DataError("paths.eval_files is empty: expected the MuJoCo evaluation files to tabulate")
    records = load_records(files)
    # paths.raw_files: the tasks' raw datasets (data/raw/<task>.hdf5), for the behaviour column.
    env_of = {r["task"]: r["env"] for r in records}
    behaviour = {}
    for raw in (Path(p) for p in paths.get("raw_files") or []):
        if raw.stem not in env_of:
            raise DataError(f"paths.raw_files: {raw} names task '{raw.stem}', which has no evaluation here")
        behaviour[raw.stem] = behaviour_score(raw, env_of[raw.stem])
    out = Path(paths["mujoco_table"])
    rows = write_mujoco_tables(records, out, Path(paths["safe_table"]), behaviour)
    plot_scores(rows, Path(paths["scores_figure"]))
    return out
