"""Decision Transformer (Chen et al. 2021): a causal GPT over (return-to-go, state, action) triples.

The stochastic-task baseline of the paper (§6.2, Appx E.2) and the p_DT prior of DT-based Trifle.
A context of ``T <= context_len`` steps becomes ``3T`` tokens ``R_1 s_1 a_1 R_2 s_2 a_2 ...``; the
hidden state of the state token ``s_t`` predicts ``a_t``. Causal attention means ``a_t`` only sees
returns, states and actions up to ``s_t``, so feeding a placeholder for the last action is harmless.

As in DT's gym implementation, each token gets its *episode timestep* embedding (not a position in
the window) and there is no positional embedding; the stacked tokens pass a LayerNorm first. Two data
kinds share the architecture, decided by whether ``obs_cardinalities``/``num_actions`` are given:

* **discrete** (Taxi, FrozenLake): each observation dimension is a small categorical with its own
  embedding rows, summed over dimensions; actions are one categorical embedded by a table and
  predicted as logits (cross-entropy), as DT's Atari variant does;
* **continuous** (MuJoCo): observations are standardized with dataset statistics stored in the model,
  states/actions are embedded linearly and the action head ends in ``tanh`` (MSE), as in DT's gym code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trifle.errors import ConfigError
from trifle.models.gpt import Block, init_gpt2_weights


@dataclass
class DTConfig:
    """Everything needed to rebuild the model; stored in checkpoints as a plain dict.

    ``max_timestep`` sizes the timestep embedding; later timesteps share its last row.
    """

    obs_dim: int
    act_dim: int
    context_len: int
    max_timestep: int
    obs_cardinalities: list[int] | None = None
    num_actions: int | None = None
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for key in ("obs_dim", "act_dim", "context_len", "max_timestep", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                name = key if key in ("obs_dim", "act_dim", "max_timestep") else f"dt.{key}"
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"dt.n_embd: {self.n_embd} must be divisible by dt.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dt.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if (self.obs_cardinalities is None) != (self.num_actions is None):
            raise ConfigError("obs_cardinalities / num_actions: a discrete model needs both (or neither)")
        if self.discrete:
            self.obs_cardinalities = [int(c) for c in self.obs_cardinalities]  # type: ignore[union-attr]
            if len(self.obs_cardinalities) != self.obs_dim or min(self.obs_cardinalities) < 1:
                raise ConfigError(
                    f"obs_cardinalities: expected {self.obs_dim} positive sizes, got {self.obs_cardinalities}"
                )
            if self.act_dim != 1 or int(self.num_actions) < 1:  # type: ignore[arg-type]
                raise ConfigError(
                    f"num_actions: discrete actions need act_dim 1 and num_actions >= 1, got act_dim "
                    f"{self.act_dim}, num_actions {self.num_actions!r}"
                )
            self.num_actions = int(self.num_actions)  # type: ignore[arg-type]

    @property
    def discrete(self) -> bool:
        return self.obs_cardinalities is not None

    def to_dict(self) -> dict:
        return asdict(self)


class DecisionTransformer(nn.Module):
    """Returns-to-go, states and actions in; one action prediction per state token out."""

    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E = cfg.n_embd
        self.embed_timestep = nn.Embedding(cfg.max_timestep, E)
        self.embed_return = nn.Linear(1, E)
        if cfg.discrete:
            cards = torch.tensor(cfg.obs_cardinalities, dtype=torch.long)
            self.register_buffer("obs_offsets", torch.cumsum(cards, 0) - cards, persistent=False)
            self.embed_state = nn.Embedding(int(cards.sum()), E)
            self.embed_action = nn.Embedding(cfg.num_actions, E)
            self.predict_action = nn.Linear(E, cfg.num_actions)
        else:
            # Dataset statistics, filled in by the trainer and saved with the weights.
            self.register_buffer("obs_mean", torch.zeros(cfg.obs_dim))
            self.register_buffer("obs_std", torch.ones(cfg.obs_dim))
            self.embed_state = nn.Linear(cfg.obs_dim, E)
            self.embed_action = nn.Linear(cfg.act_dim, E)
            self.predict_action = nn.Linear(E, cfg.act_dim)
        self.embed_ln = nn.LayerNorm(E)
        self.drop = nn.Dropout(cfg.dropout)
        # trifle.models.gpt.Block reads only n_embd, n_head and dropout, which DTConfig provides.
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])  # type: ignore[arg-type]
        self.ln_f = nn.LayerNorm(E)
        self._init_weights()

    def _init_weights(self) -> None:
        init_gpt2_weights(self, self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed_return.weight.device

    def _embed_states(self, observations: torch.Tensor) -> torch.Tensor:
        if self.cfg.discrete:
            codes = observations.round().long() + self.obs_offsets
            return self.embed_state(codes).sum(dim=-2)
        return self.embed_state((observations - self.obs_mean) / self.obs_std)

    def _embed_actions(self, actions: torch.Tensor) -> torch.Tensor:
        if self.cfg.discrete:
            return self.embed_action(actions[..., 0].round().long())
        return self.embed_action(actions)

    def forward(
        self,
        returns_to_go: torch.Tensor,
        observations: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Action predictions ``[B, T, num_actions]`` (logits) or ``[B, T, act_dim]`` (in (-1, 1)).

        Inputs: scaled returns-to-go ``[B, T]``, raw observations ``[B, T, obs_dim]``, raw actions
        ``[B, T, act_dim]`` (integer-valued for discrete tasks) and episode timesteps ``[B, T]``.
        Prediction ``t`` depends only on steps ``<= t`` and not on ``actions[:, t]``, so sequences may
        be right-padded with anything.
        """
        B, T = returns_to_go.shape
        if self.cfg.context_len < T:
            raise ValueError(f"{T} steps exceed the context length {self.cfg.context_len}")
        time = self.embed_timestep(timesteps.long().clamp(0, self.cfg.max_timestep - 1))
        tokens = torch.stack(
            (
                self.embed_return(returns_to_go.unsqueeze(-1).to(time.dtype)) + time,
                self._embed_states(observations) + time,
                self._embed_actions(actions) + time,
            ),
            dim=2,
        ).reshape(B, 3 * T, self.cfg.n_embd)
        x = self.drop(self.embed_ln(tokens))
        for block in self.blocks:
            x = block(x)
        state_hidden = self.ln_f(x)[:, 1::3]
        out = self.predict_action(state_hidden)
        return out if self.cfg.discrete else torch.tanh(out)

    def action_loss(
        self,
        returns_to_go: torch.Tensor,
        observations: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy (discrete) or squared error (continuous) over valid steps (``mask`` 1)."""
        pred = self(returns_to_go, observations, actions, timesteps)
        mask = mask.to(pred.dtype)
        if self.cfg.discrete:
            target = actions[..., 0].round().long()
            per_step = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(mask)
        else:
            per_step = ((pred - actions) ** 2).mean(-1)
        return (per_step * mask).sum() / mask.sum().clamp_min(1.0)
