"""Token matrices: one row per transition, columns (obs..., action..., reward, value), with their discretizer.

Both models read this one file: the GPT as a flattened token stream, the circuit as windows of K rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trifle.data.discretize import Discretizer
from trifle.data.labels import LabeledTrajectories
from trifle.errors import DataError
from trifle.io import NPZ_READ_ERRORS, atomic_path


@dataclass(frozen=True)
class TokenData:
    """Discretized transitions plus what is needed to turn tokens back into values."""

    tokens: np.ndarray  # [N, D] int64
    episode_starts: np.ndarray  # [E] int64
    episode_terminal: np.ndarray  # [E] bool
    obs_dim: int
    act_dim: int
    discretizer: Discretizer

    @property
    def vocab_size(self) -> int:
        return self.discretizer.vocab_size

    @property
    def transition_dim(self) -> int:
        return self.obs_dim + self.act_dim + 2


def column_names(obs_dim: int, act_dim: int) -> list[str]:
    return [f"obs{i}" for i in range(obs_dim)] + [f"act{i}" for i in range(act_dim)] + ["reward", "value"]


def tokenize(
    labeled: LabeledTrajectories,
    discretizer_cfg: dict[str, Any],
    *,
    obs_cardinalities: list[int] | None = None,
    num_actions: int | None = None,
) -> TokenData:
    """Fit the configured discretizer on the labeled data and encode it.

    For discrete spaces the declared cardinalities make every state and action a category even if the
    dataset never visits it, so the planner can encode any state the environment produces.
    """
    obs_dim, act_dim = labeled.observations.shape[1], labeled.actions.shape[1]
    data = np.concatenate(
        [labeled.observations, labeled.actions, labeled.rewards[:, None], labeled.values[:, None]], axis=1
    )
    kinds = (
        [discretizer_cfg["observations"]] * obs_dim
        + [discretizer_cfg["actions"]] * act_dim
        + [discretizer_cfg["rewards"], discretizer_cfg["values"]]
    )
    categories: list[np.ndarray | None] = [None] * data.shape[1]
    if obs_cardinalities is not None:
        categories[:obs_dim] = [np.arange(c) for c in obs_cardinalities]
    if num_actions is not None and act_dim == 1:
        categories[obs_dim] = np.arange(num_actions)
    discretizer = Discretizer.fit(
        data,
        kinds,
        column_names(obs_dim, act_dim),
        n_bins=discretizer_cfg["n_bins"],
        categories=categories,
        quantile_rule=discretizer_cfg.get("quantile", "trifle"),
    )
    return TokenData(
        tokens=discretizer.encode(data),
        episode_starts=labeled.episode_starts,
        episode_terminal=labeled.episode_terminal,
        obs_dim=obs_dim,
        act_dim=act_dim,
        discretizer=discretizer,
    )


def require_quantile_rule(data: TokenData, rule: str, path: str | Path, user: str) -> None:
    """A model fitted to another project's tokens reads only tokens binned by that project's rule."""
    found = data.discretizer.quantile_rule
    if found != rule:
        raise DataError(
            f"{path}: tokens made with task.discretizer.quantile={found}, but {user} reads tokens of the "
            f"{rule!r} rule; set task.discretizer.quantile={rule} (the workflow's protocol: pretrained does)"
        )


def save_tokens(path: str | Path, data: TokenData) -> None:
    """Write tokens and their discretizer to one .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            tokens=data.tokens,
            episode_starts=data.episode_starts,
            episode_terminal=data.episode_terminal,
            obs_dim=np.int64(data.obs_dim),
            act_dim=np.int64(data.act_dim),
            discretizer=np.array(json.dumps(data.discretizer.to_dict())),
        )


def load_tokens(path: str | Path) -> TokenData:
    """Read a file written by :func:`save_tokens`, naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file not found (run the 'tokens' stage first)")
    try:
        with np.load(path) as npz:
            data = TokenData(
                tokens=npz["tokens"],
                episode_starts=npz["episode_starts"],
                episode_terminal=npz["episode_terminal"],
                obs_dim=int(npz["obs_dim"]),
                act_dim=int(npz["act_dim"]),
                discretizer=Discretizer.from_dict(json.loads(str(npz["discretizer"]))),
            )
    except KeyError as err:
        raise DataError(f"{path}: missing key {err} in token file") from err
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{path}: not a readable token file ({err})") from err
    if data.tokens.ndim != 2 or data.tokens.shape[1] != data.transition_dim:
        raise DataError(
            f"{path}: key 'tokens' has shape {data.tokens.shape}, expected [N, {data.transition_dim}]"
        )
    return data
