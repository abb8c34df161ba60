"""Stage `evaluate`: roll out one method on one task and save every episode's outcome.

Every check that can fail (planner settings against the trained models, checkpoints against the
data and the environment, the action constraint against the discretizer) runs while the policy is
built, before the first episode starts.

Decision Transformer is evaluated once per conditioning target (``planner.target_return``, or the
task's ``dt_target_returns``), every target on the same episode budget and the same environment seeds,
so episode i of every target (and of every other method) starts from the same state and sees the same
random numbers as long as the actions agree. The file keeps every target under ``targets``; its
top-level results are those of the target with the best mean return (ties: the first listed), named by
``target_return``. Choosing the best target on the evaluation episodes themselves is the paper's
protocol for Taxi (six targets, best reported); it is an optimistic selection (the maximum of several
noisy means), so the DT row is biased upwards by up to the spread of those means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trifle.data.tokens import TokenData, load_tokens
from trifle.envs import make_mdp
from trifle.envs.mujoco import MUJOCO_ENVS, VectorMujocoEnv, normalized_score
from trifle.errors import CheckpointError, ConfigError
from trifle.evaluation.rollout import EnvFactory, EpisodeResults, evaluate_policy, tabular_factory
from trifle.io import write_json
from trifle.models.dt_training import load_dt
from trifle.planning.constraints import parse_constraint
from trifle.planning.dt_policy import DTPolicy, parse_target_returns
from trifle.planning.planners import build_planner
from trifle.planning.policy import Policy
from trifle.stages.devices import resolve_device


def is_mujoco(cfg: dict[str, Any]) -> bool:
    """Gym-MuJoCo tasks get vectorised MuJoCo envs, a dimension check and normalized scores."""
    return cfg["task"]["env"] in MUJOCO_ENVS


def dt_target_returns(cfg: dict[str, Any]) -> list[float]:
    """DT's conditioning targets: ``planner.target_return`` (a number or a list) when set, else the
    task's ``dt_target_returns`` list."""
    target = cfg["planner"].get("target_return")
    if target is not None:
        return parse_target_returns(target, "planner.target_return")
    if cfg["task"].get("dt_target_returns") is None:
        raise ConfigError("task.dt_target_returns: no target return set (nor planner.target_return)")
    return parse_target_returns(cfg["task"]["dt_target_returns"], "task.dt_target_returns")


def build_policies(cfg: dict[str, Any], device: str) -> list[tuple[float | None, Policy]]:
    """The evaluated method's policies with their DT target: one per target for DT (the checkpoint is
    loaded once), else the one beam planner (tt, trifle-s, trifle-m, safe variants) with target None."""
    planner = cfg["planner"]
    if planner["method"] == "dt":
        targets = dt_target_returns(cfg)
        model, meta = load_dt(cfg["paths"]["dt"], device=device)
        return [(t, DTPolicy(model, meta, t, device, sample=planner["sample"])) for t in targets]
    return [(None, build_policy(cfg, device))]


def build_policy(cfg: dict[str, Any], device: str) -> Policy:
    """A beam planner (tt, trifle-s, trifle-m, safe variants); DT goes through :func:`build_policies`."""
    planner, paths = cfg["planner"], cfg["paths"]
    if planner["method"] == "dt":
        raise ConfigError("planner.method=dt: build DT's policies with build_policies (one per target)")
    tokens = load_tokens(paths["tokens"])
    _check_env_dims(cfg, tokens, paths["tokens"])
    return build_planner(
        planner,
        gpt_path=paths["gpt"],
        circuit_path=paths["pc"] if planner["method"] != "tt" else None,
        tokens=tokens,
        circuit_window=cfg["task"]["pc_window"],
        discount=cfg["task"]["labels"]["discount"],
        constraint=cfg["task"]["action_constraint"],
        device=device,
    )


def _check_env_dims(cfg: dict[str, Any], tokens: TokenData, path: str) -> None:
    """A model trained on another environment's data must not be rolled out here."""
    if not is_mujoco(cfg):
        return
    env = VectorMujocoEnv(cfg["task"]["env"], 1, 0)
    env.close()
    if (tokens.obs_dim, tokens.act_dim) != (env.obs_dim, env.act_dim):
        raise CheckpointError(
            f"{path}: data has obs_dim={tokens.obs_dim}, act_dim={tokens.act_dim}, but task.env="
            f"{cfg['task']['env']!r} has obs_dim={env.obs_dim}, act_dim={env.act_dim}"
        )


def env_factory(cfg: dict[str, Any]) -> EnvFactory:
    """The task's vectorised environment; eval.max_episode_steps shortens episodes (smoke runs)."""
    limit = cfg["eval"]["max_episode_steps"]
    name = cfg["task"]["env"]
    if is_mujoco(cfg):
        steps = 1000 if limit is None else int(limit)
        return lambda num_envs, seed: VectorMujocoEnv(name, num_envs, seed, max_episode_steps=steps)
    params = {} if limit is None else {"max_episode_steps": int(limit)}
    return tabular_factory(make_mdp(name, **params))


def _outcome(cfg: dict[str, Any], results: EpisodeResults) -> dict[str, Any]:
    """Every episode of one rollout and its aggregates (the part of a record a DT target repeats)."""
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
    if is_mujoco(cfg):
        scores = normalized_score(cfg["task"]["env"], returns)
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
    outcomes = []
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
        outcomes.append(_outcome(cfg, results))
    best = best_target(outcomes)
    record: dict[str, Any] = {
        "task": cfg["task"]["name"],
        "method": planner["name"],
        "seed": cfg["seed"],
        "env": cfg["task"]["env"],
        "constrained": bool(planner.get("constrained", False)),
        "constraint": cfg["task"]["action_constraint"],
        **outcomes[best],
        "planner": planner,
        "eval": ev,
    }
    if planner["method"] == "dt":
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


def dataset_kind(task: dict[str, Any]) -> str:
    """The dataset part of a MuJoCo task's name: medium, medium-replay, medium-expert, random-local, ..."""
    name = task["dataset"].get("name", task["name"])
    kind = name.removeprefix(f"{task['env']}-").removesuffix("-v2")
    return kind
