"""Stage `evaluate`: roll out one method on one task and save every episode's outcome.

Every check that can fail (planner settings against the trained models, checkpoints against the
data) runs while the policy is built, before the first episode starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.tokens import load_tokens
from trifle.envs import make_mdp
from trifle.errors import ConfigError
from trifle.evaluation.rollout import evaluate_policy
from trifle.io import write_json
from trifle.planning.dt_policy import DTPolicy
from trifle.planning.planners import build_planner
from trifle.planning.policy import Policy
from trifle.stages.devices import resolve_device


def build_policy(cfg: dict[str, Any], device: str) -> Policy:
    """The evaluated method: the DT baseline, or a beam planner (tt, trifle-s, trifle-m)."""
    planner, paths = cfg["planner"], cfg["paths"]
    if planner["method"] == "dt":
        target = planner["target_return"]
        target = cfg["task"].get("dt_target_return") if target is None else target
        if target is None:
            raise ConfigError("planner.target_return: no target return set (nor task.dt_target_return)")
        return DTPolicy.from_checkpoint(
            paths["dt"], target_return=target, sample=planner["sample"], device=device
        )
    return build_planner(
        planner,
        gpt_path=paths["gpt"],
        circuit_path=paths["pc"] if planner["method"] != "tt" else None,
        tokens=load_tokens(paths["tokens"]),
        circuit_window=cfg["task"]["pc_window"],
        discount=cfg["task"]["labels"]["discount"],
        device=device,
    )


def make_env(cfg: dict[str, Any]):
    """The task's environment, with a shorter step limit only when eval.max_episode_steps asks for it."""
    limit = cfg["eval"]["max_episode_steps"]
    params = {} if limit is None else {"max_episode_steps": int(limit)}
    return make_mdp(cfg["task"]["env"], **params)


def run(cfg: dict[str, Any]) -> Path:
    policy = build_policy(cfg, resolve_device(cfg["device"]))
    mdp = make_env(cfg)
    ev = cfg["eval"]
    results = evaluate_policy(
        policy,
        mdp,
        episodes=ev["episodes"],
        batch_episodes=ev["batch_episodes"],
        seed=cfg["seed"],
        progress=cfg["progress"],
    )
    out = Path(cfg["paths"]["eval"])
    write_json(
        out,
        {
            "task": cfg["task"]["name"],
            "method": cfg["planner"]["method"],
            "seed": cfg["seed"],
            "episodes": {
                "returns": results.returns,
                "steps": results.steps,
                "penalties": results.penalties,
                "successes": results.successes,
            },
            "return_mean": sum(results.returns) / len(results.returns),
            "success_rate": sum(results.successes) / len(results.successes),
            "plan_seconds": results.plan_seconds,
            "env_steps": results.env_steps,
            "step_seconds": results.step_seconds,
            "planner": cfg["planner"],
            "eval": ev,
        },
    )
    return out
