"""Batched rollouts: many episodes advance together, one policy call per environment step.

A single `Policy.act` call plans for every still-running episode of a batch, so planning cost is
amortised over the batch (the planner batches its beams across environments too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from trifle.envs.tabular import TabularMDP, VectorTabularEnv
from trifle.errors import ConfigError
from trifle.planning.policy import Policy


@dataclass
class EpisodeResults:
    """Per-episode outcomes of one evaluation run, in episode order."""

    returns: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    penalties: list[int] = field(default_factory=list)  # illegal actions (Taxi's #penalty)
    successes: list[bool] = field(default_factory=list)
    plan_seconds: float = 0.0  # wall time inside Policy.act
    env_steps: int = 0  # environment steps taken, all episodes together

    @property
    def step_seconds(self) -> float:
        """Planning wall time per environment step (batched calls shared among their episodes)."""
        return self.plan_seconds / max(self.env_steps, 1)

    def extend(self, other: EpisodeResults) -> None:
        self.returns += other.returns
        self.steps += other.steps
        self.penalties += other.penalties
        self.successes += other.successes
        self.plan_seconds += other.plan_seconds
        self.env_steps += other.env_steps


def _batch_rollout(policy: Policy, mdp: TabularMDP, num_envs: int, seed: int, bar: tqdm) -> EpisodeResults:
    env = VectorTabularEnv(mdp, num_envs, seed)
    obs = env.reset()
    policy.reset(num_envs, seed)
    returns = np.zeros(num_envs)
    steps = np.zeros(num_envs, np.int64)
    penalties = np.zeros(num_envs, np.int64)
    success = np.zeros(num_envs, bool)
    active = np.ones(num_envs, bool)
    out = EpisodeResults()
    while active.any():
        ids = np.flatnonzero(active)
        started = time.perf_counter()
        actions = np.asarray(policy.act(ids, obs[ids]))
        out.plan_seconds += time.perf_counter() - started
        full = np.zeros(num_envs, np.int64)
        full[ids] = np.rint(actions[:, 0]).astype(np.int64)
        obs, reward, terminated, truncated, info = env.step(full)
        policy.record(ids, actions, reward[ids])
        returns[ids] += reward[ids]
        steps[ids] += 1
        penalties[ids] += info["illegal"][ids]
        success[ids] |= info["success"][ids]
        out.env_steps += ids.size
        finished = active & (terminated | truncated)
        active &= ~finished
        bar.update(int(finished.sum()))
    out.returns, out.steps = returns.tolist(), steps.tolist()
    out.penalties, out.successes = penalties.tolist(), success.tolist()
    return out


def evaluate_policy(
    policy: Policy,
    mdp: TabularMDP,
    *,
    episodes: int,
    batch_episodes: int,
    seed: int,
    progress: bool = True,
) -> EpisodeResults:
    """Run ``episodes`` episodes in batches of ``batch_episodes``; batch b uses seed (seed, b)."""
    if episodes < 1 or batch_episodes < 1:
        raise ConfigError(f"eval.episodes={episodes}, eval.batch_episodes={batch_episodes}: expected >= 1")
    results = EpisodeResults()
    sizes = [min(batch_episodes, episodes - start) for start in range(0, episodes, batch_episodes)]
    with tqdm(total=episodes, desc=f"{mdp.name} episodes", unit="ep", disable=not progress) as bar:
        for b, size in enumerate(sizes):
            batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
            results.extend(_batch_rollout(policy, mdp, size, batch_seed, bar))
    return results
