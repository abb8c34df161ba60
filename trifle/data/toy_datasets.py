"""Offline datasets for the stochastic toy tasks, regenerated locally because the paper released none.

* Taxi (paper Appx E.2): a tabular Q-learning agent learns online and we keep the *first*
  ``num_episodes`` episodes that deliver the passenger. Because learning starts from scratch, the
  early episodes are long and penalty-heavy, which is what gives the paper's low mean return (-128).
* FrozenLake (paper §6.2, following DoC): a fixed good policy (here the exact optimal policy, standing
  in for the paper's well-trained DQN, whose average return 0.7 our optimal policy's 0.74 matches)
  perturbed epsilon-greedily; every episode is kept, so epsilon controls dataset quality.

Both return ``(arrays, attrs)`` in the D4RL layout of :mod:`trifle.data.d4rl_format`. Every random draw
comes from one ``numpy`` Generator seeded by ``seed``, so a seed fixes the dataset bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from trifle.data.labels import label_trajectories
from trifle.data.tokens import TokenData, tokenize
from trifle.envs.frozenlake import make_frozenlake
from trifle.envs.tabular import TabularMDP, VectorTabularEnv, evaluate_policy, greedy_policy, value_iteration
from trifle.envs.taxi import make_taxi
from trifle.errors import ConfigError

Arrays = dict[str, np.ndarray]
STEP_KEYS = ("state", "action", "reward", "terminal", "timeout", "next_state", "illegal", "success")


def _check_options(epsilon: float, num_episodes: int, **unit_interval: float) -> None:
    """Reject out-of-range generator options with a message naming the option."""
    for name, value in {"epsilon": epsilon, **unit_interval}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    if num_episodes < 1:
        raise ConfigError(f"num_episodes must be >= 1, got {num_episodes}")


def d4rl_arrays(mdp: TabularMDP, steps: dict[str, np.ndarray]) -> Arrays:
    """Turn per-step state indices and flags (episode-major order) into D4RL-layout arrays."""
    return {
        "observations": mdp.decode(steps["state"]).astype(np.float32),
        "actions": steps["action"].astype(np.float32)[:, None],
        "rewards": steps["reward"].astype(np.float32),
        "terminals": steps["terminal"].astype(bool),
        "timeouts": steps["timeout"].astype(bool),
        "next_observations": mdp.decode(steps["next_state"]).astype(np.float32),
        "infos/state": steps["state"].astype(np.int64),
        "infos/illegal": steps["illegal"].astype(bool),
        "infos/success": steps["success"].astype(bool),
    }


def episode_returns(arrays: Arrays) -> np.ndarray:
    """Undiscounted return of each complete episode (episodes end on terminal or timeout)."""
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    cumulative = np.concatenate([[0.0], np.cumsum(arrays["rewards"], dtype=np.float64)])
    return cumulative[ends + 1] - cumulative[starts]


def _base_attrs(task: str, mdp: TabularMDP, arrays: Arrays, seed: int) -> dict[str, Any]:
    """Summary attributes; deliberately no wall-clock time, so the same seed gives the same file bytes."""
    returns = episode_returns(arrays)
    return {
        "task": task,
        "seed": seed,
        "num_episodes": int(returns.size),
        "num_steps": int(arrays["rewards"].size),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "success_rate": float(arrays["infos/success"][arrays["terminals"] | arrays["timeouts"]].mean()),
        "obs_cardinalities": list(mdp.obs_cardinalities),
        "num_actions": mdp.num_actions,
        "max_episode_steps": mdp.max_episode_steps,
    }


def generate_taxi_dataset(
    *,
    num_episodes: int = 1000,
    seed: int = 0,
    learning_rate: float = 0.13,
    epsilon: float = 0.1,
    gamma: float = 0.99,
    progress: bool = True,
) -> tuple[Arrays, dict[str, Any]]:
    """Q-learning on the stochastic Taxi; keep the first ``num_episodes`` delivering episodes.

    The agent starts from ``Q = 0`` (optimistic, since every step costs at least 1), acts
    epsilon-greedily with a constant ``epsilon`` and learns from every episode, failed ones included.
    Step-limit truncations bootstrap (a time limit is not an MDP terminal).
    """
    _check_options(epsilon, num_episodes, learning_rate=learning_rate, gamma=gamma)
    mdp = make_taxi()
    kept, attempts = _q_learning(
        mdp, num_episodes, np.random.default_rng(seed), learning_rate, epsilon, gamma, progress
    )
    steps = {key: np.concatenate([np.asarray(ep[key]) for ep in kept]) for key in STEP_KEYS}
    arrays = d4rl_arrays(mdp, steps)
    attrs = _base_attrs("taxi-stochastic", mdp, arrays, seed)
    attrs["generator"] = {
        "name": "q_learning_first_successes",
        "learning_rate": learning_rate,
        "epsilon": epsilon,
        "gamma": gamma,
        "q_learning_episodes": attempts,
        "q_learning_success_rate": num_episodes / attempts,
    }
    return arrays, attrs


def _q_learning(
    mdp: TabularMDP,
    wanted: int,
    rng: np.random.Generator,
    lr: float,
    eps: float,
    gamma: float,
    progress: bool,
) -> tuple[list[dict[str, list]], int]:
    """Run episodes until ``wanted`` succeed; return those episodes' steps and the number of episodes run.

    Written as a scalar loop over Python lists: one agent learning online is inherently sequential,
    and list indexing is several times faster than numpy scalar access.
    """
    cdf = np.cumsum(mdp.prob, axis=-1)
    cdf = (cdf / cdf[..., -1:]).tolist()
    nxt, rew, term, ill = (getattr(mdp, k).tolist() for k in ("next_state", "reward", "terminal", "illegal"))
    succ = mdp.success.tolist()
    q = np.zeros((mdp.num_states, mdp.num_actions))
    kept: list[dict[str, list]] = []
    attempts = 0
    bar = tqdm(total=wanted, desc="taxi Q-learning (successful episodes)", disable=not progress)
    while len(kept) < wanted:
        attempts += 1
        ep: dict[str, list] = {key: [] for key in STEP_KEYS}
        s = int(rng.choice(mdp.num_states, p=mdp.initial))
        for t in range(mdp.max_episode_steps):
            u = rng.random(3)
            a = int(u[1] * mdp.num_actions) if u[0] < eps else int(q[s].argmax())
            k = next(i for i, c in enumerate(cdf[s][a]) if u[2] < c)
            s2, r, done = nxt[s][a][k], rew[s][a][k], term[s][a][k]
            q[s, a] += lr * (r + (0.0 if done else gamma * q[s2].max()) - q[s, a])
            timeout = not done and t == mdp.max_episode_steps - 1
            outcome = (s, a, r, done, timeout, s2, ill[s][a][k], succ[s][a][k])
            for key, value in zip(STEP_KEYS, outcome, strict=True):
                ep[key].append(value)
            s = s2
            if done:
                break
        if ep["success"][-1]:
            kept.append(ep)
            bar.update(1)
    bar.close()
    return kept, attempts


def generate_frozenlake_dataset(
    *, epsilon: float, num_episodes: int = 1000, seed: int = 0, gamma: float = 0.99, progress: bool = True
) -> tuple[Arrays, dict[str, Any]]:
    """Roll out the epsilon-perturbed optimal policy on slippery FrozenLake and keep every episode."""
    _check_options(epsilon, num_episodes, gamma=gamma)
    mdp = make_frozenlake()
    q, _ = value_iteration(mdp, gamma)
    policy = (1.0 - epsilon) * greedy_policy(q) + epsilon / mdp.num_actions
    steps = rollout_policy(mdp, policy, num_episodes, np.random.default_rng(seed), progress)
    arrays = d4rl_arrays(mdp, steps)
    attrs = _base_attrs(f"frozenlake-eps{epsilon}", mdp, arrays, seed)
    exact = evaluate_policy(mdp, policy)
    attrs["generator"] = {
        "name": "optimal_policy_epsilon_greedy",
        "epsilon": epsilon,
        "gamma": gamma,
        "behaviour_expected_return": exact.expected_return,
        "behaviour_success_probability": exact.success_probability,
    }
    return arrays, attrs


def rollout_policy(
    mdp: TabularMDP, policy: np.ndarray, num_episodes: int, rng: np.random.Generator, progress: bool = True
) -> dict[str, np.ndarray]:
    """Run ``num_episodes`` episodes of a stationary ``[S, A]`` policy in parallel; steps in episode-major order."""
    # The shared-RNG layout keeps the published datasets bit for bit (evaluation uses per-slot streams).
    env = VectorTabularEnv(mdp, num_episodes, seed=int(rng.integers(2**63)), rng="shared")
    env.reset()
    cdf = np.cumsum(policy, axis=-1)
    per_t: list[dict[str, np.ndarray]] = []
    for _ in tqdm(range(mdp.max_episode_steps), desc=f"{mdp.name} rollouts (steps)", disable=not progress):
        if env.done.all():
            break
        s = env.states.copy()
        a = (rng.random(num_episodes)[:, None] * cdf[:, -1:][s] >= cdf[s]).sum(-1)
        _, r, term, trunc, info = env.step(a)
        outcome = (s, a, r, term, trunc, info["state"], info["illegal"], info["success"])
        per_t.append(dict(zip(STEP_KEYS, outcome, strict=True)))
        per_t[-1]["stepped"] = info["stepped"]
    mask = np.stack([step["stepped"] for step in per_t], axis=1)  # [E, T]; row-major = episode-major
    return {key: np.stack([step[key] for step in per_t], axis=1)[mask] for key in STEP_KEYS}


#: The toy tasks' generators by ``task.dataset.generator`` name.
TOY_GENERATORS = {"taxi": generate_taxi_dataset, "frozenlake": generate_frozenlake_dataset}


def toy_task_tokens(task: dict[str, Any]) -> tuple[TokenData, float]:
    """A toy task's tokens made in memory as the data, labels and tokens stages make them on disk (same
    generator, labels and discretizer settings from the composed ``task`` config), and the dataset's
    mean return. For analyses that need the data without the workflow (the oracle models' benchmark)."""
    params = dict(task["dataset"])
    generator = params.pop("generator")
    if generator not in TOY_GENERATORS:
        raise ConfigError(
            f"task.dataset.generator={generator!r}: expected a toy task's ({', '.join(TOY_GENERATORS)})"
        )
    arrays, attrs = TOY_GENERATORS[generator](**params, progress=False)
    labels = task["labels"]
    labeled = label_trajectories(
        arrays, discount=labels["discount"], termination_penalty=labels["termination_penalty"], attrs=attrs
    )
    data = tokenize(
        labeled,
        task["discretizer"],
        obs_cardinalities=attrs.get("obs_cardinalities"),
        num_actions=attrs.get("num_actions"),
    )
    return data, float(attrs["mean_return"])
