"""Stage `ablation_table`: one ablation study's evaluation files -> its table and figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.errors import ConfigError, DataError
from trifle.evaluation.ablations import ablation_rows, plot_ablation, write_ablation
from trifle.evaluation.aggregate import load_evaluation


def run(cfg: dict[str, Any]) -> Path:
    study, setting = cfg["ablation"]["study"], cfg["ablation"]["setting"]
    if not study or not setting:
        raise ConfigError(
            "ablation.study and ablation.setting: expected the study's name and its planner key"
        )
    paths = [Path(p) for p in cfg["paths"]["eval_files"]]
    if not paths:
        raise DataError("paths.eval_files is empty: expected the ablation's evaluation files")
    rows = ablation_rows([load_evaluation(p) for p in paths], setting)
    out = Path(cfg["paths"]["ablation_table"])
    write_ablation(out, rows, study)
    plot_ablation(rows, Path(cfg["paths"]["ablation_figure"]), study)
    return out
