"""Small Gym-MuJoCo datasets in D4RL's layout, rolled out locally.

The real D4RL files cannot be downloaded everywhere (tests, CI, machines without network), so this
module produces files with exactly their layout and conventions from gymnasium's v4 envs, which
reproduce D4RL's v2 envs: ``infos/qpos``/``infos/qvel`` hold the simulator state *before* each step (so
``set_state`` + ``_get_obs`` reproduces the stored observation, D4RL's own consistency check),
``timeouts`` flag steps that hit the step limit, and an episode left unfinished at the end of the data is
left unflagged, as D4RL does.

Three behaviour sources: ``"random"`` (uniform actions); ``"sac"``, a stable-baselines3 SAC agent
trained for ``sac_steps`` env steps, like the partly trained SAC agents behind D4RL's "medium" datasets
(see :mod:`trifle.data.behaviour`; it needs the ``behaviour`` extra); and ``"sac-replay"``, the same
agent's replay buffer, i.e. every transition it collected while learning, like D4RL's "medium-replay"
datasets (the first ``num_steps`` of them; no ``infos/*``, which the buffer does not keep).

Every random draw of the rollout (actions, the SAC policy's noise and env reset seeds) comes from one
``numpy`` Generator seeded by ``seed``, so a seed (and, for SAC, the trained model) fixes the dataset bit
for bit.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trifle.envs.mujoco import MUJOCO_ENVS, check_env_name, make_raw_env, normalized_score, reference_scores
from trifle.errors import ConfigError, TrifleError

Arrays = dict[str, np.ndarray]
Policy = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, float]]
POLICIES = ("random", "sac", "sac-replay")
SAC_POLICIES = ("sac", "sac-replay")


def _check_options(
    env: str,
    num_steps: int,
    policy: str,
    max_episode_steps: int,
    sac_steps: int,
    work_dir: str | Path | None,
    sac: dict[str, Any],
) -> None:
    """Reject bad generator options with a message naming the option."""
    check_env_name(env)
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if max_episode_steps < 1:
        raise ConfigError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    if policy in SAC_POLICIES and sac_steps < 1:
        raise ConfigError(f"sac_steps must be >= 1, got {sac_steps}")
    if sac["target_return"] is not None and not isinstance(sac["target_return"], int | float):
        raise ConfigError(f"sac_target_return must be a number or null, got {sac['target_return']!r}")
    for key in ("eval_every", "eval_episodes"):
        if not isinstance(sac[key], int) or sac[key] < 1:
            raise ConfigError(f"sac_{key} must be an integer >= 1, got {sac[key]!r}")
    if policy in SAC_POLICIES and work_dir is None:
        raise ConfigError(
            f"policy {policy!r} needs a work directory (work_dir) for the SAC training checkpoints, got none"
        )


class UniformPolicy:
    """Uniform actions over the box ``[low, high]``; its log-density is the same for every action."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.log_prob = float(-np.log(self.high - self.low).sum())

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Sample in float32, the stored dtype, so the stored action is exactly the one applied."""
        return rng.uniform(self.low, self.high).astype(np.float32), self.log_prob


def generate_mujoco_dataset(
    *,
    env: str,
    num_steps: int,
    seed: int = 0,
    policy: str = "random",
    max_episode_steps: int = 1000,
    progress: bool = True,
    sac_steps: int = 100_000,
    sac_target_return: float | None = None,
    sac_eval_every: int = 10_000,
    sac_eval_episodes: int = 10,
    work_dir: str | Path | None = None,
) -> tuple[Arrays, dict[str, Any]]:
    """Roll out ``policy`` in one env for exactly ``num_steps`` steps, resetting on termination or timeout.

    For ``policy="sac"`` a SAC agent is first trained for ``sac_steps`` env steps with seed ``seed``, or
    loaded, into ``work_dir`` (resumable; see :func:`trifle.data.behaviour.train_sac`), and its stochastic
    policy is rolled out; ``infos/action_log_probs`` then holds the exact log-density of each stored action.
    With ``sac_target_return`` the training stops at the first evaluation (every ``sac_eval_every`` steps,
    ``sac_eval_episodes`` episodes) whose mean return reaches it, ``sac_steps`` being then the budget: D4RL's
    recipe for a "medium" agent.
    """
    sac = {
        "target_return": sac_target_return,
        "eval_every": sac_eval_every,
        "eval_episodes": sac_eval_episodes,
    }
    _check_options(env, num_steps, policy, max_episode_steps, sac_steps, work_dir, sac)
    train = {"steps": sac_steps, "seed": seed, "progress": progress, **_train_options(sac)}
    if policy == "sac-replay":
        return _sac_replay(env, train, Path(work_dir), num_steps, max_episode_steps)
    rng = np.random.default_rng(seed)
    sim = make_raw_env(env)
    try:
        if policy == "sac":
            steps, returns = _sac_rollout(
                sim, env, train, Path(work_dir), rng, num_steps, max_episode_steps, progress
            )
        else:
            act = UniformPolicy(sim.action_space.low, sim.action_space.high)
            steps, returns = _rollout(
                sim, act, rng, num_steps, max_episode_steps, f"{env} {policy}", progress
            )
    finally:
        sim.close()
    arrays = _d4rl_arrays(steps)
    if not np.any(arrays["terminals"] | arrays["timeouts"]):
        # The file format needs at least one episode end; the loader reads an unfinished tail as a timeout.
        arrays["timeouts"][-1] = True
    attrs = _attrs(env, policy, seed, num_steps, max_episode_steps, np.asarray(returns))
    if policy == "sac":
        attrs.update(_agent_attrs(sac_steps, sac_target_return, Path(work_dir)))
        # The trained policy's mean return over the dataset's complete episodes (so equal to mean_return),
        # named for what it measures: how good the "medium" behaviour policy is.
        attrs["behaviour_return"] = attrs["mean_return"]
    return arrays, attrs


def _behaviour_module() -> Any:
    """Import :mod:`trifle.data.behaviour` lazily: stable-baselines3 is an optional dependency."""
    try:
        behaviour = importlib.import_module("trifle.data.behaviour")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("stable_baselines3"):
            raise
        raise TrifleError(
            "policy 'sac' needs stable-baselines3: pip install 'stable-baselines3>=2.3,<3' "
            "(or the package's 'behaviour' extra)"
        ) from err
    return behaviour


def _train_options(sac: dict[str, Any]) -> dict[str, Any]:
    """train_sac's keyword arguments for the stopping rule (none for a fixed budget, as before it existed)."""
    if sac["target_return"] is None:
        return {}
    return {
        "target_return": float(sac["target_return"]),
        "checkpoint_every": sac["eval_every"],
        "eval_episodes": sac["eval_episodes"],
    }


def _agent_attrs(sac_steps: int, target_return: float | None, work_dir: Path) -> dict[str, Any]:
    """What the dataset records about its agent: the budget, and for a target-return training where it
    stopped and what its own evaluation measured there."""
    attrs: dict[str, Any] = {"sac_steps": sac_steps}
    if target_return is not None:
        result = _behaviour_module().training_result(work_dir)
        attrs.update(
            sac_target_return=float(target_return),
            sac_steps_trained=int(result["steps"]),
            sac_target_reached=bool(result["reached"]),
            sac_eval_return=result["eval_return"],
        )
    return attrs


def _sac_rollout(
    sim: Any,
    env: str,
    train: dict[str, Any],
    work_dir: Path,
    rng: np.random.Generator,
    num_steps: int,
    max_episode_steps: int,
    progress: bool,
) -> tuple[dict[str, list], list[float]]:
    """Train or load the SAC behaviour policy, then roll it out on one torch thread."""
    behaviour = _behaviour_module()
    model = behaviour.train_sac(env, work_dir=work_dir, **train)
    act = behaviour.SACBehaviour(model, sim.action_space.low, sim.action_space.high)
    with behaviour.torch_threads(1):
        return _rollout(sim, act, rng, num_steps, max_episode_steps, f"{env} sac", progress)


def _sac_replay(
    env: str, train: dict[str, Any], work_dir: Path, num_steps: int, max_episode_steps: int
) -> tuple[Arrays, dict[str, Any]]:
    """The first ``num_steps`` transitions of the SAC agent's replay buffer (training it first if needed)."""
    behaviour = _behaviour_module()
    behaviour.train_sac(env, work_dir=work_dir, **train)
    steps = {key: value[:num_steps] for key, value in behaviour.final_replay(work_dir).items()}
    arrays = _d4rl_arrays(steps)
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    if not ends.size:
        arrays["timeouts"][-1] = True  # the file format needs an episode end (see generate_mujoco_dataset)
    starts = np.concatenate([[0], ends[:-1] + 1])[: len(ends)]  # complete episodes only
    returns = np.array(
        [arrays["rewards"][a : b + 1].sum(dtype=np.float64) for a, b in zip(starts, ends, strict=True)]
    )
    attrs = _attrs(env, "sac-replay", train["seed"], len(arrays["rewards"]), max_episode_steps, returns)
    attrs.update(_agent_attrs(train["steps"], train.get("target_return"), work_dir))
    # The mean return of the complete episodes in the buffer: a mixture of every stage of the training.
    attrs["behaviour_return"] = attrs["mean_return"]
    return arrays, attrs


def _rollout(
    sim: Any,
    policy: Policy,
    rng: np.random.Generator,
    num_steps: int,
    max_episode_steps: int,
    desc: str,
    progress: bool,
) -> tuple[dict[str, list], list[float]]:
    """Step one env ``num_steps`` times; return per-step records and the returns of finished episodes."""
    keys = ("obs", "action", "reward", "terminal", "timeout", "next_obs", "qpos", "qvel", "log_prob")
    steps: dict[str, list] = {key: [] for key in keys}
    returns: list[float] = []
    obs, _ = sim.reset(seed=int(rng.integers(2**31)))
    t, ret = 0, 0.0
    for _ in tqdm(range(num_steps), desc=f"{desc} rollout (steps)", disable=not progress):
        qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
        action, log_prob = policy(obs, rng)
        next_obs, reward, terminated, _, _ = sim.step(action)
        t += 1
        ret += reward
        timeout = not terminated and t >= max_episode_steps
        record = (obs, action, reward, terminated, timeout, next_obs, qpos, qvel, log_prob)
        for key, value in zip(keys, record, strict=True):
            steps[key].append(value)
        if terminated or timeout:
            returns.append(ret)
            obs, _ = sim.reset(seed=int(rng.integers(2**31)))
            t, ret = 0, 0.0
        else:
            obs = next_obs
    return steps, returns


def _d4rl_arrays(steps: dict[str, Any]) -> Arrays:
    """Stack per-step records into D4RL-layout arrays and dtypes; ``infos/*`` only where recorded (a
    replay buffer keeps no simulator state or log-densities)."""
    arrays = {
        "observations": np.asarray(steps["obs"], dtype=np.float32),
        "actions": np.asarray(steps["action"], dtype=np.float32),
        "rewards": np.asarray(steps["reward"], dtype=np.float32),
        "terminals": np.asarray(steps["terminal"], dtype=bool),
        "timeouts": np.asarray(steps["timeout"], dtype=bool),
        "next_observations": np.asarray(steps["next_obs"], dtype=np.float32),
    }
    for key, name in (("qpos", "infos/qpos"), ("qvel", "infos/qvel"), ("log_prob", "infos/action_log_probs")):
        if key in steps:
            arrays[name] = np.asarray(steps[key], dtype=np.float64)
    return arrays


def _attrs(
    env: str, policy: str, seed: int, num_steps: int, max_episode_steps: int, returns: np.ndarray
) -> dict[str, Any]:
    """Summary attributes; no wall-clock time, so the same arguments give the same file bytes.

    Returns cover only episodes that really ended (termination or step limit), not the unfinished tail.
    """
    attrs: dict[str, Any] = {
        "env": env,
        "gym_id": MUJOCO_ENVS[env],
        "policy": policy,
        "seed": seed,
        "num_steps": num_steps,
        "max_episode_steps": max_episode_steps,
        "num_episodes": int(returns.size),
        "mean_return": None,
        "mean_normalized_score": None,
        "generator": "mujoco",
    }
    if returns.size:
        attrs["mean_return"] = float(returns.mean())
        if reference_scores(env) is not None:  # none for the v5 envs
            attrs["mean_normalized_score"] = float(normalized_score(env, returns).mean())
    return attrs
