"""Stage `evaluate`: roll out one method on one task and save every episode's outcome.

Every check that can fail (planner settings against the trained models, checkpoints against the
data and the environment, the action constraint against the discretizer) runs while the policy is
built, before the first episode starts.

The method's policies come from the policy function its registry entry names
(trifle.planning.methods); this module names no method. A return-conditioned policy such as
Decision Transformer is evaluated once per conditioning target (``planner.target_return``, or the
task's ``dt_target_returns``), every target on the same episode budget and the same environment seeds,
so episode i of every target (and of every other method) starts from the same state and sees the same
random numbers as long as the actions agree. The file keeps every target under ``targets``; its
top-level results are those of the target with the best mean return (ties: the first listed), named by
``target_return``. Choosing the best target on the evaluation episodes themselves is the paper's
protocol for Taxi (six targets, best reported); it is an optimistic selection (the maximum of several
noisy means), so the DT row is biased upwards by up to the spread of those means.

Beside the record, ``paths.eval_steps`` gets the reported episodes' executed states, actions and
rewards (trifle.evaluation.steps), which the optimality score reads; the record itself does not hold them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trifle.data.d4rl_format import load_attrs
from trifle.devices import resolve_device
from trifle.envs.mujoco import MUJOCO_ENVS, normalized_score, reference_scores
from trifle.evaluation.rollout import EpisodeResults, env_factory, evaluate_policy
from trifle.evaluation.steps import ExecutedSteps, save_steps
from trifle.io import write_json
from trifle.planning.constraints import parse_constraint
from trifle.planning.methods import method
from trifle.planning.policy import Policy


def is_mujoco(cfg: dict[str, Any]) -> bool:
    """Gym-MuJoCo tasks get vectorised MuJoCo envs, a dimension check and normalized scores."""
    return cfg["task"]["env"] in MUJOCO_ENVS


def build_policies(cfg: dict[str, Any], device: str) -> list[tuple[float | None, Policy]]:
    """The evaluated method's policies with their conditioning target (None for a planner), built by the
    policy function its registry entry names (trifle.planning.methods)."""
    return method(cfg["planner"]["name"]).policy_function()(cfg, device)


def score_references(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The raw dataset's reference-score attrs (``paths.raw``: a Minari dataset carries its own) for
    :func:`trifle.envs.mujoco.normalized_score`; None, with a message naming the dataset, where neither
    the dataset nor D4RL has reference scores for the env, so the record carries returns only."""
    raw = cfg["paths"].get("raw")
    # Files without their own reference scores (D4RL's, the generated ones) fall back to D4RL's.
    stored = load_attrs(raw) if raw and Path(raw).is_file() else {}
    attrs = {key: stored[key] for key in ("ref_min_score", "ref_max_score") if key in stored}
    if reference_scores(cfg["task"]["env"], attrs) is None:
        print(
            f"evaluate: no normalized scores for task {cfg['task']['name']}: its dataset {raw} has no "
            f"ref_min_score/ref_max_score and D4RL's do not hold for env {cfg['task']['env']!r}"
        )
        return None
    return attrs


def _outcome(cfg: dict[str, Any], results: EpisodeResults, refs: dict[str, Any] | None) -> dict[str, Any]:
    """Every episode of one rollout and its aggregates (the part of a record a DT target repeats);
    normalized scores with the reference scores ``refs`` (:func:`score_references`) unless None."""
    returns = np.asarray(results.returns, float)
    episodes: dict[str, Any] = {
        "returns": results.returns,
        "steps": results.steps,
        "penalties": results.penalties,
        "successes": results.successes,
        "violations": results.violations,
    }
    outcome: dict[str, Any] = {
        "episodes": episodes,
        "return_mean": float(returns.mean()),
        # Standard error over episodes, std (ddof=1) / sqrt(n), as in the summary table.
        "return_sem": float(returns.std(ddof=1) / math.sqrt(returns.size)) if returns.size > 1 else None,
        "success_rate": float(np.mean(results.successes)),
        "violation_rate": results.violation_rate,
        "plan_seconds": results.plan_seconds,
        "env_steps": results.env_steps,
        "step_seconds": results.step_seconds,
    }
    if is_mujoco(cfg) and refs is not None:
        scores = normalized_score(cfg["task"]["env"], returns, refs)
        episodes["scores"] = scores.tolist()
        outcome["score_mean"] = float(scores.mean())
    return outcome


def best_target(outcomes: list[dict[str, Any]]) -> int:
    """Index of the best DT target: the highest mean return, the first listed on ties.

    This selects on the evaluation episodes themselves (the paper's protocol): optimistic.
    """
    return max(range(len(outcomes)), key=lambda i: outcomes[i]["return_mean"])


def run(cfg: dict[str, Any]) -> Path:
    policies = build_policies(cfg, resolve_device(cfg["device"]))
    planner, ev = cfg["planner"], cfg["eval"]
    # Violations are counted against the task's constraint for every method, constrained or not.
    constraint = parse_constraint(cfg["task"]["action_constraint"])
    refs = score_references(cfg) if is_mujoco(cfg) else None
    outcomes, rollouts = [], []
    for target, policy in policies:
        # Same seed for every target: the same environment seeds, episode by episode.
        results = evaluate_policy(
            policy,
            env_factory(cfg),
            episodes=ev["episodes"],
            batch_episodes=ev["batch_episodes"],
            seed=cfg["seed"],
            progress=cfg["progress"],
            constraint=constraint,
            name=cfg["task"]["name"] if target is None else f"{cfg['task']['name']} target {target:g}",
        )
        outcomes.append(_outcome(cfg, results, refs))
        rollouts.append(results)
    best = best_target(outcomes)
    # The reported episodes' states, actions and rewards, beside the record (which stays as it was).
    save_steps(steps_path(cfg), ExecutedSteps.from_episodes(rollouts[best].trajectories))
    record: dict[str, Any] = {
        "task": cfg["task"]["name"],
        "method": planner["name"],
        "seed": cfg["seed"],
        "env": cfg["task"]["env"],
        "constrained": bool(planner.get("constrained", False)),
        "constraint": cfg["task"]["action_constraint"],
        **outcomes[best],
        "planner": {k: v for k, v in planner.items() if k != "registry"},
        "eval": ev,
    }
    if policies[best][0] is not None:  # a return-conditioned policy (DT): one rollout per target
        record["target_return"] = policies[best][0]
        record["target_selection"] = (
            "best mean return over these evaluation episodes (the paper's protocol; optimistic)"
        )
        record["targets"] = [
            {"target_return": target, **outcome}
            for (target, _), outcome in zip(policies, outcomes, strict=True)
        ]
    if is_mujoco(cfg):
        record["dataset"] = dataset_kind(cfg["task"])
    out = Path(cfg["paths"]["eval"])
    write_json(out, record)
    return out


def steps_path(cfg: dict[str, Any]) -> Path:
    """``paths.eval_steps``; null puts the steps beside the record (``seed0.json`` -> ``seed0.steps.npz``),
    so a run that names only its record never writes into another run's folder."""
    path = cfg["paths"].get("eval_steps")
    return Path(path) if path else Path(cfg["paths"]["eval"]).with_suffix(".steps.npz")


def dataset_kind(task: dict[str, Any]) -> str:
    """The dataset part of a MuJoCo task's name: medium, medium-replay, medium-expert, random-local, ..."""
    name = task["dataset"].get("name", task["name"])
    kind = name.removeprefix(f"{task['env']}-").removesuffix("-v2")
    return kind
