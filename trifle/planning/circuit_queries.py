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

import functools
from dataclasses import dataclass

import torch

from trifle.data.discretize import Discretizer
from trifle.planning.planner_settings import MULTISTEP_VALUES, VALUE_THRESHOLDS
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


@functools.cache
def _hash_weights(columns: int) -> torch.Tensor:
    """A fixed random odd int64 multiplier per column (made once per width: unique_rows is on the
    planner's per-step path)."""
    g = torch.Generator().manual_seed(0x5EED + columns)
    return torch.randint(-(2**62), 2**62, (columns,), generator=g, dtype=torch.int64) | 1


def _row_hashes(bits: torch.Tensor) -> torch.Tensor:
    """One int64 per row of ``bits`` [R, C]: :func:`_hash_weights` times the columns, summed with int64
    wrap-around (so equal rows hash equally; unequal ones collide with probability about 2**-64)."""
    return (bits * _hash_weights(bits.size(1)).to(bits.device)).sum(1)


def unique_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)``: one representative row id per distinct row of ``key`` (in the order the rows
    first occur) and, for every row, the index of its distinct row, so that
    ``f(rows[first])[inverse] == f(rows)`` for a row-wise f.

    Rows are compared by their bit patterns through one hash per row: a 1-d unique is about ten times
    faster than ``torch.unique(dim=0)``, which sorted whole rows and took 5% of m-Trifle's planning. The
    grouping is then checked row by row and, should two different rows ever share a hash, redone
    with ``torch.unique(dim=0)``, so it is exact. (0.0 and -0.0 differ in bits and are kept apart: still
    exact, since f sees each row's own values.)
    """
    bits = key.contiguous().view(torch.int64) if key.dtype == torch.float64 else key.long()
    _, inverse = torch.unique(_row_hashes(bits), return_inverse=True)
    first = _first_rows(inverse)
    if not torch.equal(bits[first][inverse], bits):  # a hash collision: group the rows themselves
        _, inverse = torch.unique(bits, dim=0, return_inverse=True)
        first = _first_rows(inverse)
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return first[order], rank[inverse]


def _first_rows(inverse: torch.Tensor) -> torch.Tensor:
    """The smallest row id of each group of ``inverse``."""
    rows = torch.arange(inverse.size(0), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), inverse.size(0), dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin")


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


def kept_bins(value_probs: torch.Tensor, top_ratio: float, rule: str = "mass") -> torch.Tensor:
    """The adaptive threshold of Trifle's proposal (docs/paper.md#adaptive-threshold): which levels count as "good", as weights.

    Levels are in ascending order. Let q be the (1 - top_ratio)-quantile level of p(G | ...), the
    first level whose CDF >= 1 - top_ratio. Three rules (``planner.value_threshold``):

    * ``"mass"`` (default): the top ``top_ratio`` of the mass exactly. Every level above q has weight
      1 and q has the fraction w of its own mass that completes ``top_ratio``, so the weights keep
      exactly ``top_ratio`` of p(G | ...) and a candidate's score is P(G > g_q | c) + w P(G = g_q | c).
      Where no level holds much mass this is ``strict`` plus a sliver of q; at an atom it still tells
      candidates apart by how much of their mass lies above the atom *and* how much at it, and when
      the atom is the best outcome (Taxi's delivery state: G = 20.19 holds 90% of the mass and nothing
      is above it) the candidates that reach it score highest instead of all scoring 0.
    * ``"cdf"`` (the released code): keep the levels whose CDF >= 1 - top_ratio, i.e. q and every level
      above it (weight 1 on q): *at least* ``top_ratio`` of the mass, score P(G >= g_q | s, a^{<=i}).
      Inert when q is the lowest level (it then holds at least 1 - top_ratio of the mass; FrozenLake:
      p(G = 0 | s) > 0.8 in most states): every candidate scores 1.
    * ``"strict"``: the levels strictly above q (weight 0 on q), score P(G > g_q | s, a^{<=i}); if q is
      the top level it keeps {q}. Levels above q that carry no mass still count as "above", so at the
      best-outcome atom every candidate scores 0 (or the circuit's pseudocount noise).

    "mass" is the rule in between, and the one whose kept set is always exactly the top ``top_ratio``
    of the distribution. Computed in float64 against the row's own total, so that top_ratio = 1
    keeps every level under every rule.
    """

    if rule not in VALUE_THRESHOLDS:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {VALUE_THRESHOLDS}")
    cdf = value_probs.double().cumsum(dim=-1)
    level = (1.0 - float(top_ratio)) * cdf[..., -1:]
    at_or_above = cdf >= level
    if rule == "cdf":
        return at_or_above
    if rule == "mass":
        below = torch.cat([torch.zeros_like(cdf[..., :1]), cdf[..., :-1]], dim=-1)
        # Level j keeps the part of its mass that lies above the level 1 - top_ratio of the CDF.
        probs = cdf - below
        kept = (cdf - torch.maximum(below, level)).clamp_min(0.0)
        return torch.where(probs > 0, kept / probs.clamp_min(1e-300), (below >= level).double())
    # Bin j lies strictly above q iff the mass of the bins below j already reaches the level.
    below = torch.cat([torch.zeros_like(cdf[..., :1]), cdf[..., :-1]], dim=-1)
    above = below >= level
    return torch.where(above.any(dim=-1, keepdim=True), above, at_or_above)


def fixed_kept_levels(marginal: torch.Tensor, quantile: float) -> torch.Tensor:
    """A fixed threshold (``planner.fixed_threshold``; Table 7(b)'s ablation, docs/paper.md#adaptive-threshold):
    weight 1 on every level at or above the ``quantile``-quantile of the target's *marginal* p(G), the
    same levels for every state and action prefix.

    Level j is kept when the marginal mass strictly below it reaches ``quantile``: with 100 value bins
    of equal data mass (the quantile discretizer) ``quantile = 0.9`` keeps bins 90..99, the paper's
    "v = 90 of the 0-99 value bins". If no level qualifies (the top level's own mass exceeds
    1 - quantile) the top level is kept, so the proposal never conditions on an empty set. This is the
    rule the adaptive threshold (:func:`kept_bins`) is compared against: it ignores what is reachable
    from the current state, so it asks too much where every outcome is poor and too little where every
    outcome is good.
    """
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"fixed threshold quantile {quantile!r}: expected a number in (0, 1)")
    probs = marginal.double()
    below = probs.cumsum(dim=-1) - probs
    # A relative tolerance, so that equal-mass bins' float sums (0.9 as 0.8999...) land where they should.
    kept = (below >= (float(quantile) - 1e-9) * probs.sum()).double()
    if not kept.any():
        kept[-1] = 1.0
    return kept


@dataclass(frozen=True)
class CorrectionTarget:
    """The quantity Trifle's proposal thresholds (``planner.correction_target``).

    * ``value``: the first transition's value token V_t, the discounted return *after* r_t (what the
      released code corrects with). It ignores what the action earns now, so an action that ends the
      episode with its reward (Taxi's +20 delivery, FrozenLake's goal: V_t = 0 afterwards) looks no
      better than failing.
    * ``return``: the return-to-go G_t = r_t + gamma V_t, which is what "how good is this action" means.
      It is a sum of two circuit variables, so its distribution comes from the joint
      p(r_t = k, V_t | e) = p(r_t = k | e) p(V_t | e, r_t = k): one query for the reward and one per
      reward bin, exact. Equal sums of different (k, b) pairs are merged into one level, so the
      levels are the distinct values of G_t in ascending order and ``kept_bins`` applies unchanged.
      The cost grows with the number of reward bins (Taxi 5, FrozenLake 2; 100 for Gym-MuJoCo, where
      the per-step reward is small beside V_t and ``value`` is used).
    """

    value_var: int
    value_bins: int
    reward_var: int | None = None
    reward_bins: int = 0
    levels: torch.Tensor | None = None  # [reward_bins * value_bins] -> index of the distinct return
    num_levels: int = 0

    @classmethod
    def value(cls, value_var: int, value_bins: int) -> CorrectionTarget:
        return cls(value_var, value_bins, num_levels=value_bins)

    @classmethod
    def return_to_go(
        cls, layout: WindowLayout, discretizer: Discretizer, discount: float
    ) -> CorrectionTarget:
        r_vals = torch.as_tensor(discretizer.columns[-2].values, dtype=torch.float64)
        v_vals = torch.as_tensor(discretizer.columns[-1].values, dtype=torch.float64)
        g = (r_vals[:, None] + float(discount) * v_vals[None, :]).reshape(-1)
        _, levels = torch.unique(g, sorted=True, return_inverse=True)
        return cls(
            layout.value_var(0),
            len(v_vals),
            reward_var=layout.reward_var(0),
            reward_bins=len(r_vals),
            levels=levels,
            num_levels=int(levels.max()) + 1,
        )

    def distribution(self, circuit, x: torch.Tensor, missing: torch.Tensor, soft=None) -> torch.Tensor:
        """p(target | evidence) ``[B, num_levels]`` over the target's levels in ascending order."""
        if self.reward_var is None:
            return value_distribution(circuit, x, missing, self.value_var, self.value_bins, soft)
        p_r = conditional_unique(circuit, x, missing, [self.reward_var], soft)[:, 0, : self.reward_bins]
        p_r = p_r / p_r.sum(dim=-1, keepdim=True)
        joint = []
        for k in range(self.reward_bins):
            xk, mk = x.clone(), missing.clone()
            xk[:, self.reward_var], mk[:, self.reward_var] = k, False
            p_v = value_distribution(circuit, xk, mk, self.value_var, self.value_bins, soft)
            joint.append(p_r[:, k : k + 1] * torch.nan_to_num(p_v))
        joint = torch.cat(joint, dim=1)
        out = torch.zeros(x.size(0), self.num_levels, dtype=joint.dtype, device=joint.device)
        return out.index_add_(1, self.levels.to(joint.device), joint)


def candidate_scores(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    var: int,
    num_candidates: int,
    target: int | CorrectionTarget,
    keep: torch.Tensor,
    soft: torch.Tensor | None = None,
    *,
    one_pass: bool = True,
    lookahead: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every candidate c < num_candidates of variable ``var``: p(target in kept | evidence, var = c).

    ``target`` is a :class:`CorrectionTarget`, or an int: the value variable (the ``value`` target over
    ``keep.size(-1)`` bins). ``soft`` is shared soft evidence ``[V, C]`` (an action constraint, see
    :func:`constraint_evidence`); with it the scores are p(target in kept | evidence, var = c, constraint)
    and, if ``lookahead``, times :func:`constraint_likelihood`, i.e. proportional (over c) to
    p(target in kept, constraint | evidence, var = c).

    Two paths give the same scores (tests/test_one_pass_scores.py). If the circuit has
    ``candidate_marginals`` (TorchCircuit) and ``one_pass`` is set, every candidate is scored by one
    pass over the distinct evidence rows (:func:`one_pass_scores`) and ``dists`` is None: the planner
    asks for the chosen candidate's distribution once it is known. Otherwise (the pyjuice adapter, the
    oracle tables, or ``one_pass=False``: the reference) each candidate is its own evidence row,
    ``B * num_candidates`` rows, and ``dists`` ``[B, nc, nb]`` holds every candidate's target
    distribution p(target | evidence, var = c) over its ``nb = keep.size(-1)`` levels, of which the
    planner reuses the chosen one as the next dimension's p(target | s, a^{<i+1}).
    """
    if not isinstance(target, CorrectionTarget):
        target = CorrectionTarget.value(int(target), keep.size(-1))
    if one_pass and hasattr(circuit, "candidate_marginals"):
        scores, dists = one_pass_scores(circuit, x, missing, var, num_candidates, target, keep, soft), None
    else:
        scores, dists = _per_candidate_scores(circuit, x, missing, var, num_candidates, target, keep, soft)
    if soft is not None and lookahead:
        scores = scores * constraint_likelihood(circuit, x, missing, var, num_candidates, soft)
    return scores, dists


class PerCandidate:
    """A circuit seen without its ``candidate_marginals``, so that :func:`candidate_scores` takes the
    per-candidate (reference) path everywhere, the planner included: how tests and
    benchmarks/mujoco_planning_speed.py compare the two paths side by side."""

    def __init__(self, circuit):
        self.circuit = circuit

    def __getattr__(self, name: str):
        if name == "candidate_marginals":
            raise AttributeError(name)
        return getattr(self.circuit, name)


def _per_candidate_scores(
    circuit, x, missing, var, num_candidates, target: CorrectionTarget, keep, soft
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: one evidence row per (row, candidate), ``(scores, dists)``."""
    b, nb = x.size(0), keep.size(-1)
    cand = torch.arange(num_candidates, device=x.device)
    xb = x.repeat_interleave(num_candidates, dim=0)
    mb = missing.repeat_interleave(num_candidates, dim=0)
    xb[:, var] = cand.repeat(b)
    mb[:, var] = False
    dists = target.distribution(circuit, xb, mb, soft).view(b, num_candidates, nb)
    scores = (dists * keep[:, None, :].to(dists.dtype)).sum(dim=-1)
    return scores, dists


def one_pass_scores(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    var: int,
    num_candidates: int,
    target: CorrectionTarget,
    keep: torch.Tensor,
    soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`candidate_scores`' scores ``[B, nc]`` (before the constraint factor) from
    ``circuit.candidate_marginals``, i.e. without one evidence row per candidate.

    The derivative of the circuit with respect to var's evidence row is p(var = c, e) for every c at
    once (TorchCircuit.candidate_marginals). Writing the kept levels as soft evidence on the value
    variable V (weight ``keep_j`` on bin j) makes it p(V in kept, var = c, e); weight 1 on V's real bins
    makes it p(V real, var = c, e). Their ratio is the ``value`` target's score
    sum_j keep_j p(V = j | e, var = c, V real): two evidence rows per distinct row, one upward and one
    downward pass, however many candidates.

    The ``return`` target G = r + gamma V: for each reward bin k, with r = k observed, the same ratio
    with weights keep_k[j] = keep[level(k, j)] gives sum_j keep_k[j] p(V = j | e, var = c, r = k), and
    p(r = k, var = c, e), normalised over the real reward bins, gives p(r = k | e, var = c): the score
    is their mixture. Normalising V per reward bin and r over its real bins is exactly what
    :meth:`CorrectionTarget.distribution` does, so both paths agree.

    Precision: the circuit returns gradients of log Z (ratios to the row's own p(e)), never log Z, whose
    float32 rounding (eps * |log Z|) would not cancel between rows. The ratio of two rows' Z comes from
    the derivative with respect to the reweighted variable in one of them, Z_w / Z_d =
    sum_j w_j dZ_d/dE[V, j] / sum_j d_j dZ_d/dE[V, j] (Z is linear in V's row), and likewise
    p(r = k | e) from a row with r unobserved.

    ``soft`` multiplies into every weighting (V's and r's own weights count, as in the reference's
    conditionals). A candidate of probability zero scores 0 (the reference gives NaN). A row whose pass
    has no answer (NaN: zero-probability evidence, or a sum node the evidence makes exactly zero,
    neither possible with EM's pseudocount) is scored by the per-candidate path instead.
    """
    dev = x.device
    x = torch.where(missing, torch.zeros_like(x), x)
    x[:, var] = 0
    missing = missing.clone()
    missing[:, var] = True
    keep = keep.double().to(dev).expand(x.size(0), -1)
    first, inverse = unique_rows(torch.cat([x.double(), missing.double(), keep], dim=1))
    xu, mu, ku = x[first], missing[first], keep[first]
    u, cats, vv, vb = len(first), circuit.num_cats, target.value_var, target.value_bins
    base = torch.ones(circuit.num_vars, cats, dtype=torch.float64, device=dev)
    if soft is not None:
        base.copy_(soft)
    base[var] = 1.0  # var's own row: its gradient is then p(var = c | e), in [0, 1]
    real = torch.zeros(cats, dtype=torch.float64, device=dev)
    real[:vb] = 1.0
    real = real * base[vv]
    if target.reward_var is None:
        kept = torch.zeros(u, cats, dtype=torch.float64, device=dev)
        kept[:, :vb] = ku
        kept = kept * base[vv]
        weights = torch.stack([kept, real.expand(u, -1)], dim=1)  # [u, 2, C]
        grads = _weighted_gradients(circuit, xu, mu, [var, vv], vv, weights, base)  # [u, 2, 2, C]
        scores = _kept_ratio(grads[:, 0], grads[:, 1], kept, real)
    else:
        r, nr = target.reward_var, target.reward_bins
        kept = torch.zeros(u, nr, cats, dtype=torch.float64, device=dev)
        kept[:, :, :vb] = ku[:, target.levels.to(dev)].view(u, nr, vb)
        kept = kept * base[vv]
        rows = [kept, real.expand(u, nr, -1)]
        if not torch.equal(real, base[vv]):  # V has categories outside its real bins (the pad)
            rows.append(base[vv].expand(u, nr, -1))
        xr, mr = xu.repeat_interleave(nr, dim=0), mu.repeat_interleave(nr, dim=0)
        xr[:, r] = torch.arange(nr, device=dev).repeat(u)
        mr[:, r] = False
        grads = _weighted_gradients(circuit, xr, mr, [var, vv], vv, torch.stack(rows, 2).flatten(0, 1), base)
        grads = grads.view(u, nr, len(rows), 2, cats)
        ratio = _kept_ratio(grads[:, :, 0], grads[:, :, 1], kept, real)  # [u, nr, C]
        # p(r = k, var = c, e) / p(e) = dZ/dE[r, k] / Z (r unobserved) * p(var = c | e, r = k).
        free = circuit.candidate_marginals(xu, mu, [r], soft_evidence=base.expand(u, -1, -1))
        p_rk = free.double().to(dev)[:, 0, :nr] * base[r, :nr]
        joint = p_rk[:, :, None] * grads[:, :, -1, 0]
        total = joint.sum(dim=1, keepdim=True)
        p_r = torch.where(total == 0, torch.zeros_like(joint), joint / total)  # NaN stays: no answer
        scores = (p_r * ratio).sum(dim=1)
    scores = scores[:, :num_candidates]
    failed = torch.isnan(scores).any(dim=1)
    if bool(failed.any()):
        rows = failed.nonzero().squeeze(1)
        fallback, _ = _per_candidate_scores(
            circuit, xu[rows], mu[rows], var, num_candidates, target, ku[rows], soft
        )
        scores[rows] = torch.nan_to_num(fallback, nan=0.0)
    return scores[inverse]


def _weighted_gradients(
    circuit,
    x: torch.Tensor,
    missing: torch.Tensor,
    targets: list[int],
    weighted: int,
    weights: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """``circuit.candidate_marginals`` ``[n, J, T, C]`` (float64) for each of J weightings ``weights``
    ``[n, J, C]`` of variable ``weighted``, the other missing variables weighted by ``base`` ``[V, C]``;
    in chunks of at most :data:`MAX_QUERY_ROWS` evidence rows."""
    n, j = weights.shape[:2]
    xs, ms = x.repeat_interleave(j, dim=0), missing.repeat_interleave(j, dim=0)
    flat = weights.flatten(0, 1)
    outs = []
    for lo in range(0, n * j, MAX_QUERY_ROWS):
        hi = min(lo + MAX_QUERY_ROWS, n * j)
        soft = base.expand(hi - lo, -1, -1).clone()
        soft[:, weighted] = flat[lo:hi]
        out = circuit.candidate_marginals(xs[lo:hi], ms[lo:hi], targets, soft_evidence=soft)
        outs.append(out.double().to(x.device))
    return torch.cat(outs).view(n, j, len(targets), -1)


def _kept_ratio(
    g_kept: torch.Tensor, g_real: torch.Tensor, kept: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """p(V in kept, var = c, e) / p(V real, var = c, e) ``[..., C]`` from the two rows' gradients
    ``[..., 2, C]`` (target 0: var, target 1: V) and V's weights in them, ``kept`` ``[..., C]`` and
    ``real`` ``[C]``. 0 where nothing is kept or the candidate has probability zero."""
    g_v = g_real[..., 1, :]
    z_ratio = (kept * g_v).sum(dim=-1) / (real * g_v).sum(dim=-1)  # Z_kept / Z_real
    # p(var = c | e) in each row (var's row is all ones, so each sums to 1: dividing by the computed
    # sum cancels the rounding the two downward passes share per row).
    p_kept = g_kept[..., 0, :] / g_kept[..., 0, :].sum(dim=-1, keepdim=True)
    p_real = g_real[..., 0, :] / g_real[..., 0, :].sum(dim=-1, keepdim=True)
    out = z_ratio[..., None] * p_kept / p_real
    dead = (z_ratio[..., None] == 0) | (p_real == 0)
    return torch.where(dead, torch.zeros_like(out), out)


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
    form: str = "survival",
) -> torch.Tensor:
    """m-Trifle's value of a plan: s_t and planned actions a_0..a_{H-1} (tokens) -> expected return.

    ``obs`` [B, obs_dim] and ``actions`` [B, H, act_dim] are tokens, H <= window; the result is [B]
    (float64). Intermediate states, and actions after the plan, are marginalised exactly. ``V_h`` is TT's
    value token, the discounted return after r_h (docs/paper.md#multi-step-value, Algorithm 3). A reward or value in the pad
    category (the episode ended) counts as 0. Rows with the same state and plan are queried once.

    ``form="survival"`` (default, ``planner.multistep_value``)::

        sum_{h<H} γ^h S_h E[r_h | s_0, a_0..a_h] + γ^H S_{H-1} E[V_{H-1} | s_0, a_0..a_{H-1}],
        S_0 = 1,  S_h = prod_{k=1..h} P(a_k != pad | s_0, a_0..a_{k-1})

    Every planned action is hard evidence, and S_h is the probability that the episode still runs at
    step h (in the circuit's data every variable after a terminal is pad, so a_k is pad iff the episode
    ended before step k). An episode that ended contributes nothing afterwards, as in the environment.
    H queries: query h conditions on s_0, a_0..a_h and asks for r_h, V_h (h = H-1) and the first action
    variable of step h+1 (h < H-1), whose pad probability gives S_{h+1} / S_h.

    Zero-probability evidence (0/0), never NaN: a row is not queried at step h once S_h = 0 (the data
    never continues; its remaining terms carry weight 0 and count 0). If the query of a row with S_h > 0
    has no answer (the circuit returns no distribution: the data continues after a_0..a_{h-1} but never
    with the planned a_h), a_h is replaced, from step h on, by soft evidence "a_h is not pad", i.e. the
    data's own action at that step; if even that has no answer, the terms from h on count 0. With a
    trained circuit neither happens (EM's pseudocount makes every probability positive).

    ``form="soft_pad"`` (the former semantics, kept for measurement): one query, with a_0 hard and each
    later a_h soft evidence "a_h = planned or pad", and E[V^m] = sum_h γ^h E[r_h] + γ^H E[V_{H-1}] under
    that posterior. It weighs "the episode ended before h" against "the data took a_h", so an action
    the data rarely takes is explained by the episode having ended: with negative rewards (Taxi) an
    odd or illegal plan looks like a free 0.
    """
    if form not in MULTISTEP_VALUES:
        raise ValueError(f"unknown multi-step value form {form!r}; expected one of {MULTISTEP_VALUES}")
    b, horizon, act_dim = actions.shape
    obs_dim = obs.size(1)
    layout = WindowLayout(obs_dim, act_dim, window, circuit.num_cats)
    if not 1 <= horizon <= window:
        raise ValueError(f"expected 1 <= plan length <= window={window}, got {horizon}")
    # Rows with the same state and plan have the same value: query each distinct one once.
    first, inverse = unique_rows(torch.cat([obs.long(), actions.reshape(b, -1).long()], dim=1))
    obs, actions = obs[first].long(), actions[first].long()
    r_vals = bin_values(discretizer.columns[-2].values, layout.num_cats).to(obs.device)
    v_vals = bin_values(discretizer.columns[-1].values, layout.num_cats).to(obs.device)
    value = _soft_pad_value if form == "soft_pad" else _survival_value
    return value(circuit, layout, obs, actions, discount, r_vals, v_vals)[inverse]


def _plan_evidence(
    layout: WindowLayout, obs: torch.Tensor, actions: torch.Tensor, upto: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, missing)``: s_0 and the planned actions a_0..a_upto observed, everything else missing."""
    x, missing = layout.evidence(obs)
    for h in range(upto + 1):
        for i in range(layout.act_dim):
            x[:, layout.act_var(h, i)] = actions[:, h, i]
            missing[:, layout.act_var(h, i)] = False
    return x, missing


def _soft_pad_value(circuit, layout, obs, actions, discount, r_vals, v_vals) -> torch.Tensor:
    """``form="soft_pad"``: one query, a_0 hard, later a_h soft "planned or pad"."""
    b, horizon, act_dim = actions.shape
    x, missing = _plan_evidence(layout, obs, actions, 0)
    soft = None
    if horizon > 1:
        soft = torch.ones(b, layout.num_vars, layout.num_cats, dtype=torch.float32, device=x.device)
        for h in range(1, horizon):
            for i in range(act_dim):
                row = torch.zeros(b, layout.num_cats, device=x.device)
                row.scatter_(1, actions[:, h, i : i + 1], 1.0)
                row[:, layout.pad] = 1.0
                soft[:, layout.act_var(h, i)] = row
    targets = [layout.reward_var(h) for h in range(horizon)] + [layout.value_var(horizon - 1)]
    probs = conditional_unique(circuit, x, missing, targets, soft, dedup=False)  # [b, H + 1, C]
    weights = discount ** torch.arange(horizon + 1, dtype=torch.float64, device=x.device)
    rewards = probs[:, :horizon] @ r_vals
    value = probs[:, horizon] @ v_vals
    return rewards @ weights[:horizon] + weights[horizon] * value


def _is_distribution(probs: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether every target's row of a conditional ``[B, T, C]`` is a distribution (evidence of
    probability zero gives 0/0: NaN, or zeros, depending on the circuit)."""
    return torch.isfinite(probs).all(dim=-1).all(dim=-1) & (probs.sum(dim=-1) > 0.5).all(dim=-1)


def _plan_query(
    circuit,
    layout: WindowLayout,
    obs: torch.Tensor,
    actions: torch.Tensor,
    known: torch.Tensor,
    upto: int,
    targets: list[int],
) -> torch.Tensor:
    """``[B, T, C]``: targets given s_0 and a_0..a_upto, where a_h is hard evidence if ``known[:, h]``,
    else soft evidence "a_h is not pad" on its first dimension (the data's own action at step h)."""
    x, missing = _plan_evidence(layout, obs, actions, upto)
    out = torch.zeros(len(obs), len(targets), layout.num_cats, dtype=torch.float64, device=obs.device)
    loose = ~known[:, : upto + 1].all(dim=1)
    tight = ~loose
    if tight.any():
        out[tight] = conditional_unique(circuit, x[tight], missing[tight], targets)
    if loose.any():
        free = ~known[loose, : upto + 1]
        xl, ml = x[loose], missing[loose]
        soft = torch.ones(len(xl), layout.num_vars, layout.num_cats, dtype=torch.float64, device=x.device)
        for h in range(upto + 1):
            vars_h = [layout.act_var(h, i) for i in range(layout.act_dim)]
            rows = free[:, h].nonzero().squeeze(1)
            ml[rows[:, None], torch.tensor(vars_h, device=x.device)[None, :]] = True
            soft[rows, layout.act_var(h, 0), layout.pad] = 0.0
        out[loose] = conditional_unique(circuit, xl, ml, targets, soft)
    return out


def _survival_value(circuit, layout, obs, actions, discount, r_vals, v_vals) -> torch.Tensor:
    """``form="survival"``: H queries with hard actions, weighted by the survival probabilities S_h."""
    b, horizon, _ = actions.shape
    dev = obs.device
    survival = torch.ones(b, dtype=torch.float64, device=dev)  # S_h
    known = torch.ones(b, horizon, dtype=torch.bool, device=dev)  # a_h is hard evidence
    total = torch.zeros(b, dtype=torch.float64, device=dev)
    for h in range(horizon):
        last = h == horizon - 1
        targets = [layout.reward_var(h), layout.value_var(h) if last else layout.act_var(h + 1, 0)]
        probs = torch.zeros(b, 2, layout.num_cats, dtype=torch.float64, device=dev)
        rows = (survival > 0).nonzero().squeeze(1)
        if len(rows):
            probs[rows] = _plan_query(circuit, layout, obs[rows], actions[rows], known[rows], h, targets)
        failed = rows[~_is_distribution(probs[rows])]
        if len(failed):
            # The data continues but never with the planned a_h: use the data's own action at step h.
            known[failed, h] = False
            probs[failed] = _plan_query(
                circuit, layout, obs[failed], actions[failed], known[failed], h, targets
            )
            dead = failed[~_is_distribution(probs[failed])]
            survival[dead], probs[dead] = 0.0, 0.0
        term = discount**h * (probs[:, 0] @ r_vals)
        if last:
            term = term + discount**horizon * (probs[:, 1] @ v_vals)
        total = total + survival * term
        if not last:
            survival = survival * (1.0 - probs[:, 1, layout.pad]).clamp(0.0, 1.0)
    return total
