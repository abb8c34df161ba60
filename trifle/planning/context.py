"""Per-environment token history: the TT-style prefix the GPT plans from.

A prefix is the last ``max_context_transitions`` executed transitions followed by the current
observation's tokens, ``[s a r V]*n s``, left-aligned at position 0 (the GPT's positions are absolute,
so the sequence must start at a transition boundary). As in TT (docs/paper.md#tokens-and-labels), a past transition's value
token is a placeholder: TT writes VALUE_PLACEHOLDER = 1e6 and the discretizer clips it to the top bin,
so here it is the value column's top bin directly.

Environments are stored in fixed arrays indexed by slot id, so recording B transitions is a handful of
numpy assignments. Histories of different lengths (early in an episode, or after some environments
finished) cannot share one KV cache, whose length is common to the batch, so ``prefix_groups`` returns
one batch per distinct length; in a synchronised rollout that is a single group.
"""

from __future__ import annotations

import numpy as np
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.errors import TrifleError


def encode_nearest(column: ColumnBins, x: np.ndarray) -> np.ndarray:
    """Tokens of raw values; a categorical column maps an unseen value to its nearest category.

    Used for rewards only: an environment can pay a reward the offline data never contained (e.g. a
    penalty the behaviour policy never incurred), which must not crash a rollout.
    """
    x = np.asarray(x, np.float64)
    if column.kind == "quantile":
        return np.searchsorted(column.edges, x, side="right").astype(np.int64)
    return np.abs(column.values[None, :] - x[:, None]).argmin(axis=1).astype(np.int64)


class TokenHistory:
    """Executed transitions (as tokens) and the current observation of ``num_envs`` environment slots."""

    def __init__(self, discretizer: Discretizer, obs_dim: int, act_dim: int, max_context_transitions: int):
        self.discretizer = discretizer
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.transition_dim = obs_dim + act_dim + 2
        self.max_context = int(max_context_transitions)
        self.value_placeholder = int(discretizer.num_bins[-1]) - 1
        self.reset(0)

    def reset(self, num_envs: int) -> None:
        """Forget everything and make room for ``num_envs`` slots."""
        self.num_envs = int(num_envs)
        self.past = np.zeros((self.num_envs, self.max_context, self.transition_dim), np.int64)
        self.count = np.zeros(self.num_envs, np.int64)
        self.current = np.full((self.num_envs, self.obs_dim), -1, np.int64)

    def _check_ids(self, env_ids: np.ndarray) -> np.ndarray:
        env_ids = np.asarray(env_ids, np.int64).reshape(-1)
        if env_ids.size and (env_ids.min() < 0 or env_ids.max() >= self.num_envs):
            raise TrifleError(
                f"env_ids must lie in [0, {self.num_envs}) (reset(num_envs) first), got {env_ids}"
            )
        if len(np.unique(env_ids)) != len(env_ids):
            raise TrifleError(f"env_ids must be distinct, got {env_ids}")
        return env_ids

    def observe(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Store (and return) the tokens ``[B, obs_dim]`` of the observations the agent now acts on."""
        env_ids = self._check_ids(env_ids)
        obs = np.asarray(obs, np.float64).reshape(len(env_ids), self.obs_dim)
        cols = self.discretizer.columns[: self.obs_dim]
        names = self.discretizer.names[: self.obs_dim]
        tokens = np.stack([c.encode(obs[:, j], names[j]) for j, c in enumerate(cols)], axis=1)
        self.current[env_ids] = tokens
        return tokens

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Append (current obs, action, reward, placeholder value) to each environment's context."""
        env_ids = self._check_ids(env_ids)
        if bool((self.current[env_ids] < 0).any()):
            raise TrifleError("record: an environment has no observation yet; call act() for it first")
        n, lo = len(env_ids), self.obs_dim
        actions = np.asarray(actions, np.float64).reshape(n, self.act_dim)
        cols, names = self.discretizer.columns, self.discretizer.names
        act_tokens = [cols[lo + i].encode(actions[:, i], names[lo + i]) for i in range(self.act_dim)]
        reward_tokens = encode_nearest(cols[-2], np.asarray(rewards, np.float64).reshape(n))
        rows = np.concatenate(
            [
                self.current[env_ids],
                np.stack(act_tokens, axis=1),
                reward_tokens[:, None],
                np.full((n, 1), self.value_placeholder, np.int64),
            ],
            axis=1,
        )
        self.current[env_ids] = -1
        if self.max_context == 0:
            return
        full = env_ids[self.count[env_ids] == self.max_context]
        self.past[full, :-1] = self.past[full, 1:]
        self.past[env_ids, np.minimum(self.count[env_ids], self.max_context - 1)] = rows
        self.count[env_ids] = np.minimum(self.count[env_ids] + 1, self.max_context)

    def prefix_groups(self, env_ids: np.ndarray) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(positions in env_ids, prefix tokens [b, n*D + obs_dim], obs tokens [b, obs_dim])`` per length n."""
        env_ids = self._check_ids(env_ids)
        if bool((self.current[env_ids] < 0).any()):
            raise TrifleError("prefix: an environment has no current observation; call observe() first")
        counts = self.count[env_ids]
        groups = []
        for n in np.unique(counts):
            where = np.flatnonzero(counts == n)
            ids = env_ids[where]
            past = self.past[ids, :n].reshape(len(ids), n * self.transition_dim)
            prefix = np.concatenate([past, self.current[ids]], axis=1)
            groups.append((where, torch.from_numpy(prefix), torch.from_numpy(self.current[ids].copy())))
        return groups
