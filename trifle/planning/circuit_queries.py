"""Trifle's circuit queries, batched: value distributions, the adaptive threshold, per-candidate scores,
and the multi-step expected value.

The circuit models a window of K transitions flattened into ``K * D`` variables (transition k, column c
is variable ``k * D + c``); with K > 1 the last category (``num_cats - 1``) is the pad meaning "the
episode is over" (trifle.data.circuit_windows). Only ``circuit.conditional(x, missing, target_vars,
soft_evidence)`` and ``num_vars`` / ``num_cats`` are used, so TorchCircuit and the pyjuice adapter both
work.

Many planner rows carry identical evidence (every beam of an environment starts from the same state,
and Taxi has one action dimension), so each query runs once per distinct evidence row and the answers
are scattered back: the result is exactly that of the full batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trifle.data.discretize import Discretizer
from trifle.planning.sampling import bin_values

#: Largest batch sent to the circuit in one call (keeps the [B, V, C] evidence tensor moderate).
MAX_QUERY_ROWS = 4096


@dataclass(frozen=True)
class WindowLayout:
    """Where each token of a K-transition window sits among the circuit's variables."""

    obs_dim: int
    act_dim: int
    window: int
    num_cats: int

    @property
    def transition_dim(self) -> int:
        return self.obs_dim + self.act_dim + 2

    @property
    def num_vars(self) -> int:
        return self.window * self.transition_dim

    @property
    def pad(self) -> int | None:
        """The "episode over" category (only windows of K > 1 have one)."""
        return self.num_cats - 1 if self.window > 1 else None

    def obs_vars(self, t: int) -> list[int]:
        return [t * self.transition_dim + j for j in range(self.obs_dim)]

    def act_var(self, t: int, i: int) -> int:
        return t * self.transition_dim + self.obs_dim + i

    def reward_var(self, t: int) -> int:
        return t * self.transition_dim + self.obs_dim + self.act_dim

    def value_var(self, t: int) -> int:
        return (t + 1) * self.transition_dim - 1

    def evidence(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, missing)`` with the first transition's state observed and everything else missing."""
        b = obs.size(0)
        x = torch.zeros(b, self.num_vars, dtype=torch.long, device=obs.device)
        missing = torch.ones(b, self.num_vars, dtype=torch.bool, device=obs.device)
        x[:, self.obs_vars(0)] = obs.long()
        missing[:, self.obs_vars(0)] = False
        return x, missing


def unique_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)``: one representative row id per distinct row of ``key`` and, for every row,
    the index of its distinct row, so that ``f(rows[first])[inverse] == f(rows)`` for a row-wise f."""
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), key.size(0), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(key.size(0), device=key.device), reduce="amin")
    return first, inverse


def conditional_unique(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    targets: list[int],
    soft: torch.Tensor | None = None,
    *,
    dedup: bool = True,
) -> torch.Tensor:
    """``circuit.conditional`` ``[B, T, C]`` (float64), evaluated once per distinct evidence row, in chunks.

    ``soft`` is per-row soft evidence ``[B, V, C]``, or ``[V, C]`` shared by every row (an action
    constraint): shared evidence is broadcast, never copied per row, and plays no part in de-duplication.
    """
    x = torch.where(missing, torch.zeros_like(x), x)
    shared = soft is not None and soft.dim() == 2
    if dedup:
        key = [x, missing.long()] + ([] if soft is None or shared else [soft.flatten(1).double()])
        first, inverse = unique_rows(torch.cat([k.double() for k in key], dim=1))
    else:
        first, inverse = torch.arange(x.size(0), device=x.device), None
    outs = []
    for lo in range(0, len(first), MAX_QUERY_ROWS):
        rows = first[lo : lo + MAX_QUERY_ROWS]
        part_soft = soft
        if soft is not None:
            part_soft = soft.expand(len(rows), -1, -1) if shared else soft[rows]
        out = circuit.conditional(x[rows], missing[rows], targets, soft_evidence=part_soft)
        outs.append(out.double().to(x.device))
    out = torch.cat(outs)
    return out if inverse is None else out[inverse]


def value_distribution(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    value_var: int,
    num_bins: int,
    soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """p(V | evidence) ``[B, num_bins]`` over the value column's real bins (renormalised).

    Restricting to the real bins drops the pad category and any unused category, whose training mass
    is zero (up to the EM pseudocount) for the first transition's value, so the distribution is over
    values that have a meaning and an order.
    """
    probs = conditional_unique(circuit, x, missing, [value_var], soft)[:, 0, :num_bins]
    return probs / probs.sum(dim=-1, keepdim=True)


def kept_bins(value_probs: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """The released code's adaptive threshold (notes §1.4): keep bins whose CDF >= 1 - top_ratio.

    So the kept set starts at the (1 - top_ratio)-quantile of p(V | ...) and carries at least
    ``top_ratio`` of the mass; bins are in ascending value order. Computed in float64 against the
    row's own total so that top_ratio = 1 keeps every bin.
    """
    cdf = value_probs.double().cumsum(dim=-1)
    return cdf >= (1.0 - float(top_ratio)) * cdf[..., -1:]


def candidate_scores(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    var: int,
    num_candidates: int,
    value_var: int,
    keep: torch.Tensor,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every candidate c < num_candidates of variable ``var``: p(V in kept | evidence, var = c).

    ``soft`` is shared soft evidence ``[V, C]`` (an action constraint, see :func:`constraint_evidence`);
    with it the scores are p(V in kept | evidence, var = c, constraint) times
    :func:`constraint_likelihood`, i.e. proportional (over c) to p(V in kept, constraint | evidence, var = c).

    One batched query of ``B * num_candidates`` rows. Returns ``(scores [B, nc], dists [B, nc, nb])``
    where ``dists`` are the per-candidate value distributions p(V | evidence, var = c) over the
    ``nb = keep.size(-1)`` real bins: the planner reuses the chosen candidate's distribution as the
    next dimension's p(V | s, a^{<i+1}), as the released code does.
    """
    b, nb = x.size(0), keep.size(-1)
    cand = torch.arange(num_candidates, device=x.device)
    xb = x.repeat_interleave(num_candidates, dim=0)
    mb = missing.repeat_interleave(num_candidates, dim=0)
    xb[:, var] = cand.repeat(b)
    mb[:, var] = False
    dists = value_distribution(circuit, xb, mb, value_var, nb, soft).view(b, num_candidates, nb)
    scores = (dists * keep[:, None, :].to(dists.dtype)).sum(dim=-1)
    if soft is not None:
        scores = scores * constraint_likelihood(circuit, x, missing, var, num_candidates, soft)
    return scores, dists


def constraint_evidence(layout: WindowLayout, allowed: dict[int, torch.Tensor]) -> torch.Tensor:
    """Shared soft evidence ``[V, C]`` of an action constraint on the first transition's actions.

    ``allowed`` maps an action dimension to its allowed bins (bool ``[num_bins]``); the indicator of
    those bins is the evidence on that dimension's variable ("a^j is one of the allowed bins"), every
    other weight is 1, so the circuit marginalises the constrained dimension over exactly the allowed set.
    """
    soft = torch.ones(layout.num_vars, layout.num_cats, dtype=torch.float64)
    for dim, bins in allowed.items():
        row = torch.zeros(layout.num_cats, dtype=torch.float64)
        row[: len(bins)] = torch.as_tensor(bins, dtype=torch.float64)
        soft[layout.act_var(0, dim)] = row
    return soft


def constraint_likelihood(
    circuit, x: torch.Tensor, missing: torch.Tensor, var: int, num_candidates: int, soft: torch.Tensor
) -> torch.Tensor:
    """``[B, nc]``, proportional over c to p(constraint | evidence, var = c).

    By Bayes, p(C | e, var = c) = p(var = c | e, C) p(C | e) / p(var = c | e), and p(C | e) does not
    depend on c: two single-variable queries, with and without the constraint's evidence, give the
    factor that lets an earlier action dimension anticipate a constraint on a later one. For a
    constrained ``var`` itself the factor is 0 on disallowed candidates. A candidate the circuit deems
    impossible (p(var = c | e) = 0) gets 0.
    """
    with_c = conditional_unique(circuit, x, missing, [var], soft)[:, 0, :num_candidates]
    without = conditional_unique(circuit, x, missing, [var])[:, 0, :num_candidates]
    return torch.where(without > 0, with_c / without.clamp_min(1e-300), torch.zeros_like(with_c))


def expected_multistep_value(
    circuit,
    obs: torch.Tensor,
    actions: torch.Tensor,
    *,
    window: int,
    discount: float,
    discretizer: Discretizer,
) -> torch.Tensor:
    """E[V^m] = sum_{h<H} γ^h E[r_h] + γ^H E[V_{H-1}] given s_t and planned actions a_t..a_{t+H-1}.

    ``obs`` [B, obs_dim] and ``actions`` [B, H, act_dim] are tokens, H <= window. Intermediate states,
    and actions after the plan, are marginalised; all H rewards and the last value come from one
    conditional query. ``V_{H-1}`` is TT's value token, the discounted return after r_{H-1}
    (notes §1.5, Algorithm 3). A reward or value in the pad category (the episode ended) counts as 0.

    The first action is hard evidence. A later planned action a_h is soft evidence "a_h = planned or
    pad": in the data, actions after a terminal state are pad, so hard evidence would wrongly rule out
    every trajectory that ends inside the plan (a Taxi delivery, say).
    """
    b, horizon, act_dim = actions.shape
    obs_dim = obs.size(1)
    layout = WindowLayout(obs_dim, act_dim, window, circuit.num_cats)
    if not 1 <= horizon <= window:
        raise ValueError(f"expected 1 <= plan length <= window={window}, got {horizon}")
    # Rows with the same state and plan have the same value: query each distinct one once.
    first, inverse = unique_rows(torch.cat([obs.long(), actions.reshape(b, -1).long()], dim=1))
    obs, actions, b = obs[first], actions[first], len(first)
    x, missing = layout.evidence(obs)
    for i in range(act_dim):
        x[:, layout.act_var(0, i)] = actions[:, 0, i]
        missing[:, layout.act_var(0, i)] = False
    soft = None
    if horizon > 1:
        soft = torch.ones(b, layout.num_vars, layout.num_cats, dtype=torch.float32, device=x.device)
        for h in range(1, horizon):
            for i in range(act_dim):
                row = torch.zeros(b, layout.num_cats, device=x.device)
                row.scatter_(1, actions[:, h, i : i + 1].long(), 1.0)
                row[:, layout.pad] = 1.0
                soft[:, layout.act_var(h, i)] = row
    targets = [layout.reward_var(h) for h in range(horizon)] + [layout.value_var(horizon - 1)]
    probs = conditional_unique(circuit, x, missing, targets, soft, dedup=False)  # [b, H + 1, C]
    r_vals = bin_values(discretizer.columns[-2].values, layout.num_cats).to(x.device)
    v_vals = bin_values(discretizer.columns[-1].values, layout.num_cats).to(x.device)
    weights = discount ** torch.arange(horizon + 1, dtype=torch.float64, device=x.device)
    rewards = probs[:, :horizon] @ r_vals
    value = probs[:, horizon] @ v_vals
    return (rewards @ weights[:horizon] + weights[horizon] * value)[inverse]
