"""The executed steps of an evaluation: every state, action and reward of every reported episode.

The evaluate stage writes them beside its JSON record as ``<record>.steps.npz``
(``results/eval/{task}/{method}/seed{seed}.steps.npz``, ``paths.eval_steps``), flat arrays with one row per
step, so that a later stage can score what a method actually did (the inference-time optimality score)
without re-running the rollouts. For a method with several conditioning targets (DT) the file holds the
reported target's episodes, the ones the record's top-level results describe.

Row i is step ``step[i]`` of episode ``episode[i]`` (the record's episode index): ``obs[i]`` the state
the action was chosen in, ``action[i]`` the action the environment executed, ``reward[i]`` its reward.
A separate file keeps the JSON record exactly as it was, for the code and tests that read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trifle.errors import DataError
from trifle.io import NPZ_READ_ERRORS, atomic_path

FIELDS = ("episode", "step", "obs", "action", "reward")


@dataclass(frozen=True)
class EpisodeSteps:
    """One episode's executed steps, in order."""

    obs: np.ndarray  # [T, obs_dim] float64: the state each action was chosen in
    actions: np.ndarray  # [T, act_dim] float64: the executed actions
    rewards: np.ndarray  # [T] float64


@dataclass(frozen=True)
class ExecutedSteps:
    """All executed steps of an evaluation, flat (see the module docstring)."""

    episode: np.ndarray  # [n] int64
    step: np.ndarray  # [n] int64
    obs: np.ndarray  # [n, obs_dim] float64
    action: np.ndarray  # [n, act_dim] float64
    reward: np.ndarray  # [n] float64

    @classmethod
    def from_episodes(cls, episodes: list[EpisodeSteps]) -> ExecutedSteps:
        """Flatten episodes ``0..E-1`` (at least one, each with at least one step)."""
        if not episodes or any(len(e.rewards) == 0 for e in episodes):
            raise DataError("executed steps: expected at least one episode, each with at least one step")
        lengths = [len(e.rewards) for e in episodes]
        return cls(
            episode=np.repeat(np.arange(len(episodes), dtype=np.int64), lengths),
            step=np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
            obs=np.concatenate([np.asarray(e.obs, np.float64) for e in episodes]),
            action=np.concatenate([np.asarray(e.actions, np.float64) for e in episodes]),
            reward=np.concatenate([np.asarray(e.rewards, np.float64) for e in episodes]),
        )

    @property
    def num_episodes(self) -> int:
        return int(self.episode.max()) + 1 if self.episode.size else 0

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode, as the evaluation record counts it."""
        return np.bincount(self.episode, weights=self.reward, minlength=self.num_episodes)


def save_steps(path: str | Path, steps: ExecutedSteps) -> None:
    """Write the steps as one .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: getattr(steps, k) for k in FIELDS})


def load_steps(path: str | Path) -> ExecutedSteps:
    """Read a file written by :func:`save_steps`, naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: executed-steps file not found (written by the 'evaluate' stage)")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in FIELDS}
    except KeyError as err:
        raise DataError(f"{path}: missing key {err} in executed-steps file") from err
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{path}: not a readable executed-steps file ({err})") from err
    n = len(arrays["episode"])
    shapes_ok = (
        arrays["obs"].ndim == 2
        and arrays["action"].ndim == 2
        and all(len(arrays[k]) == n for k in FIELDS)
        and arrays["episode"].ndim == arrays["step"].ndim == arrays["reward"].ndim == 1
    )
    if not shapes_ok:
        raise DataError(f"{path}: arrays {FIELDS} must have one row per step ({n})")
    return ExecutedSteps(**arrays)
