"""Batched rollouts and the summary table, on a deterministic FrozenLake where every outcome is known."""

import math

import numpy as np
import pytest

from trifle.envs.frozenlake import make_frozenlake
from trifle.errors import ConfigError, DataError
from trifle.evaluation.rollout import evaluate_policy
from trifle.evaluation.summary import load_evaluation, summarize

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
# Deterministic path to the goal on SFFF/FHFH/FFFH/HFFG: right, right, down, down, down, right.
PATH = {(0, 0): RIGHT, (0, 1): RIGHT, (0, 2): DOWN, (1, 2): DOWN, (2, 2): DOWN, (3, 2): RIGHT}


class ScriptedPolicy:
    """Acts from a table of observations; records what it was told, to check the rollout's bookkeeping."""

    def __init__(self, table: dict, default: int) -> None:
        self.table, self.default = table, default
        self.recorded: list[tuple[list[int], list[float]]] = []

    def reset(self, num_envs: int, seed: int) -> None:
        self.recorded.clear()

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        return np.array([[self.table.get(tuple(int(v) for v in o), self.default)] for o in obs], float)

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        self.recorded.append((env_ids.tolist(), rewards.tolist()))


def test_successful_path_is_scored_exactly():
    mdp = make_frozenlake(success_rate=1.0)
    results = evaluate_policy(
        ScriptedPolicy(PATH, LEFT), mdp, episodes=5, batch_episodes=2, seed=0, progress=False
    )
    assert results.returns == [1.0] * 5 and results.steps == [6] * 5 and all(results.successes)
    assert results.env_steps == 30 and results.penalties == [0] * 5


def test_stuck_policy_times_out_as_a_failure():
    mdp = make_frozenlake(success_rate=1.0, max_episode_steps=7)
    policy = ScriptedPolicy({}, LEFT)
    results = evaluate_policy(policy, mdp, episodes=3, batch_episodes=3, seed=0, progress=False)
    assert results.returns == [0.0] * 3 and results.steps == [7] * 3 and not any(results.successes)
    assert len(policy.recorded) == 7 and all(ids == [0, 1, 2] for ids, _ in policy.recorded)


def test_finished_episodes_are_no_longer_passed_to_the_policy():
    mdp = make_frozenlake(success_rate=1.0)
    # Right to (0, 1), then down into the hole at (1, 1): the episode ends after two steps.
    table = {(0, 0): RIGHT, (0, 1): DOWN}
    policy = ScriptedPolicy(table, LEFT)
    results = evaluate_policy(policy, mdp, episodes=2, batch_episodes=2, seed=0, progress=False)
    assert results.steps == [2, 2] and results.returns == [0.0, 0.0] and len(policy.recorded) == 2


def test_bad_budget_is_rejected():
    with pytest.raises(ConfigError, match="eval.episodes"):
        evaluate_policy(ScriptedPolicy({}, LEFT), make_frozenlake(), episodes=0, batch_episodes=1, seed=0)


def _record(method, seed, returns, successes, penalties=None):
    return {
        "task": "t",
        "method": method,
        "seed": seed,
        "episodes": {
            "returns": returns,
            "successes": successes,
            "penalties": penalties or [0] * len(returns),
        },
        "plan_seconds": 2.0,
        "env_steps": 4,
    }


def test_summary_averages_seeds_with_a_seed_level_standard_error():
    rows = summarize(
        [
            _record("tt", 0, [1.0, 3.0], [True, False], [1, 0]),
            _record("tt", 1, [5.0], [True]),
            _record("dt", 0, [0.0], [False]),
        ]
    )
    assert [r["method"] for r in rows] == ["dt", "tt"]
    dt, tt = rows
    assert tt["n_seeds"] == 2 and tt["n_episodes"] == 3 and tt["sem_over"] == "seeds"
    # Seed means 2 and 5, each seed weighing the same (pooling the 3 episodes would give 3).
    assert tt["return_mean"] == pytest.approx(3.5)
    assert tt["return_sem"] == pytest.approx(math.sqrt(4.5) / math.sqrt(2))
    # Per-seed failure rates 1/2 and 0, penalties 1/2 and 0.
    assert tt["failure_rate"] == pytest.approx(0.25) and tt["penalty_mean"] == pytest.approx(0.25)
    assert tt["step_seconds"] == pytest.approx(0.5)
    assert dt["sem_over"] == "episodes" and math.isnan(dt["return_sem"])


def test_evaluation_file_missing_key_is_named(tmp_path):
    from trifle.io import write_json

    write_json(tmp_path / "e.json", {"task": "t"})
    with pytest.raises(DataError, match="e.json.*'method'"):
        load_evaluation(tmp_path / "e.json")


class ConstantAction:
    """The same raw action in every environment (a continuous-action policy)."""

    def __init__(self, action: list[float]) -> None:
        self.action = np.asarray(action, float)

    def reset(self, num_envs: int, seed: int) -> None:
        pass

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        return np.tile(self.action, (len(env_ids), 1))

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        pass


def test_mujoco_rollouts_count_every_constraint_violation_and_match_single_env_returns():
    """Hopper with a fixed action: every step breaks foot <= 0.5 (0.8 > 0.5) and none breaks thigh <= 0.9;
    the constraint is only measured, so it does not change the episodes."""
    from trifle.envs.mujoco import VectorMujocoEnv
    from trifle.planning.constraints import Bound

    def factory(n: int, seed: int):
        return VectorMujocoEnv("hopper", n, seed, max_episode_steps=30)

    def run(bound: Bound):
        policy = ConstantAction([0.1, -0.2, 0.8])
        return evaluate_policy(
            policy, factory, episodes=3, batch_episodes=3, seed=4, progress=False, constraint=[bound]
        )

    results = run(Bound(2, None, 0.5))
    assert results.violations == results.steps and results.violation_rate == 1.0
    assert results.env_steps == sum(results.steps) and all(1 <= s <= 30 for s in results.steps)
    ok = run(Bound(0, None, 0.9))
    assert ok.violations == [0, 0, 0] and ok.returns == results.returns
