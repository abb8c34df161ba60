"""IQL's critic (Kostrikov, Nair and Levine 2021, "Offline Reinforcement Learning with Implicit Q-Learning").

Twin Q networks, a state-value network V and a Polyak-averaged target copy of the Q networks; no
policy (TT(+Q) only needs Q, docs/planning.md). The objectives, per transition (s, a, r, s', d):

* V:  expectile regression of V(s) on the target critic's min(Q1', Q2')(s, a):
  ``L_V = |tau - 1(u < 0)| u^2`` with ``u = min(Q1', Q2')(s, a) - V(s)`` (:func:`expectile_loss`);
  tau = 0.5 is SARSA's mean over the data's actions, tau -> 1 the largest Q among them.
* Q:  ``L_Q = (Q1(s, a) - y)^2 + (Q2(s, a) - y)^2`` with ``y = r + gamma (1 - d) V(s')``
  (:func:`q_target`); V(s') enters as a constant.
* target: ``Q' <- alpha Q + (1 - alpha) Q'`` after every update (alpha = 0.005).

Both losses are taken from the same parameters and summed (one optimizer step; their gradients touch
disjoint networks), as d3rlpy does; the authors' JAX code updates V first and builds y from the new V,
a one-step lag that leaves the fixed point unchanged.

Inputs. Continuous observations are standardized with the training data's mean and standard deviation
(buffers) and concatenated with the action; Q has one output. Discrete tasks (``obs_cardinalities`` and
``num_actions``, e.g. Taxi's (5, 5, 5, 4) and 6 actions) one-hot every observation dimension and
concatenate the one-hots, and Q has one output per action (the usual discrete-action critic), read at
the taken action. The networks work in units of ``value_scale`` (by default the data's largest |value
label| or |reward|) so that their outputs stay near [-1, 1] whatever the reward scale; :meth:`IQLCritic.q_value` and
:meth:`IQLCritic.state_value` return environment units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from trifle.errors import ConfigError


@dataclass(frozen=True)
class CriticConfig:
    """Architecture of an :class:`IQLCritic` (stored in its checkpoint)."""

    obs_dim: int
    act_dim: int
    hidden_dim: int = 256
    n_hidden: int = 2
    obs_cardinalities: tuple[int, ...] | None = None  # discrete observations: categories per dimension
    num_actions: int | None = None  # discrete actions (act_dim must be 1)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "obs_cardinalities",
            None if self.obs_cardinalities is None else tuple(int(c) for c in self.obs_cardinalities),
        )
        if (self.obs_cardinalities is None) != (self.num_actions is None):
            raise ConfigError("critic: obs_cardinalities and num_actions are both set (discrete) or both not")
        if self.discrete and (len(self.obs_cardinalities) != self.obs_dim or self.act_dim != 1):
            raise ConfigError(
                f"critic: a discrete critic needs obs_dim = len(obs_cardinalities) and act_dim = 1, got "
                f"obs_dim={self.obs_dim}, obs_cardinalities={self.obs_cardinalities}, act_dim={self.act_dim}"
            )

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    @property
    def input_dim(self) -> int:
        """Width of the encoded observation (plus the action, for a continuous Q)."""
        return sum(self.obs_cardinalities) if self.discrete else self.obs_dim

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.obs_cardinalities is not None:
            out["obs_cardinalities"] = list(self.obs_cardinalities)
        return out


def mlp(in_dim: int, hidden_dim: int, n_hidden: int, out_dim: int) -> nn.Sequential:
    """IQL's MLP: ``n_hidden`` ReLU layers, orthogonal init with gain sqrt(2), zero biases."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2.0))
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Elementwise asymmetric squared loss ``|tau - 1(diff < 0)| diff^2`` (IQL Eq. 5)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff.square()


def q_target(
    rewards: torch.Tensor, dones: torch.Tensor, next_v: torch.Tensor, discount: float
) -> torch.Tensor:
    """IQL's Q target ``r + gamma (1 - d) V(s')`` (Eq. 6)."""
    return rewards + discount * (1.0 - dones) * next_v


class TwinQ(nn.Module):
    """Two independent Q networks; discrete: outputs per action, read at the taken action."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.discrete = cfg.discrete
        in_dim = cfg.input_dim if cfg.discrete else cfg.input_dim + cfg.act_dim
        out_dim = cfg.num_actions if cfg.discrete else 1
        self.q1 = mlp(in_dim, cfg.hidden_dim, cfg.n_hidden, out_dim)
        self.q2 = mlp(in_dim, cfg.hidden_dim, cfg.n_hidden, out_dim)

    def forward(self, features: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            index = actions[:, :1].round().long()
            return self.q1(features).gather(1, index)[:, 0], self.q2(features).gather(1, index)[:, 0]
        x = torch.cat([features, actions], dim=1)
        return self.q1(x)[:, 0], self.q2(x)[:, 0]


class IQLCritic(nn.Module):
    """Q1, Q2, V and the target Q1', Q2' (not trained by the optimizer; see :meth:`update_target`)."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        self.cfg = cfg
        self.q = TwinQ(cfg)
        self.v = mlp(cfg.input_dim, cfg.hidden_dim, cfg.n_hidden, 1)
        self.target_q = TwinQ(cfg)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        self.register_buffer("obs_mean", torch.zeros(cfg.obs_dim))
        self.register_buffer("obs_std", torch.ones(cfg.obs_dim))
        self.register_buffer("value_scale", torch.ones(()))
        if cfg.discrete:
            self.register_buffer("obs_offsets", torch.tensor([0, *cfg.obs_cardinalities[:-1]]).cumsum(0))

    @property
    def device(self) -> torch.device:
        return self.value_scale.device

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (Q1, Q2 and V, not the target copies)."""
        return [p for p in self.parameters() if p.requires_grad]

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """Encoded observations [B, input_dim]: concatenated one-hots, or standardized values."""
        if self.cfg.discrete:
            index = obs.round().long() + self.obs_offsets
            out = torch.zeros(obs.size(0), self.cfg.input_dim, device=obs.device)
            return out.scatter_(1, index, 1.0)
        return (obs.float() - self.obs_mean) / self.obs_std

    def losses(
        self,
        batch: tuple[torch.Tensor, ...],
        *,
        discount: float,
        expectile: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_Q, L_V)`` of a batch ``(obs, actions, rewards, next_obs, dones)``, in scaled units."""
        obs, actions, rewards, next_obs, dones = batch
        features = self.features(obs)
        with torch.no_grad():
            target = torch.minimum(*self.target_q(features, actions))
            y = q_target(rewards / self.value_scale, dones, self.v(self.features(next_obs))[:, 0], discount)
        q1, q2 = self.q(features, actions)
        q_loss = ((q1 - y).square() + (q2 - y).square()).mean()
        v_loss = expectile_loss(target - self.v(features)[:, 0], expectile).mean()
        return q_loss, v_loss

    @torch.no_grad()
    def update_target(self, alpha: float) -> None:
        """Polyak averaging ``Q' <- alpha Q + (1 - alpha) Q'``."""
        for target, online in zip(self.target_q.parameters(), self.q.parameters(), strict=True):
            target.mul_(1.0 - alpha).add_(online, alpha=alpha)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q1', Q2')(s, a) in environment units [B] (the target critic, as IQL's policy reads it)."""
        obs, actions = obs.to(self.device, torch.float32), actions.to(self.device, torch.float32)
        return torch.minimum(*self.target_q(self.features(obs), actions)) * self.value_scale

    @torch.no_grad()
    def state_value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) in environment units [B]."""
        return self.v(self.features(obs.to(self.device, torch.float32)))[:, 0] * self.value_scale

    def num_params(self) -> int:
        return sum(p.numel() for p in self.trainable())
