"""The Gym-MuJoCo locomotion tasks of D4RL (Hopper, HalfCheetah, Walker2d) on gymnasium's v4 envs.

D4RL's v2 datasets were collected with mujoco-py "v2" envs; gymnasium's ``*-v4`` envs keep the same
XML models, observation layout, reward and termination, so policies trained on D4RL data are evaluated
on them (``v5`` changes Walker2d's foot friction, so it is not used for D4RL data). Minari's MuJoCo
datasets were collected in the ``v5`` envs, so those are here too, named ``<env>-v5``: a policy is
evaluated in the env version its data came from. Scores are normalized scores,
``100 * (R - random) / (expert - random)``: with the dataset's own reference returns where it carries
them (Minari's ``ref_min_score``/``ref_max_score``), else D4RL's for the v4 envs (:func:`reference_scores`).

:class:`VectorMujocoEnv` steps many independent episodes together with the conventions of
:class:`trifle.envs.tabular.VectorTabularEnv`: no automatic reset, finished envs stay frozen, and the
step limit is enforced here (gymnasium's ``TimeLimit`` is disabled), so ``truncated`` means exactly
"reached ``max_episode_steps`` without terminating".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import gymnasium
import mujoco
import numpy as np

from trifle.errors import ConfigError, DataError, TrifleError

MUJOCO_ENVS: dict[str, str] = {
    "hopper": "Hopper-v4",
    "halfcheetah": "HalfCheetah-v4",
    "walker2d": "Walker2d-v4",
    # The envs Minari's MuJoCo datasets were collected in (trifle.data.minari_datasets).
    "hopper-v5": "Hopper-v5",
    "halfcheetah-v5": "HalfCheetah-v5",
    "walker2d-v5": "Walker2d-v5",
}

# D4RL's REF_MIN_SCORE / REF_MAX_SCORE (random and expert policy returns over 1000-step episodes).
REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}

# Name of the joint each action dimension drives, as the MuJoCo model names it. HalfCheetah's actuators
# carry the joint's name; Hopper's and Walker2d's actuators are unnamed, so their joint names are used.
ACTION_NAMES: dict[str, tuple[str, ...]] = {
    "hopper": ("thigh_joint", "leg_joint", "foot_joint"),
    "halfcheetah": ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot"),
    "walker2d": (
        "thigh_joint",
        "leg_joint",
        "foot_joint",
        "thigh_left_joint",
        "leg_left_joint",
        "foot_left_joint",
    ),
}
# The v5 envs drive the same joints.
ACTION_NAMES |= {f"{env}-v5": names for env, names in ACTION_NAMES.items()}

# MuJoCo compiler warnings that the D4RL models trigger by design and that change nothing we use.
HARMLESS_MUJOCO_WARNINGS: tuple[str, ...] = ("'settotalmass' is deprecated",)


def check_env_name(env: str) -> None:
    """Fail early with the list of valid names, rather than with gymnasium's registry error."""
    if env not in MUJOCO_ENVS:
        raise ConfigError(f"unknown MuJoCo env {env!r}; valid envs: {sorted(MUJOCO_ENVS)}")


def reference_scores(env: str, attrs: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
    """The returns a normalized score maps to 0 and 100, or None where none are known.

    A dataset's own reference returns win (``ref_min_score``/``ref_max_score`` in its attrs, copied from a
    Minari dataset's metadata, whose scores are measured in the env it was collected in); without them,
    D4RL's for the v4 envs. D4RL's numbers are not reused for the v5 envs, whose dynamics differ.
    """
    check_env_name(env)
    low, high = (attrs or {}).get("ref_min_score"), (attrs or {}).get("ref_max_score")
    if low is not None and high is not None:
        return float(low), float(high)
    return REF_SCORES.get(env)


def normalized_score(env: str, returns: Any, attrs: Mapping[str, Any] | None = None) -> np.ndarray:
    """Normalized score ``100 * (R - min) / (max - min)`` of one return or an array of them, with
    :func:`reference_scores` (``attrs``: the dataset's attributes)."""
    refs = reference_scores(env, attrs)
    if refs is None:
        raise DataError(
            f"no reference scores for env {env!r}: its dataset has no ref_min_score/ref_max_score and "
            "D4RL's hold only for the v4 envs"
        )
    low, high = refs
    return 100.0 * (np.asarray(returns, dtype=np.float64) - low) / (high - low)


@contextlib.contextmanager
def _quiet_model_compile() -> Iterator[None]:
    """Drop MuJoCo's known-harmless compiler warnings while a model loads, forward any other one.

    HalfCheetah's XML uses the deprecated ``settotalmass``; without a callback MuJoCo prints that on
    every env build and appends it to ``MUJOCO_LOG.TXT`` in the working directory. The previous callback
    is restored afterwards, so the rest of the process keeps MuJoCo's own handling.
    """

    def forward(message: str) -> None:
        if not any(text in message for text in HARMLESS_MUJOCO_WARNINGS):
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(forward)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_mujoco_env(env: str, **kwargs: Any) -> gymnasium.Env:
    """``gym.make`` the gymnasium env of ``env``; v4 is chosen on purpose, so its deprecation warning is
    silenced."""
    check_env_name(env)
    try:
        with warnings.catch_warnings(), _quiet_model_compile():
            warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
            return gymnasium.make(MUJOCO_ENVS[env], **kwargs)
    except ModuleNotFoundError as err:
        raise TrifleError(
            f"cannot build {MUJOCO_ENVS[env]}: gymnasium's MuJoCo envs need the package {err.name!r} "
            "(install gymnasium[mujoco])"
        ) from err


def make_raw_env(env: str) -> gymnasium.Env:
    """The bare MuJoCo env without gymnasium's wrappers: callers enforce the step limit and call order."""
    return make_mujoco_env(env, max_episode_steps=-1, disable_env_checker=True).unwrapped


def reset_seed(seed: int, env_id: int, reset_count: int) -> int:
    """Seed of one episode, derived only from (seed, env id, reset count) so batching does not matter."""
    return int(np.random.SeedSequence((seed, env_id, reset_count)).generate_state(1, dtype=np.uint64)[0])


class VectorMujocoEnv:
    """``num_envs`` independent episodes of one MuJoCo task stepped together.

    Nothing resets automatically: a finished environment stays frozen (same observation, reward 0, no
    flags) until the caller resets it, and ``info["stepped"]`` says which environments actually moved.
    ``truncated`` is raised only when ``max_episode_steps`` is reached without termination, matching
    D4RL's convention that ``terminals`` and ``timeouts`` are mutually exclusive. Observations and
    rewards are float64, as the envs compute them.
    """

    def __init__(self, env: str, num_envs: int, seed: int, max_episode_steps: int = 1000) -> None:
        check_env_name(env)
        if num_envs < 1:
            raise ConfigError(f"VectorMujocoEnv: num_envs must be >= 1, got {num_envs}")
        if max_episode_steps < 1:
            raise ConfigError(f"VectorMujocoEnv: max_episode_steps must be >= 1, got {max_episode_steps}")
        self.name = env
        self.num_envs = num_envs
        self.seed = seed
        self.max_episode_steps = max_episode_steps
        self._envs = [make_raw_env(env) for _ in range(num_envs)]
        space = self._envs[0].action_space
        self.obs_dim = int(self._envs[0].observation_space.shape[0])
        self.act_dim = int(space.shape[0])
        self.action_low = np.asarray(space.low, dtype=np.float64).copy()
        self.action_high = np.asarray(space.high, dtype=np.float64).copy()
        self.obs = np.zeros((num_envs, self.obs_dim))
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.done = np.ones(num_envs, dtype=bool)
        self.reset_counts = np.zeros(num_envs, dtype=np.int64)

    def reset(self, env_ids: Any = None) -> np.ndarray:
        """Start new episodes in ``env_ids`` (default: all); return every environment's observation."""
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64).ravel()
        if np.any(ids < 0) or np.any(ids >= self.num_envs):
            raise TrifleError(f"{self.name}: env_ids must lie in [0, {self.num_envs}), got {ids.tolist()}")
        for i in ids.tolist():
            obs, _ = self._envs[i].reset(seed=reset_seed(self.seed, i, int(self.reset_counts[i])))
            self.obs[i] = obs
            self.reset_counts[i] += 1
        self.steps[ids] = 0
        self.done[ids] = False
        return self.obs.copy()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Apply ``actions [num_envs, act_dim]``, clipped to the action box, to every running environment."""
        actions = self._check_actions(actions)
        run = ~self.done
        reward = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        for i in np.flatnonzero(run).tolist():
            obs, r, term, _, _ = self._envs[i].step(actions[i])
            self.obs[i], reward[i], terminated[i] = obs, r, term
        self.steps[run] += 1
        truncated = run & ~terminated & (self.steps >= self.max_episode_steps)
        self.done |= terminated | truncated
        info = {"stepped": run, "steps": self.steps.copy()}
        return self.obs.copy(), reward, terminated, truncated, info

    def _check_actions(self, actions: Any) -> np.ndarray:
        """Reject malformed actions loudly: NaN would silently poison the simulator state."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, self.act_dim):
            raise TrifleError(
                f"{self.name}: actions must have shape {(self.num_envs, self.act_dim)}, got {actions.shape}"
            )
        if not np.isfinite(actions).all():
            bad = np.flatnonzero(~np.isfinite(actions).all(-1)).tolist()
            raise TrifleError(f"{self.name}: actions contain NaN or infinite values (envs {bad})")
        return np.clip(actions, self.action_low, self.action_high)

    def close(self) -> None:
        """Release the simulators (they hold MuJoCo model and data buffers)."""
        for env in self._envs:
            env.close()
