"""The Decision Transformer baseline as a batched :class:`~trifle.planning.policy.Policy`.

Each environment slot keeps DT's evaluation state: its last ``context_len`` steps of (return-to-go,
observation, action, timestep) and the current return-to-go, which starts at ``target_return`` and
drops by every received reward (DT's conditioning rule; rewards are *not* discounted). ``act`` opens
a step with the new observation and the current return-to-go; ``record`` closes it with the executed
action and reward.

All given environments are scored in one forward pass. Their contexts may differ in length; they are
right-padded, which cannot change any prediction because attention is causal, so a batched call gives
the same actions as one call per environment. Sampled actions draw from a per-environment generator
(seeded from ``(seed, env_id)``) for the same reason: an environment's actions do not depend on which
other environments are still running.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.errors import ConfigError
from trifle.models.dt import DecisionTransformer
from trifle.models.dt_training import load_dt
from trifle.planning.dt_targets import dt_target_returns
from trifle.planning.dt_targets import parse_target_returns as parse_target_returns

# DT's targets (parse_target_returns, dt_target_returns) are defined in the torch-free dt_targets, which
# config validation imports; they are imported here so that the policy's users find them here too.


class DTPolicy:
    """Return-conditioned action selection with a trained :class:`DecisionTransformer`.

    ``checkpoint_meta`` is the dict :func:`~trifle.models.dt_training.load_dt` returns with the
    model; the policy reads the ``return_scale`` it was trained with. ``target_return`` is in raw
    return units (Taxi paper: -300). Discrete actions are the argmax unless ``sample`` is true.
    """

    def __init__(
        self,
        model: DecisionTransformer,
        checkpoint_meta: Mapping[str, Any],
        target_return: float,
        device: str | torch.device = "cpu",
        *,
        sample: bool = False,
    ) -> None:
        if "return_scale" not in checkpoint_meta:
            raise ConfigError("checkpoint_meta: no 'return_scale' entry (pass the dict load_dt returns)")
        if not np.isfinite(float(target_return)):
            raise ConfigError(f"dt.target_return: expected a finite number, got {target_return!r}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.return_scale = float(checkpoint_meta["return_scale"])
        self.target_return = float(target_return)
        self.sample = bool(sample)
        self.cfg = model.cfg
        self._num_envs = 0

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        target_return: float | None = None,
        sample: bool = False,
        device: str | torch.device = "cpu",
    ) -> DTPolicy:
        """Load a policy; ``target_return`` defaults to the checkpoint's ``dt.target_return``."""
        model, meta = load_dt(path, device=device)
        target = meta.get("train_config", {}).get("target_return") if target_return is None else target_return
        if target is None:
            raise ConfigError(
                f"dt.target_return: {path} was trained without a target return; set one for this task "
                "(the paper conditions Taxi's DT on -300)"
            )
        return cls(model, meta, target, device, sample=sample)

    def reset(self, num_envs: int, seed: int) -> None:
        """Forget all history; every slot restarts at ``target_return`` and timestep 0."""
        K, cfg = self.cfg.context_len, self.cfg
        self._num_envs = int(num_envs)
        self._obs = np.zeros((num_envs, K, cfg.obs_dim), np.float32)
        self._act = np.zeros((num_envs, K, cfg.act_dim), np.float32)
        self._rtg = np.zeros((num_envs, K), np.float64)  # raw units; scaled when fed to the model
        self._time = np.zeros((num_envs, K), np.int64)
        self._length = np.zeros(num_envs, np.int64)  # steps held in the context, <= K
        self._return_to_go = np.full(num_envs, self.target_return, np.float64)
        self._timestep = np.zeros(num_envs, np.int64)
        self._pending = np.zeros(num_envs, bool)  # act() called, record() not yet
        self._rngs = [np.random.default_rng(np.random.SeedSequence([int(seed), i])) for i in range(num_envs)]

    def _ids(self, env_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(env_ids, np.int64).reshape(-1)
        if self._num_envs == 0:
            raise RuntimeError("DTPolicy: call reset(num_envs, seed) before act/record")
        if ids.size and (ids.min() < 0 or ids.max() >= self._num_envs or len(np.unique(ids)) != ids.size):
            raise ValueError(f"env_ids must be distinct slots in [0, {self._num_envs}), got {ids.tolist()}")
        return ids

    def return_to_go(self, env_ids: np.ndarray) -> np.ndarray:
        """Current (raw, unscaled) return-to-go of the given environments."""
        return self._return_to_go[self._ids(env_ids)].copy()

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Actions ``[B, act_dim]`` for ``env_ids`` seeing ``obs [B, obs_dim]`` (integer floats if discrete)."""
        ids = self._ids(env_ids)
        obs = np.asarray(obs, np.float32).reshape(len(ids), self.cfg.obs_dim)
        if np.any(self._pending[ids]):
            raise RuntimeError(
                f"DTPolicy.act: environments {ids[self._pending[ids]].tolist()} await record()"
            )
        if self.cfg.discrete:
            cards = np.asarray(self.cfg.obs_cardinalities)
            if np.any(obs != np.round(obs)) or np.any(obs < 0) or np.any(obs >= cards):
                raise ValueError(f"obs: expected integers in [0, obs_cardinalities={cards.tolist()})")
        K = self.cfg.context_len
        full = ids[self._length[ids] == K]
        for name in ("_obs", "_act", "_rtg", "_time"):  # drop the oldest step of full contexts
            buf = getattr(self, name)
            buf[full] = np.roll(buf[full], -1, axis=1)
        self._length[ids] = np.minimum(self._length[ids] + 1, K)
        last = self._length[ids] - 1
        self._obs[ids, last] = obs
        self._act[ids, last] = 0.0  # placeholder: the state token never attends to its own action
        self._rtg[ids, last] = self._return_to_go[ids]
        self._time[ids, last] = self._timestep[ids]
        self._pending[ids] = True

        T = int(self._length[ids].max()) if len(ids) else 0
        if T == 0:
            return np.zeros((0, self.cfg.act_dim), np.float32)
        with torch.no_grad():
            pred = self.model(
                torch.from_numpy(self._rtg[ids, :T] / self.return_scale).float().to(self.device),
                torch.from_numpy(self._obs[ids, :T]).to(self.device),
                torch.from_numpy(self._act[ids, :T]).to(self.device),
                torch.from_numpy(self._time[ids, :T]).to(self.device),
            )
        out = pred[torch.arange(len(ids)), torch.from_numpy(last).to(self.device)].float().cpu()
        return self._choose(ids, obs, out)

    def _choose(self, ids: np.ndarray, obs: np.ndarray, out: torch.Tensor) -> np.ndarray:
        """Actions from the model's prediction for the newest state ``out`` (``[B, num_actions]`` logits,
        or ``[B, act_dim]`` continuous actions): the continuous prediction itself, else the argmax, or a
        draw from the softmax with each environment's own generator. ``obs [B, obs_dim]`` is unused here;
        a subclass that reshapes DT's distribution (trifle.planning.dt_trifle) overrides this method."""
        if not self.cfg.discrete:
            return out.numpy().astype(np.float32)
        if not self.sample:
            return out.argmax(-1).numpy().astype(np.float32)[:, None]
        probs = torch.softmax(out.double(), -1).numpy()
        cdf = np.cumsum(probs, axis=-1)
        u = np.array([self._rngs[i].random() for i in ids])
        choice = np.minimum((u[:, None] * cdf[:, -1:] >= cdf).sum(-1), self.cfg.num_actions - 1)
        return choice.astype(np.float32)[:, None]

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Store the executed actions ``[B, act_dim]``; lower each return-to-go by its reward ``[B]``."""
        ids = self._ids(env_ids)
        if not np.all(self._pending[ids]):
            raise RuntimeError(
                f"DTPolicy.record: environments {ids[~self._pending[ids]].tolist()} did not act"
            )
        actions = np.asarray(actions, np.float32).reshape(len(ids), self.cfg.act_dim)
        self._act[ids, self._length[ids] - 1] = actions
        self._return_to_go[ids] -= np.asarray(rewards, np.float64).reshape(len(ids))
        self._timestep[ids] += 1
        self._pending[ids] = False


def dt_policies(cfg: Mapping[str, Any], device: str) -> list[tuple[float, DTPolicy]]:
    """The registry's policy function of DT: one policy per conditioning target, sharing the checkpoint
    ``paths.dt`` (loaded once). The evaluate stage runs every target on the same episodes."""
    targets = dt_target_returns(cfg)
    model, meta = load_dt(cfg["paths"]["dt"], device=device)
    return [(t, DTPolicy(model, meta, t, device, sample=cfg["planner"]["sample"])) for t in targets]
