"""Trajectory Transformer's beam search (notes §1.6), batched over many environments at once.

Every environment has its own ``N`` beams; rows are laid out environment-major (row ``e * n + j``), so
"top N per environment" is a reshape and a sort. Per planning step t (H steps):

1. every beam is copied ``expansion_factor`` times;
2. the action tokens are sampled (``k_act`` / ``cdf_act`` filters); at t = 0 a *proposal* hook may
   reshape each dimension's distribution (Trifle's circuit correction);
3. the reward and value tokens are read with top-1 (TT's ``k_rew = 1``) and their expectations over the
   bins give r_t and V_t;
4. each candidate gets a value, by default TT's Σ_{τ<=t} γ^τ r_τ + γ^{t+1} V_t, or a *value* hook;
5. the best N candidates of each environment are kept;
6. unless this was the last step, the next observation is sampled (``k_obs``).

The first action of each environment's best sequence is returned (re-planning every step).

``GPTStream`` hides the two ways of running the GPT: with a KV cache (one token's forward pass for
the whole batch per sampled token) or, like TT, re-running the whole sequence for every token.
Both see the same tokens and draw the same random numbers, so they choose the same actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from trifle.models.gpt import KVCache, TrajectoryGPT
from trifle.planning.sampling import expectation, filter_logits, restrict, sample


@dataclass(frozen=True)
class BeamSettings:
    """The beam-search hyperparameters (planner config keys of the same names)."""

    beam_width: int
    horizon: int
    expansion_factor: int
    k_obs: int | None
    k_act: int | None
    cdf_act: float | None
    discount: float
    use_cache: bool = True


class GPTStream:
    """A batch of token sequences and the GPT's log-probabilities ``logp [B, V+1]`` of each next token."""

    def __init__(self, model: TrajectoryGPT, prefix: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.tokens = prefix
        with torch.no_grad():
            if use_cache:
                self.logp, self.cache = model.log_prob_next(prefix, KVCache())
            else:
                self.logp, self.cache = self._full(), None

    def _full(self) -> torch.Tensor:
        logits, _ = self.model(self.tokens)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def feed(self, token: torch.Tensor) -> None:
        """Append one token per row and update ``logp``."""
        token = token.view(-1, 1).to(self.tokens)
        self.tokens = torch.cat([self.tokens, token], dim=1)
        with torch.no_grad():
            if self.use_cache:
                self.logp, self.cache = self.model.log_prob_next(token, self.cache)
            else:
                self.logp = self._full()

    def select(self, rows: torch.Tensor) -> None:
        self.tokens, self.logp = self.tokens[rows], self.logp[rows]
        if self.cache is not None:
            self.cache = self.cache.select(rows)

    def repeat_interleave(self, n: int) -> None:
        self.tokens = self.tokens.repeat_interleave(n, dim=0)
        self.logp = self.logp.repeat_interleave(n, dim=0)
        if self.cache is not None:
            self.cache = self.cache.repeat_interleave(n)


class ActionProposal(Protocol):
    """Reshapes the first planning step's action distribution, one dimension at a time."""

    def begin(self, env_of_row: torch.Tensor) -> None:
        """Start a new first step for rows belonging to environments ``env_of_row`` [R]."""

    def logits(self, dim: int, logp: torch.Tensor) -> torch.Tensor:
        """Proposal logits [R, nc] for action dimension ``dim`` given the GPT's log-probs [R, nc]."""

    def chosen(self, dim: int, tokens: torch.Tensor) -> None:
        """The tokens [R] sampled for dimension ``dim``."""


class PlanValue(Protocol):
    """Scores candidate plans; larger is better."""

    def __call__(
        self, step: int, env_of_row: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor
    ) -> torch.Tensor:
        """Value [R] of plans with ``actions`` [R, step+1, act_dim]; ``rewards`` [R, H+1] holds the
        GPT's r_0..r_step and V_step at positions 0..step+1."""


def gpt_value(discount: float):
    """TT's value: Σ_τ γ^τ r_τ + γ^{t+1} V_t from the GPT's expected reward and value tokens."""

    def value(step: int, env_of_row: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor):
        weights = discount ** torch.arange(rewards.size(1), dtype=torch.float64, device=rewards.device)
        return rewards @ weights

    return value


@dataclass(frozen=True)
class TokenSpec:
    """What the search needs to know about the token layout."""

    obs_dim: int
    act_dim: int
    masks: torch.Tensor  # [D, V+1] valid tokens per column (sampling.column_masks)
    reward_values: torch.Tensor  # [V+1] representative of each reward token (stop -> 0)
    value_values: torch.Tensor  # [V+1] representative of each value token (stop -> 0)


def _top_per_env(values: torch.Tensor, num_envs: int, keep: int) -> torch.Tensor:
    """Row ids of the ``keep`` best rows of each environment (stable: ties go to the lower row)."""
    per_env = values.view(num_envs, -1)
    order = per_env.sort(dim=1, descending=True, stable=True).indices[:, :keep]
    return (order + torch.arange(num_envs, device=values.device)[:, None] * per_env.size(1)).reshape(-1)


def _sample_actions(
    stream: GPTStream,
    spec: TokenSpec,
    cfg: BeamSettings,
    generator: torch.Generator,
    proposal: ActionProposal | None,
) -> torch.Tensor:
    """Sample the act_dim action tokens of every row (feeding each), returning them as [R, act_dim]."""
    chosen = []
    for i in range(spec.act_dim):
        column = spec.obs_dim + i
        num = int(spec.masks[column].sum())  # action bins are tokens 0..num-1 (no stop token)
        logits = stream.logp[:, :num]
        if proposal is not None:
            logits = proposal.logits(i, logits)
        logits = filter_logits(logits, k=cfg.k_act, cdf=cfg.cdf_act)
        token = sample(logits, generator)
        if proposal is not None:
            proposal.chosen(i, token)
        stream.feed(token)
        chosen.append(token)
    return torch.stack(chosen, dim=1)


def _sample_observation(stream: GPTStream, spec: TokenSpec, cfg: BeamSettings, generator) -> None:
    for j in range(spec.obs_dim):
        logits = filter_logits(restrict(stream.logp, spec.masks[j]), k=cfg.k_obs)
        stream.feed(sample(logits, generator))


def _top1(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return restrict(logp, mask).argmax(dim=-1)


def beam_search(
    model: TrajectoryGPT,
    prefix: torch.Tensor,
    spec: TokenSpec,
    cfg: BeamSettings,
    generator: torch.Generator,
    *,
    proposal: ActionProposal | None = None,
    value_fn: PlanValue | None = None,
) -> torch.Tensor:
    """First action tokens [E, act_dim] of the best plan for each of the E prefixes [E, L] (equal length)."""
    num_envs, n, lam, horizon = prefix.size(0), cfg.beam_width, cfg.expansion_factor, cfg.horizon
    value_fn = value_fn or gpt_value(cfg.discount)
    device = prefix.device
    stream = GPTStream(model, prefix, cfg.use_cache)
    stream.repeat_interleave(n)
    env_of_row = torch.arange(num_envs, device=device).repeat_interleave(n)
    rewards = torch.zeros(num_envs * n, horizon + 1, dtype=torch.float64, device=device)
    actions = torch.zeros(num_envs * n, 0, spec.act_dim, dtype=torch.long, device=device)
    reward_col, value_col = spec.obs_dim + spec.act_dim, spec.obs_dim + spec.act_dim + 1
    values = torch.zeros(num_envs * n, dtype=torch.float64, device=device)
    for t in range(horizon):
        stream.repeat_interleave(lam)
        env_of_row, rewards, actions = (
            z.repeat_interleave(lam, dim=0) for z in (env_of_row, rewards, actions)
        )
        step_proposal = proposal if t == 0 else None
        if step_proposal is not None:
            step_proposal.begin(env_of_row)
        a_t = _sample_actions(stream, spec, cfg, generator, step_proposal)
        actions = torch.cat([actions, a_t[:, None]], dim=1)
        rewards[:, t] = expectation(stream.logp, spec.reward_values)
        stream.feed(_top1(stream.logp, spec.masks[reward_col]))
        rewards[:, t + 1] = expectation(stream.logp, spec.value_values)
        value_token = _top1(stream.logp, spec.masks[value_col])
        values = value_fn(t, env_of_row, actions, rewards)
        keep = _top_per_env(values, num_envs, n)
        stream.select(keep)
        env_of_row, rewards, actions, values, value_token = (
            z[keep] for z in (env_of_row, rewards, actions, values, value_token)
        )
        if t < horizon - 1:
            stream.feed(value_token)
            _sample_observation(stream, spec, cfg, generator)
    best = _top_per_env(values, num_envs, 1)
    return actions[best, 0]
