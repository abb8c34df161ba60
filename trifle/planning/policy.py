"""The interface every evaluated method implements: act in many environments at once.

The rollout loop (trifle.evaluation) owns the environments; a policy owns its per-environment
history (context transitions, returns-to-go) and its random state. Environments are addressed by
slot ids ``0..num_envs-1`` so that finished episodes simply stop being passed in.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Policy(Protocol):
    """A batched, stateful policy over raw (undiscretized) observations and actions."""

    def reset(self, num_envs: int, seed: int) -> None:
        """Forget all history and seed the policy's random state; called once before a rollout."""

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Actions [B, act_dim] (raw values) for the environments ``env_ids`` [B] observing ``obs`` [B, obs_dim]."""

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Append the executed actions [B, act_dim] and received rewards [B] to those environments' history."""
