"""Ablation studies: values read from the files, one standard-error convention, the workflow's jobs."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from trifle.errors import DataError
from trifle.evaluation.ablations import ablation_rows, setting_value
from trifle.stages import ablation_table

from workflow_support import copy_project, job_counts, snakemake


def _record(method: str, horizon, returns, seed: int = 0, task: str = "taxi-stochastic") -> dict:
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "episodes": {"returns": list(returns)},
        "plan_seconds": 1.0,
        "env_steps": 10,
        "planner": {"name": method, "horizon": horizon},
    }


def test_rows_take_the_value_from_each_file_and_follow_the_convention():
    records = [
        _record("trifle-s", 5, [1.0, 3.0]),
        _record("tt", 5, [0.0, 2.0, 4.0]),
        _record("tt", 1, [1.0, 1.0, 4.0]),
        _record("tt", 1, [2.0, 3.0, 7.0], seed=1),
    ]
    rows = ablation_rows(records, "planner.horizon")
    assert [(r["method"], r["value"]) for r in rows] == [("tt", 1), ("tt", 5), ("trifle-s", 5)]
    two_seeds, one_seed = rows[0], rows[1]
    assert two_seeds["sem_over"] == "seeds" and two_seeds["seeds"] == 2 and two_seeds["episodes"] == 6
    assert two_seeds["return_mean"] == pytest.approx(3.0)  # the mean of the seed means 2 and 4
    assert two_seeds["return_sem"] == pytest.approx(np.std([2.0, 4.0], ddof=1) / math.sqrt(2))
    assert one_seed["sem_over"] == "episodes"
    assert one_seed["return_sem"] == pytest.approx(np.std([0.0, 2.0, 4.0], ddof=1) / math.sqrt(3))


def test_a_file_without_the_setting_or_a_non_planner_setting_is_refused():
    record = _record("tt", 3, [1.0])
    with pytest.raises(DataError, match="no planner setting 'beam_width'"):
        setting_value(record, "planner.beam_width")
    with pytest.raises(DataError, match="planner key"):
        setting_value(record, "eval.episodes")


def test_stage_writes_table_note_and_figure(tmp_path):
    files = []
    for i, (name, h, returns) in enumerate([("tt", 1, [1.0, 2.0]), ("tt", 3, [2.0, 4.0])]):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(_record(name, h, returns)))
        files.append(str(path))
    cfg = {
        "ablation": {"study": "horizon", "setting": "planner.horizon"},
        "paths": {
            "eval_files": files,
            "ablation_table": str(tmp_path / "ablation_horizon.csv"),
            "ablation_figure": str(tmp_path / "ablation_horizon.png"),
        },
    }
    out = ablation_table.run(cfg)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("task,method,setting,value") and len(lines) == 3
    assert "`planner.horizon` varied" in out.with_suffix(".md").read_text()
    assert (tmp_path / "ablation_horizon.png").stat().st_size > 0


ABLATION_CONFIG = """tasks: [taxi-stochastic]
methods: []
seeds: [0, 1]
ablations:
  horizon:
    tasks: [taxi-stochastic]
    methods: [tt, trifle-s]
    setting: planner.horizon
    values: [1, 3]
  fixed_threshold:
    tasks: [taxi-stochastic]
    methods: [trifle-s]
    setting: planner.fixed_threshold
    values: [null, 0.9]
"""


def test_workflow_runs_each_variant_on_the_task_models(tmp_path):
    project = copy_project(tmp_path / "p", config=ABLATION_CONFIG)
    out = snakemake(project, "-n", "--forceall").stdout
    counts = job_counts(out)
    # horizon: 2 methods x 2 values x 2 seeds; fixed_threshold: 1 method x 2 values x 2 seeds.
    assert counts["evaluate_ablation"] == 2 * 2 * 2 + 2 * 2 and counts["ablation_table"] == 2
    assert counts["train_gpt"] == counts["train_pc"] == 2 and "evaluate" not in counts
    assert (
        "planner.horizon=1" in out
        and "results/eval/ablations/horizon/taxi-stochastic/trifle-s/3/seed1.json" in out
    )
    # A null value (the method's default: the adaptive threshold) is a path part and an override "null".
    assert "results/eval/ablations/fixed_threshold/taxi-stochastic/trifle-s/null/seed0.json" in out
    assert "planner.fixed_threshold=null" in out and "planner.fixed_threshold=0.9" in out


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ("    methods: [tt]\n    setting: planner.horizon\n    values: [0]\n", "planner.horizon"),
        ("    methods: [cql]\n    setting: planner.horizon\n    values: [1]\n", "unknown method 'cql'"),
        ("    methods: [tt]\n    setting: eval.episodes\n    values: [1]\n", "setting"),
    ],
)
def test_a_bad_ablation_fails_at_dag_build(tmp_path, study, message):
    config = "tasks: [taxi-stochastic]\nseeds: [0]\nablations:\n  s:\n    tasks: [taxi-stochastic]\n" + study
    project = copy_project(tmp_path / "p", config=config)
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr
