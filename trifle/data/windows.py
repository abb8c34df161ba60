"""Fixed-length training windows over tokenized episodes, in the manner of Trajectory Transformer.

Each sample is ``length`` consecutive transitions of one episode, flattened row-major into
``length * D`` tokens (D = obs_dim + act_dim + 2: state dims, action dims, reward, value). A window
may start at any row of its episode, so windows near the end run past it and need padding:

* **Terminal end** (the episode stopped because the MDP terminated): every token of every
  transition past the end is the stop token (``stop_token == vocab_size``) and counts in the loss.
  The model thus learns that after a terminal transition the next "state" is the stop token, i.e. it
  learns to predict episode termination (TT does the same; its rewards carry the termination penalty
  on the terminal transition, applied by the labelling stage, not here).
* **Timeout end** (the episode was cut by a time limit, the MDP itself did not end): nothing is
  known about what follows, so positions past the end are filled with the stop token as *inputs*
  but masked out (``mask == 0``) as *targets*. Attention is causal, so these filler inputs never
  influence the prediction of any valid target.

Targets are the inputs shifted by one token; the last target of a window is the first state token
of the transition after the window (so ``x`` and ``y`` both have exactly ``length * D`` tokens and
the model's block size is a whole number of transitions).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from trifle.errors import ConfigError, DataError


def _check_episode_starts(episode_starts: np.ndarray, num_rows: int) -> np.ndarray:
    """Return ``episode_starts`` as int64 after checking it describes non-empty, ordered episodes."""
    starts = np.asarray(episode_starts)
    if starts.ndim != 1 or starts.size == 0 or not np.issubdtype(starts.dtype, np.integer):
        raise DataError(f"episode_starts: expected a non-empty 1-d integer array, got shape {starts.shape}")
    starts = starts.astype(np.int64)
    if starts[0] != 0:
        raise DataError(f"episode_starts: the first episode must start at row 0, got {starts[0]}")
    if np.any(np.diff(starts) <= 0):
        raise DataError("episode_starts: expected strictly increasing row indices (no empty episodes)")
    if starts[-1] >= num_rows:
        raise DataError(f"episode_starts: last start {starts[-1]} is not below the number of rows {num_rows}")
    return starts


def split_episodes(
    episode_starts: np.ndarray, num_rows: int, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split episode ids into train and held-out sets, by whole episodes.

    Holding out whole episodes (not random windows) keeps overlapping windows of one episode from
    landing on both sides, which would make the held-out likelihood optimistic. The split is a
    deterministic function of ``seed``; both sides get at least one episode.
    """
    starts = _check_episode_starts(episode_starts, num_rows)
    if not 0.0 < float(valid_fraction) < 1.0:
        raise ConfigError(
            f"valid_fraction: expected a number strictly between 0 and 1, got {valid_fraction!r}"
        )
    num_episodes = len(starts)
    if num_episodes < 2:
        raise ConfigError(
            f"valid_fraction: a held-out split needs at least 2 episodes, the dataset has {num_episodes}"
        )
    num_valid = min(max(1, round(num_episodes * float(valid_fraction))), num_episodes - 1)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED])).permutation(num_episodes)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


class TransitionWindows:
    """All windows of ``length`` transitions starting at any row of the chosen episodes."""

    def __init__(
        self,
        tokens: np.ndarray,
        episode_starts: np.ndarray,
        episode_terminal: np.ndarray,
        length: int,
        stop_token: int,
        episode_ids: np.ndarray | None = None,
    ) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"tokens: expected a 2-d integer array [rows, D], got {tokens.dtype} {tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= stop_token):
            raise DataError(
                f"tokens: values must lie in 0..{stop_token - 1} (stop_token={stop_token} is reserved), "
                f"found {tokens.min()}..{tokens.max()}"
            )
        if int(length) < 1:
            raise ConfigError(f"seq_transitions: expected a positive number of transitions, got {length}")
        starts = _check_episode_starts(episode_starts, len(tokens))
        terminal = np.asarray(episode_terminal, dtype=bool)
        if terminal.shape != starts.shape:
            raise DataError(f"episode_terminal: expected shape {starts.shape}, got {terminal.shape}")
        ids = np.arange(len(starts)) if episode_ids is None else np.asarray(episode_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(starts)):
            raise DataError(f"episode_ids: expected ids in 0..{len(starts) - 1}")

        self.tokens = tokens.astype(np.int64, copy=False)
        self.length = int(length)
        self.stop_token = int(stop_token)
        self.transition_dim = tokens.shape[1]
        ends = np.append(starts[1:], len(tokens))
        # One entry per window: its first row, the end row (exclusive) of its episode, and whether
        # that episode ended by termination.
        lengths = ends[ids] - starts[ids]
        offset_in_episode = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.first_row = np.repeat(starts[ids], lengths) + offset_in_episode
        self.end_row = np.repeat(ends[ids], lengths)
        self.terminal = np.repeat(terminal[ids], lengths)

    def __len__(self) -> int:
        return len(self.first_row)

    def get(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(x, y, mask)``, each ``[B, length * D]``: inputs, next-token targets, target mask."""
        idx = np.asarray(indices, dtype=np.int64)
        # length + 1 transitions: the extra one supplies the target of the last input token.
        rows = self.first_row[idx, None] + np.arange(self.length + 1)[None, :]
        past_end = rows >= self.end_row[idx, None]
        seq = self.tokens[np.minimum(rows, len(self.tokens) - 1)]
        seq[past_end] = self.stop_token
        valid = np.repeat((~past_end | self.terminal[idx, None])[:, :, None], self.transition_dim, axis=2)
        seq = seq.reshape(len(idx), -1)
        valid = valid.reshape(len(idx), -1)
        n = self.length * self.transition_dim
        x = torch.from_numpy(np.ascontiguousarray(seq[:, :n]))
        y = torch.from_numpy(np.ascontiguousarray(seq[:, 1 : n + 1]))
        mask = torch.from_numpy(valid[:, 1 : n + 1].astype(np.float32))
        return x, y, mask

    def iter_batches(
        self, indices: np.ndarray, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``get`` of consecutive chunks of ``indices`` (for evaluation passes)."""
        for lo in range(0, len(indices), batch_size):
            yield self.get(indices[lo : lo + batch_size])
