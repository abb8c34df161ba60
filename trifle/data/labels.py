"""Episode segmentation and Trajectory Transformer's discounted value labels.

The value token of step t is the discounted sum of the rewards *after* r_t,
``V_t = sum_{k>=1} gamma^(k-1) r_{t+k}`` within the episode, so a transition reads (s_t, a_t, r_t, V_t)
and r_t + gamma * V_t is the return from t. Episodes are not bootstrapped past their end (as in TT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import DataError
from trifle.io import NPZ_READ_ERRORS, atomic_path


@dataclass(frozen=True)
class LabeledTrajectories:
    """Transitions with value labels and the episode structure, one row per transition."""

    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, act_dim] float32
    rewards: np.ndarray  # [N] float32, termination penalty applied
    values: np.ndarray  # [N] float32
    episode_starts: np.ndarray  # [E] int64, first row of each episode
    episode_terminal: np.ndarray  # [E] bool, ended by a real terminal (not a timeout)
    attrs: dict[str, Any] = field(default_factory=dict)  # the raw dataset's attributes, passed along

    @property
    def episode_ends(self) -> np.ndarray:
        """One past the last row of each episode."""
        return np.append(self.episode_starts[1:], len(self.rewards)).astype(np.int64)


_ARRAY_FIELDS = ("observations", "actions", "rewards", "values", "episode_starts", "episode_terminal")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in dataset attributes become plain JSON values."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def segment_episodes(terminals: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode start rows and terminal flags; a dataset's unfinished tail counts as a timed-out episode."""
    ends = np.flatnonzero(np.asarray(terminals, bool) | np.asarray(timeouts, bool))
    n = len(terminals)
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    episode_terminal = np.asarray(terminals, bool)[ends]
    return starts, episode_terminal


def discounted_values(rewards: np.ndarray, episode_starts: np.ndarray, discount: float) -> np.ndarray:
    """V_t = sum_{k>=1} discount^(k-1) r_{t+k} within each episode (0 at an episode's last step)."""
    rewards = np.asarray(rewards, np.float64)
    values = np.zeros_like(rewards)
    ends = np.append(episode_starts[1:], len(rewards))
    for start, end in zip(episode_starts, ends, strict=True):
        running = 0.0
        for t in range(end - 1, start - 1, -1):
            values[t] = running
            running = rewards[t] + discount * running
    return values.astype(np.float32)


def label_trajectories(
    arrays: dict[str, np.ndarray],
    *,
    discount: float,
    termination_penalty: float | None,
    source: str = "<arrays>",
    attrs: dict[str, Any] | None = None,
) -> LabeledTrajectories:
    """Segment a D4RL-layout dataset and attach value labels.

    With a ``termination_penalty``, the reward of every real terminal transition is replaced by it
    (Trajectory Transformer's convention, docs/paper.md#tokens-and-labels), which teaches the planner to avoid termination
    in tasks where termination means failure (MuJoCo falls).
    """
    rewards = np.asarray(arrays["rewards"], np.float32).copy()
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise DataError(f"{source}: key 'rewards' has {len(bad)} non-finite values (first at row {bad[0]})")
    starts, episode_terminal = segment_episodes(arrays["terminals"], arrays["timeouts"])
    if termination_penalty is not None:
        rewards[np.asarray(arrays["terminals"], bool)] = termination_penalty
    return LabeledTrajectories(
        observations=np.asarray(arrays["observations"], np.float32),
        actions=np.asarray(arrays["actions"], np.float32),
        rewards=rewards,
        values=discounted_values(rewards, starts, discount),
        episode_starts=starts,
        episode_terminal=episode_terminal,
        attrs=dict(attrs or {}),
    )


def save_labeled(path: str | Path, labeled: LabeledTrajectories) -> None:
    """Write labeled trajectories as one .npz, atomically."""
    arrays = {k: getattr(labeled, k) for k in _ARRAY_FIELDS}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, attrs=np.array(json.dumps(labeled.attrs, default=_jsonable)), **arrays)


def load_labeled(path: str | Path) -> LabeledTrajectories:
    """Read a file written by :func:`save_labeled`, naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labeled trajectories not found (run the 'labels' stage first)")
    try:
        with np.load(path) as npz:
            fields: dict[str, Any] = {k: npz[k] for k in _ARRAY_FIELDS}
            fields["attrs"] = json.loads(str(npz["attrs"]))
    except KeyError as err:
        raise DataError(f"{path}: missing key {err} in labeled trajectories") from err
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    return LabeledTrajectories(**fields)
