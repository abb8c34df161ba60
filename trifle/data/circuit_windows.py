"""Training rows of the circuit: K consecutive transitions flattened into one vector of K*D variables.

K = 1 gives single transitions (s, a, r, V); K > 1 lets the circuit marginalize intermediate states
exactly for multi-step values (m-Trifle). A window that runs past the end of an episode ended by a
real terminal is completed with ``pad_token`` (the "episode over" category, like the GPT's stop
token); windows that run past a timeout are dropped, since what follows a timeout is unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from trifle.errors import ConfigError

if TYPE_CHECKING:
    from trifle.data.tokens import TokenData


def circuit_num_cats(vocab_size: int, window: int) -> int:
    """Categories per circuit variable: the token vocabulary, plus the "episode over" pad when K > 1."""
    return vocab_size + (1 if window > 1 else 0)


def circuit_windows(
    tokens: np.ndarray,
    episode_starts: np.ndarray,
    episode_terminal: np.ndarray,
    *,
    window: int,
    episode_ids: np.ndarray,
    pad_token: int,
) -> np.ndarray:
    """[M, window * D] int64 windows starting at every usable row of the chosen episodes."""
    if window < 1:
        raise ConfigError(f"task.pc_window={window}: expected an integer >= 1")
    num_rows, dim = tokens.shape
    ends = np.append(episode_starts[1:], num_rows)
    padded = np.concatenate([tokens, np.full((window, dim), pad_token, tokens.dtype)])
    pieces = []
    for e in np.asarray(episode_ids, np.int64):
        start, end = int(episode_starts[e]), int(ends[e])
        last_start = end if episode_terminal[e] else end - window + 1
        if last_start <= start:
            continue
        rows = np.arange(start, last_start)[:, None] + np.arange(window)[None, :]
        block = padded[np.minimum(rows, num_rows)]
        block[rows >= end] = pad_token
        pieces.append(block.reshape(len(rows), window * dim))
    if not pieces:
        raise ConfigError(f"task.pc_window={window}: no episode is long enough to give a single window")
    return np.concatenate(pieces).astype(np.int64)


def token_windows(data: TokenData, *, window: int, episode_ids: np.ndarray) -> np.ndarray:
    """:func:`circuit_windows` of a token file's episodes, the pad being the vocabulary size (the one
    layout every circuit of the project is trained and queried with)."""
    return circuit_windows(
        data.tokens,
        data.episode_starts,
        data.episode_terminal,
        window=window,
        episode_ids=episode_ids,
        pad_token=data.vocab_size,
    )
