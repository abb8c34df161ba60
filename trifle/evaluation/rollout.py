"""Batched rollouts: many episodes advance together, one policy call per environment step.

A single `Policy.act` call plans for every still-running episode of a batch, so planning cost is
amortised over the batch (the planner batches its beams across environments too). Environments are
vectorised simulators with one interface (``reset() -> obs``, ``step(actions) -> obs, reward,
terminated, truncated, info``, no automatic reset): the toy tasks' exact MDPs
(:class:`~trifle.envs.tabular.VectorTabularEnv`) and gymnasium's MuJoCo tasks
(:class:`~trifle.envs.mujoco.VectorMujocoEnv`).

Every method sees the same episodes: batch b of seed s seeds its environments with
``SeedSequence([s, b])``, and both vector envs give each episode slot its own random stream (the
tabular env a per-slot Generator for the reset and every transition, the MuJoCo env a per-slot reset
seed). Episode i of two methods therefore starts from the same state, and in the toy tasks keeps seeing
the same random numbers while their actions agree (common random numbers), which is what makes the
summary's paired differences (`trifle.evaluation.summary`) much tighter than unpaired ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from trifle.envs import make_mdp
from trifle.envs.mujoco import MUJOCO_ENVS, VectorMujocoEnv
from trifle.envs.tabular import TabularMDP, VectorTabularEnv
from trifle.errors import ConfigError
from trifle.evaluation.steps import EpisodeSteps
from trifle.planning.constraints import Bound, violations
from trifle.planning.policy import Policy

#: Builds ``num_envs`` environments of one task, seeded by ``seed``.
EnvFactory = Callable[[int, int], Any]


@dataclass
class EpisodeResults:
    """Per-episode outcomes of one evaluation run, in episode order."""

    returns: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    penalties: list[int] = field(default_factory=list)  # illegal actions (Taxi's #penalty)
    successes: list[bool] = field(default_factory=list)
    violations: list[int] = field(default_factory=list)  # steps whose action broke the constraint
    plan_seconds: float = 0.0  # wall time inside Policy.act
    env_steps: int = 0  # environment steps taken, all episodes together
    # Every episode's executed states, actions and rewards (the optimality score reads them).
    trajectories: list[EpisodeSteps] = field(default_factory=list)

    @property
    def step_seconds(self) -> float:
        """Planning wall time per environment step (batched calls shared among their episodes)."""
        return self.plan_seconds / max(self.env_steps, 1)

    @property
    def violation_rate(self) -> float:
        """Fraction of all environment steps whose executed action broke the constraint."""
        return sum(self.violations) / max(self.env_steps, 1)

    def extend(self, other: EpisodeResults) -> None:
        self.returns += other.returns
        self.steps += other.steps
        self.penalties += other.penalties
        self.successes += other.successes
        self.violations += other.violations
        self.plan_seconds += other.plan_seconds
        self.env_steps += other.env_steps
        self.trajectories += other.trajectories


def tabular_factory(mdp: TabularMDP) -> EnvFactory:
    """Environments of an exact MDP (its actions are single integers), one random stream per slot."""
    return lambda num_envs, seed: VectorTabularEnv(mdp, num_envs, seed, rng="per_env")


def _env_actions(env: Any, actions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The policy's raw actions ``[B, act_dim]`` of running envs ``ids`` as the env's ``step`` takes them."""
    if isinstance(env, VectorTabularEnv):
        full = np.zeros(env.num_envs, np.int64)
        full[ids] = np.rint(actions[:, 0]).astype(np.int64)
        return full
    full = np.zeros((env.num_envs, actions.shape[1]))
    full[ids] = actions
    return full


def _flag(info: dict[str, Any], key: str, num_envs: int) -> np.ndarray:
    """Per-env flags an env may report (Taxi's illegal actions, successes); absent means none."""
    return np.asarray(info.get(key, np.zeros(num_envs, bool)), bool)


def _batch_rollout(
    policy: Policy, env: Any, seed: int, bar: tqdm, constraint: Sequence[Bound]
) -> EpisodeResults:
    num_envs = env.num_envs
    obs = env.reset()
    policy.reset(num_envs, seed)
    returns = np.zeros(num_envs)
    steps, penalties, broken = (np.zeros(num_envs, np.int64) for _ in range(3))
    success = np.zeros(num_envs, bool)
    active = np.ones(num_envs, bool)
    out = EpisodeResults()
    seen: list[list[tuple[np.ndarray, np.ndarray, float]]] = [[] for _ in range(num_envs)]
    while active.any():
        ids = np.flatnonzero(active)
        started = time.perf_counter()
        actions = np.asarray(policy.act(ids, obs[ids]), np.float64)
        out.plan_seconds += time.perf_counter() - started
        executed = _env_actions(env, actions, ids)
        before = obs
        obs, reward, terminated, truncated, info = env.step(executed)
        for i in ids:
            seen[i].append((before[i], np.atleast_1d(executed[i]), float(reward[i])))
        policy.record(ids, actions, reward[ids])
        returns[ids] += reward[ids]
        steps[ids] += 1
        penalties[ids] += _flag(info, "illegal", num_envs)[ids]
        success[ids] |= _flag(info, "success", num_envs)[ids]
        broken[ids] += violations(actions, constraint)
        out.env_steps += ids.size
        finished = active & (terminated | truncated)
        active &= ~finished
        bar.update(int(finished.sum()))
    out.returns, out.steps = returns.tolist(), steps.tolist()
    out.penalties, out.successes = penalties.tolist(), success.tolist()
    out.violations = broken.tolist()
    out.trajectories = [
        EpisodeSteps(
            obs=np.array([o for o, _, _ in episode], np.float64),
            actions=np.array([a for _, a, _ in episode], np.float64),
            rewards=np.array([r for _, _, r in episode], np.float64),
        )
        for episode in seen
    ]
    return out


def evaluate_policy(
    policy: Policy,
    env: TabularMDP | EnvFactory,
    *,
    episodes: int,
    batch_episodes: int,
    seed: int,
    progress: bool = True,
    constraint: Sequence[Bound] = (),
    name: str | None = None,
) -> EpisodeResults:
    """Run ``episodes`` episodes in batches of ``batch_episodes``; batch b uses seed (seed, b).

    Episode ``b * batch_episodes + i`` is slot ``i`` of batch ``b``, so two methods evaluated with the
    same ``seed`` and ``batch_episodes`` share the environment randomness of every episode index.

    ``env`` is an exact MDP or a factory ``(num_envs, seed) -> vector env``. Every executed action is
    checked against ``constraint`` (the per-episode count of violating steps is recorded), so a
    constrained method's claim of zero violations is measured, not assumed.
    """
    if episodes < 1 or batch_episodes < 1:
        raise ConfigError(f"eval.episodes={episodes}, eval.batch_episodes={batch_episodes}: expected >= 1")
    if isinstance(env, TabularMDP):
        name = name or env.name
        env = tabular_factory(env)
    results = EpisodeResults()
    sizes = [min(batch_episodes, episodes - start) for start in range(0, episodes, batch_episodes)]
    with tqdm(total=episodes, desc=f"{name or 'env'} episodes", unit="ep", disable=not progress) as bar:
        for b, size in enumerate(sizes):
            batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
            vector_env = env(size, batch_seed)
            try:
                results.extend(_batch_rollout(policy, vector_env, batch_seed, bar, constraint))
            finally:
                if hasattr(vector_env, "close"):
                    vector_env.close()
    return results


def env_factory(cfg: dict[str, Any]) -> EnvFactory:
    """The task's vectorised environment (``task.env``); ``eval.max_episode_steps`` shortens episodes."""
    limit = cfg["eval"]["max_episode_steps"]
    name = cfg["task"]["env"]
    if name in MUJOCO_ENVS:
        steps = 1000 if limit is None else int(limit)
        return lambda num_envs, seed: VectorMujocoEnv(name, num_envs, seed, max_episode_steps=steps)
    params = {} if limit is None else {"max_episode_steps": int(limit)}
    return tabular_factory(make_mdp(name, **params))
