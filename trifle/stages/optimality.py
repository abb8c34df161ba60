"""Stage `optimality`: one run's executed steps -> its trajectories' optimality scores and returns.

Reads the run's steps (``paths.eval_steps``), its evaluation record (``paths.eval``: the task, method and
seed, and the returns the scores are compared with) and the task's two return models
(``paths.aux_state``, ``paths.aux_action``); writes ``paths.optimality``. The steps must belong to the
record: as many episodes, and each episode's rewards summing to its recorded return.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trifle.devices import resolve_device
from trifle.errors import DataError
from trifle.evaluation.optimality import score_steps
from trifle.evaluation.steps import load_steps
from trifle.io import read_json, write_json
from trifle.models.aux_training import load_aux


def _check_record(cfg: dict[str, Any], record: dict[str, Any], source: Path) -> None:
    expected = {"task": cfg["task"]["name"], "seed": cfg["seed"]}
    for key, value in expected.items():
        if record.get(key) != value:
            raise DataError(f"{source}: {key} is {record.get(key)!r}, expected {value!r}")


def run(cfg: dict[str, Any]) -> Path:
    paths = cfg["paths"]
    eval_path = Path(paths["eval"])
    if not eval_path.is_file():
        raise DataError(f"{eval_path}: evaluation file not found")
    record = read_json(eval_path)
    _check_record(cfg, record, eval_path)
    steps_path = Path(paths["eval_steps"] or eval_path.with_suffix(".steps.npz"))
    steps = load_steps(steps_path)
    returns = np.asarray(record["episodes"]["returns"], np.float64)
    if steps.num_episodes != returns.size or not np.allclose(
        steps.episode_returns(), returns, rtol=1e-9, atol=1e-6
    ):
        raise DataError(
            f"{steps_path}: its {steps.num_episodes} episodes' rewards do not sum to the {returns.size} "
            f"returns of {eval_path} (the steps of another run?)"
        )
    device = resolve_device(cfg["device"])
    state = load_aux(paths["aux_state"], kind="state", device=device)
    action = load_aux(paths["aux_action"], kind="action", device=device)
    scored = score_steps(steps, state, action)
    scores = scored.trajectory
    out = Path(paths["optimality"])
    write_json(
        out,
        {
            "task": record["task"],
            "method": record["method"],
            "seed": record["seed"],
            "episodes": {
                "scores": scores.tolist(),
                "returns": returns.tolist(),
                "steps": np.bincount(steps.episode, minlength=steps.num_episodes).tolist(),
            },
            "score_mean": float(scores.mean()),
            "score_sem": float(scores.std(ddof=1) / math.sqrt(scores.size)) if scores.size > 1 else None,
            "step_score_mean": float(scored.scores.mean()),
            "return_bins": {"state": state.returns.num_bins, "action": action.returns.num_bins},
        },
    )
    return out
