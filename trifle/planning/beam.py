"""Trajectory Transformer's beam search (docs/paper.md#beam-search), batched over many environments at once.

Every environment has its own ``N`` beams; rows are laid out environment-major (row ``e * n + j``), so
"top N per environment" is a reshape and a sort. Per planning step t (H steps):

1. every beam is copied ``expansion_factor`` times;
2. the action tokens are sampled: ``act_support`` first keeps the actions inside the behaviour's
   support (the GPT's p(a^i | ...) at least ``act_support`` times its mode's); at t = 0 a *proposal*
   hook may then reshape each dimension's distribution among them (Trifle's circuit correction); TT's
   ``cdf_act`` / ``k_act`` filters act last;
3. the reward and value tokens are read with top-1 (TT's ``k_rew = 1``) and their expectations over the
   bins give r_t and V_t;
4. each candidate gets a value, by default TT's Σ_{τ<=t} γ^τ r_τ + γ^{t+1} V_t, or a *value* hook;
5. the best N candidates of each environment are kept;
6. unless this was the last step, the next observation is sampled (``k_obs``).

The first action of each environment's best sequence is returned (re-planning every step).

``GPTStream`` hides the two ways of running the GPT: with a KV cache (one token's forward pass for
the whole batch per sampled token) or, like TT, re-running the whole sequence for every token.
Both see the same tokens and draw the same random numbers, so they choose the same actions.

Context cropping (TT's ``forward(..., crop_increment=transition_dim)``): context plus plan may be longer
than the GPT's ``block_size``. The GPT's positions are absolute and a sequence must start at a transition
boundary, so whenever the ``L`` tokens of a row exceed the block, the oldest
``ceil((L - block_size) / D) * D`` tokens (whole transitions) are dropped and the model runs on the rest
from position 0. The next-token log-probabilities therefore always come from the last <= block_size
tokens that start a transition. Without a cache that is simply the window re-run per token; with a cache,
a token that would overflow the cached window drops the oldest transition and *rebuilds* the cache by
running the new window (new token included) from position 0, since cached keys carry positional
embeddings of their old positions and cannot be shifted. Once the block is full this happens once per D
fed tokens (at every transition's first token), each rebuild a forward pass over about
``block_size - D + 1`` tokens of the current rows; the tokens in between cost one token's pass each.

Action columns may allow any subset of their bins (``TokenSpec.masks``, e.g. an action constraint);
the hook and the filters see the GPT's log-probs over the column's ``action_bins`` with the disallowed
bins at -inf, and the mask is applied again after the hook, so a disallowed action is never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from trifle.models.gpt import KVCache, TrajectoryGPT
from trifle.planning.planner_settings import BeamSettings
from trifle.planning.sampling import expectation, filter_logits, filter_support, restrict, sample


def crop_offset(length: int, block_size: int, transition_dim: int) -> int:
    """How many leading tokens TT drops from a sequence of ``length`` tokens: whole transitions, as few
    as make the rest fit in ``block_size`` (so the rest still starts at a transition boundary)."""
    if length <= block_size:
        return 0
    return -(-(length - block_size) // transition_dim) * transition_dim


class GPTStream:
    """A batch of token sequences and the GPT's log-probabilities ``logp [B, V+1]`` of each next token.

    ``tokens`` is the full history (the caller's view); the model only ever sees ``window``, the tokens
    from ``offset`` on (TT's crop, see the module docstring). All rows have equal length, so one offset
    serves the whole batch and ``select`` / ``repeat_interleave`` need not touch it.
    """

    def __init__(self, model: TrajectoryGPT, prefix: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.block_size, self.transition_dim = model.cfg.block_size, model.cfg.transition_dim
        self.tokens = prefix
        self.offset = 0
        self.cache: KVCache | None = None
        self.rebuilds = 0  # cache rebuilds forced by cropping (not counting the prefix's first pass)
        with torch.no_grad():
            self._restart()

    @property
    def window(self) -> torch.Tensor:
        """The tokens the model sees: the history cropped to the block, starting at position 0."""
        return self.tokens[:, self.offset :]

    def _crop(self) -> int:
        offset = crop_offset(self.tokens.size(1), self.block_size, self.transition_dim)
        if offset >= self.tokens.size(1):
            raise ValueError(
                f"block_size {self.block_size} is shorter than a transition ({self.transition_dim} tokens): "
                "cropping whole transitions leaves no context"
            )
        return offset

    def _full(self) -> torch.Tensor:
        logits, _ = self.model(self.window)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def _restart(self) -> None:
        """Crop the history and run the model on the whole window (rebuilding the cache if caching)."""
        self.offset = self._crop()
        if self.use_cache:
            self.logp, self.cache = self.model.log_prob_next(self.window, KVCache())
        else:
            self.logp, self.cache = self._full(), None

    def feed(self, token: torch.Tensor) -> None:
        """Append one token per row and update ``logp``."""
        token = token.view(-1, 1).to(self.tokens)
        self.tokens = torch.cat([self.tokens, token], dim=1)
        with torch.no_grad():
            if not self.use_cache:
                self.offset = self._crop()
                self.logp = self._full()
            elif self._crop() != self.offset:  # the cached window would overflow the block
                self.rebuilds += 1
                self._restart()
            else:
                self.logp, self.cache = self.model.log_prob_next(token, self.cache)

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
        """Proposal logits [R, nc] for action dimension ``dim`` given the GPT's log-probs [R, nc].

        ``nc = spec.action_bins[dim]``; bins the mask disallows arrive as -inf and stay excluded whatever
        the hook returns for them."""

    def chosen(self, dim: int, tokens: torch.Tensor) -> None:
        """The tokens [R] sampled for dimension ``dim``."""


class PlanValue(Protocol):
    """Scores candidate plans; larger is better.

    A hook with a true ``uses_state`` attribute is also given ``state=`` [R, obs_dim], the tokens of the
    plan's last state s_step (the current observation at step 0, the GPT's sampled one after it; the
    stop token where the GPT ended the episode): TT(+Q)'s critic value reads Q(s_step, a_step).
    """

    def __call__(
        self, step: int, env_of_row: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor
    ) -> torch.Tensor:
        """Value [R] of plans with ``actions`` [R, step+1, act_dim]; ``rewards`` [R, H+1] holds the
        GPT's r_0..r_step and V_step at positions 0..step+1."""


def last_state(stream: GPTStream, spec: TokenSpec) -> torch.Tensor:
    """Tokens [R, obs_dim] of the last transition's state, read when the stream ends with s, a, r."""
    end = stream.tokens.size(1) - spec.act_dim - 1
    return stream.tokens[:, end - spec.obs_dim : end]


def gpt_value(discount: float):
    """TT's value: Σ_τ γ^τ r_τ + γ^{t+1} V_t from the GPT's expected reward and value tokens."""

    def value(step: int, env_of_row: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor):
        weights = discount ** torch.arange(rewards.size(1), dtype=torch.float64, device=rewards.device)
        return rewards @ weights

    return value


def default_action_bins(masks: torch.Tensor, obs_dim: int, act_dim: int) -> tuple[int, ...]:
    """Bins of each action column as far as the masks tell: its last allowed token + 1.

    Exact for ``sampling.column_masks`` (bins ``0..n-1``); a constraint that also forbids a column's top
    bins makes it smaller, which only hides candidates that could never be sampled anyway.
    """
    vocab = masks.size(1) - 1
    bins = []
    for column in range(obs_dim, obs_dim + act_dim):
        allowed = masks[column, :vocab].nonzero()
        bins.append(int(allowed.max()) + 1 if allowed.numel() else 0)
    return tuple(bins)


@dataclass(frozen=True)
class TokenSpec:
    """What the search needs to know about the token layout.

    ``action_bins`` (default: :func:`default_action_bins`) is the number of bins of each action column
    *without* any constraint: the proposal hook sees candidates ``0..action_bins[i]-1`` of dimension i,
    while ``masks`` says which of them may be sampled (any subset, not necessarily a prefix).
    """

    obs_dim: int
    act_dim: int
    masks: torch.Tensor  # [D, V+1] valid tokens per column (sampling.column_masks, maybe constrained)
    reward_values: torch.Tensor  # [V+1] representative of each reward token (stop -> 0)
    value_values: torch.Tensor  # [V+1] representative of each value token (stop -> 0)
    action_bins: tuple[int, ...] = ()  # bins per action column; () derives them from the masks

    def __post_init__(self) -> None:
        bins = self.action_bins or default_action_bins(self.masks, self.obs_dim, self.act_dim)
        object.__setattr__(self, "action_bins", tuple(int(n) for n in bins))
        self._check_actions()

    def _check_actions(self) -> None:
        """Fail at construction, not mid-plan: every action column needs a sampleable bin inside its
        ``action_bins``, and must never allow the stop token or tokens past its bins."""
        vocab = self.masks.size(1) - 1
        if len(self.action_bins) != self.act_dim:
            raise ValueError(f"action_bins {self.action_bins}: expected act_dim={self.act_dim} entries")
        for i, n in enumerate(self.action_bins):
            mask = self.masks[self.obs_dim + i]
            if not 1 <= n <= vocab:
                raise ValueError(f"action_bins[{i}]={n}: expected 1..vocab_size={vocab}")
            if not bool(mask[:n].any()):
                raise ValueError(f"action column {i}: the mask allows none of its {n} bins")
            if bool(mask[n:].any()):
                raise ValueError(
                    f"action column {i}: the mask allows tokens >= action_bins[{i}]={n} (or stop)"
                )


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
    """Sample the act_dim action tokens of every row (feeding each), returning them as [R, act_dim].

    Dimension i draws among tokens ``0..action_bins[i]-1`` allowed by its mask row; the disallowed ones
    are -inf before the hook and the filters, so top-k and the cdf filter choose among allowed bins only.
    """
    chosen = []
    for i in range(spec.act_dim):
        num = spec.action_bins[i]
        allowed = spec.masks[spec.obs_dim + i, :num]
        logits = restrict(stream.logp[:, :num], allowed)
        if cfg.act_support is not None:
            # The behaviour's support is the GPT's (the data's) distribution, before any correction.
            logits = filter_support(logits, cfg.act_support)
            allowed = allowed & torch.isfinite(logits)
        if proposal is not None:
            # Masked again: the hook only reshapes the distribution, it cannot re-allow a bin.
            logits = restrict(proposal.logits(i, logits), allowed)
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
        if getattr(value_fn, "uses_state", False):
            values = value_fn(t, env_of_row, actions, rewards, state=last_state(stream, spec))
        else:
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
