"""Stage `evaluate`: roll out one method on one task and save every episode's outcome.

Every check that can fail (planner settings against the trained models, checkpoints against the
data and the environment, the action constraint against the discretizer) runs while the policy is
built, before the first episode starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trifle.data.tokens import TokenData, load_tokens
from trifle.envs import make_mdp
from trifle.envs.mujoco import MUJOCO_ENVS, VectorMujocoEnv, normalized_score
from trifle.errors import CheckpointError, ConfigError
from trifle.evaluation.rollout import EnvFactory, evaluate_policy, tabular_factory
from trifle.io import write_json
from trifle.planning.constraints import parse_constraint
from trifle.planning.dt_policy import DTPolicy
from trifle.planning.planners import build_planner
from trifle.planning.policy import Policy
from trifle.stages.devices import resolve_device


def is_mujoco(cfg: dict[str, Any]) -> bool:
    """Gym-MuJoCo tasks get vectorised MuJoCo envs, a dimension check and normalized scores."""
    return cfg["task"]["env"] in MUJOCO_ENVS


def build_policy(cfg: dict[str, Any], device: str) -> Policy:
    """The evaluated method: the DT baseline, or a beam planner (tt, trifle-s, trifle-m, safe variants)."""
    planner, paths = cfg["planner"], cfg["paths"]
    if planner["method"] == "dt":
        target = planner["target_return"]
        target = cfg["task"].get("dt_target_return") if target is None else target
        if target is None:
            raise ConfigError("planner.target_return: no target return set (nor task.dt_target_return)")
        return DTPolicy.from_checkpoint(
            paths["dt"], target_return=target, sample=planner["sample"], device=device
        )
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


def run(cfg: dict[str, Any]) -> Path:
    policy = build_policy(cfg, resolve_device(cfg["device"]))
    planner, ev = cfg["planner"], cfg["eval"]
    # Violations are counted against the task's constraint for every method, constrained or not.
    constraint = parse_constraint(cfg["task"]["action_constraint"])
    results = evaluate_policy(
        policy,
        env_factory(cfg),
        episodes=ev["episodes"],
        batch_episodes=ev["batch_episodes"],
        seed=cfg["seed"],
        progress=cfg["progress"],
        constraint=constraint,
        name=cfg["task"]["name"],
    )
    episodes: dict[str, Any] = {
        "returns": results.returns,
        "steps": results.steps,
        "penalties": results.penalties,
        "successes": results.successes,
        "violations": results.violations,
    }
    record: dict[str, Any] = {
        "task": cfg["task"]["name"],
        "method": planner["name"],
        "seed": cfg["seed"],
        "env": cfg["task"]["env"],
        "constrained": bool(planner.get("constrained", False)),
        "constraint": cfg["task"]["action_constraint"],
        "episodes": episodes,
        "return_mean": float(np.mean(results.returns)),
        "success_rate": float(np.mean(results.successes)),
        "violation_rate": results.violation_rate,
        "plan_seconds": results.plan_seconds,
        "env_steps": results.env_steps,
        "step_seconds": results.step_seconds,
        "planner": planner,
        "eval": ev,
    }
    if is_mujoco(cfg):
        scores = normalized_score(cfg["task"]["env"], np.asarray(results.returns))
        episodes["scores"] = scores.tolist()
        record["dataset"] = dataset_kind(cfg["task"])
        record["score_mean"] = float(scores.mean())
    out = Path(cfg["paths"]["eval"])
    write_json(out, record)
    return out


def dataset_kind(task: dict[str, Any]) -> str:
    """The dataset part of a MuJoCo task's name: medium, medium-replay, medium-expert, random-local, ..."""
    name = task["dataset"].get("name", task["name"])
    kind = name.removeprefix(f"{task['env']}-").removesuffix("-v2")
    return kind
