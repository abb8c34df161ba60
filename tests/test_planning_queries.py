"""Trifle's circuit queries against brute-force enumeration of a tiny circuit's joint distribution.

Setting: one observation column (2 states), one action column (3 actions), a categorical reward
(values -1, 5), a 3-bin value column, vocabulary 3, and a K = 2 window, so the circuit has 8 variables
with 4 categories each (category 3 is the "episode over" pad). A small HCLT fitted by a few EM steps
on random, correlated windows plays the true joint; every query is recomputed by summing its
probabilities over all 4^8 assignments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trifle.models.circuits import TorchCircuit
from trifle.planning.circuit_queries import (
    WindowLayout,
    candidate_scores,
    expected_multistep_value,
    fixed_kept_levels,
    kept_bins,
    value_distribution,
)

from circuit_support.tiny_task import (
    ACT,
    CATS,
    GAMMA,
    OBS,
    PAD,
    REWARDS,
    VALUES,
    D,
    K,
    enumerated_joint,
    fitted_circuit,
)
from circuit_support.tiny_task import discretizer as _discretizer

NUM_BINS = [2, 3, 2, 3]  # obs, action, reward, value
LAYOUT = WindowLayout(OBS, ACT, K, CATS)


@pytest.fixture(scope="module")
def circuit() -> TorchCircuit:
    return fitted_circuit()


@pytest.fixture(scope="module")
def joint(circuit) -> tuple[torch.Tensor, torch.Tensor]:
    return enumerated_joint(circuit)


def _brute_value(allx, p, weight: torch.Tensor, var: int) -> torch.Tensor:
    """p(V = j | evidence) over the value column's real bins, evidence given as per-assignment weights."""
    mass = torch.stack([(p * weight * (allx[:, var] == j)).sum() for j in range(NUM_BINS[3])])
    return mass / mass.sum()


def _hard(allx, x_row: torch.Tensor, miss_row: torch.Tensor) -> torch.Tensor:
    w = torch.ones(len(allx), dtype=torch.float64)
    for v in range(K * D):
        if not miss_row[v]:
            w = w * (allx[:, v] == x_row[v])
    return w


def _evidence(obs: list[int], act: list[int | None]):
    x, missing = LAYOUT.evidence(torch.tensor(obs)[:, None])
    for b, a in enumerate(act):
        if a is not None:
            x[b, LAYOUT.act_var(0, 0)], missing[b, LAYOUT.act_var(0, 0)] = a, False
    return x, missing


def test_joint_is_a_distribution(joint):
    assert abs(float(joint[1].sum()) - 1.0) < 1e-9


def test_value_distribution_matches_enumeration(circuit, joint):
    allx, p = joint
    # Duplicate rows exercise the "one query per distinct evidence row" path.
    x, missing = _evidence([0, 1, 0, 1, 0], [None, None, 2, 1, None])
    got = value_distribution(circuit, x, missing, LAYOUT.value_var(0), NUM_BINS[3])
    for b in range(len(x)):
        want = _brute_value(allx, p, _hard(allx, x[b], missing[b]), LAYOUT.value_var(0))
        torch.testing.assert_close(got[b], want, atol=1e-10, rtol=0)
    torch.testing.assert_close(got[0], got[4])
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the state matters in this circuit


@pytest.mark.parametrize(
    ("top_ratio", "expected", "strict", "mass"),
    [
        (1.0, [True, True, True], [True, True, True], [1.0, 1.0, 1.0]),
        (0.5, [True, True, True], [False, True, True], [0.0, 1.0, 1.0]),
        (0.25, [False, True, True], [False, False, True], [0.0, 0.0, 1.0]),
        # q is the top bin: strict keeps it alone, mass keeps 0.8 of its 0.25 (= 0.2 of the total).
        (0.2, [False, False, True], [False, False, True], [0.0, 0.0, 0.8]),
        (0.6, [True, True, True], [False, True, True], [0.2, 1.0, 1.0]),
    ],
)
def test_threshold_keeps_the_top_mass_by_hand(top_ratio, expected, strict, mass):
    """p = (0.5, 0.25, 0.25) has CDF (0.5, 0.75, 1): the released code keeps the bins with
    CDF >= 1 - top_ratio; the strict rule keeps those strictly above the first of them; the mass rule
    (the default) weights them so that exactly top_ratio of the mass is kept."""
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    assert kept_bins(probs, top_ratio, "cdf")[0].tolist() == expected
    assert kept_bins(probs, top_ratio, "strict")[0].tolist() == strict
    weights = kept_bins(probs, top_ratio)[0]  # the default
    torch.testing.assert_close(weights, torch.tensor(mass, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((probs[0] * weights).sum()) == pytest.approx(top_ratio)


def test_threshold_matches_a_quantile_loop(circuit):
    x, missing = _evidence([0, 1], [None, 0])
    probs = value_distribution(circuit, x, missing, LAYOUT.value_var(0), NUM_BINS[3])
    for top_ratio in (0.1, 0.2, 0.45, 0.8):
        got = kept_bins(probs, top_ratio, "cdf")
        for b in range(2):
            running, want = 0.0, []
            for q in probs[b].tolist():
                running += q
                want.append(running >= 1 - top_ratio - 1e-12)
            assert got[b].tolist() == want
            assert float(probs[b][got[b]].sum()) >= top_ratio - 1e-12


def test_candidate_scores_match_enumeration(circuit, joint):
    allx, p = joint
    x, missing = _evidence([0, 1, 1], [None, None, None])
    probs = value_distribution(circuit, x, missing, LAYOUT.value_var(0), NUM_BINS[3])
    keep = kept_bins(probs, 0.3, "strict")
    args = (circuit, x, missing, LAYOUT.act_var(0, 0), 3, LAYOUT.value_var(0), keep)
    scores, dists = candidate_scores(*args, one_pass=False)  # the per-candidate path returns every dist
    assert scores.shape == (3, 3) and dists.shape == (3, 3, 3)
    fast, no_dists = candidate_scores(*args)  # the one-pass path leaves them to the chosen candidate
    assert no_dists is None
    torch.testing.assert_close(fast, scores, atol=1e-10, rtol=0)
    for b in range(3):
        for c in range(3):
            weight = _hard(allx, x[b], missing[b]) * (allx[:, LAYOUT.act_var(0, 0)] == c)
            want = _brute_value(allx, p, weight, LAYOUT.value_var(0))
            torch.testing.assert_close(dists[b, c], want, atol=1e-10, rtol=0)
            assert abs(float(scores[b, c]) - float(want[keep[b]].sum())) < 1e-10
    assert float(scores[0].max() - scores[0].min()) > 1e-3  # candidates are told apart


def test_fixed_threshold_is_the_papers_bin_index_on_equal_mass_bins():
    """100 bins of equal marginal mass (the quantile discretizer's value column): quantile 0.9 keeps bins
    90..99, the paper's fixed v = 90 of 0..99, and 0.3 keeps 30..99."""
    uniform = torch.full((100,), 0.01, dtype=torch.float64)
    for q, first in ((0.9, 90), (0.8, 80), (0.3, 30)):
        assert fixed_kept_levels(uniform, q).nonzero().flatten().tolist() == list(range(first, 100))
    # Uneven mass: a level is kept when the mass strictly below it reaches q.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    assert fixed_kept_levels(probs, 0.5).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert fixed_kept_levels(probs, 0.85).tolist() == [0.0, 0.0, 0.0, 1.0]
    # The top level holds more than 1 - q: keep it alone rather than nothing.
    assert fixed_kept_levels(torch.tensor([0.2, 0.8], dtype=torch.float64), 0.5).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="quantile"):
        fixed_kept_levels(probs, 1.0)


def test_fixed_threshold_proposal_scores_against_enumeration(circuit, joint):
    """A fixed-threshold proposal keeps the same levels in every state, those at or above the marginal
    quantile of p(V) (the enumerated joint's), and scores each action by p(V in them | s, a)."""
    from trifle.planning.planners import CircuitProposal

    allx, p = joint
    marginal = _brute_value(allx, p, torch.ones(len(allx), dtype=torch.float64), LAYOUT.value_var(0))
    q = float(marginal[0]) - 1e-6  # just under the lowest bin's mass: keep bins 1 and 2
    want_keep = fixed_kept_levels(marginal, q)
    assert want_keep.tolist() == [0.0, 1.0, 1.0]
    obs = torch.tensor([[0], [1]])
    proposal = CircuitProposal(circuit, LAYOUT, obs, 0.2, NUM_BINS[3], fixed_threshold=q)
    proposal.begin(torch.arange(2))
    torch.testing.assert_close(proposal.fixed_keep()[0], want_keep)
    logp = torch.zeros(2, 3, dtype=torch.float64)
    got = proposal.logits(0, logp)
    x, missing = _evidence([0, 1], [None, None])
    for b in range(2):
        for c in range(3):
            weight = _hard(allx, x[b], missing[b]) * (allx[:, LAYOUT.act_var(0, 0)] == c)
            want = _brute_value(allx, p, weight, LAYOUT.value_var(0))
            assert abs(float(got[b, c].exp()) - float(want[1:].sum())) < 1e-10


def test_candidate_scores_condition_on_earlier_choices(circuit, joint):
    """Scoring a later variable (the second transition's action) given an earlier action as evidence."""
    allx, p = joint
    x, missing = _evidence([1, 0], [2, 0])
    target = LAYOUT.value_var(1)
    keep = torch.tensor([[False, True, True], [True, True, True]])
    scores, _ = candidate_scores(circuit, x, missing, LAYOUT.act_var(1, 0), 3, target, keep)
    for b in range(2):
        for c in range(3):
            weight = _hard(allx, x[b], missing[b]) * (allx[:, LAYOUT.act_var(1, 0)] == c)
            want = _brute_value(allx, p, weight, target)
            assert abs(float(scores[b, c]) - float(want[keep[b]].sum())) < 1e-10


def _brute_multistep(allx, p, obs: int, plan: list[int]) -> float:
    """Σ_h γ^h E[r_h] + γ^H E[V_{H-1}]; a later action may also be the pad; pad rewards/values are 0."""
    weight = (allx[:, LAYOUT.obs_vars(0)[0]] == obs) & (allx[:, LAYOUT.act_var(0, 0)] == plan[0])
    for h in range(1, len(plan)):
        a = allx[:, LAYOUT.act_var(h, 0)]
        weight = weight & ((a == plan[h]) | (a == PAD))
    w = p * weight
    w = w / w.sum()
    reward_of = {j: REWARDS[j] for j in range(2)}
    value_of = {j: VALUES[j] for j in range(3)}
    total = 0.0
    for h in range(len(plan)):
        total += GAMMA**h * sum(
            float(w[allx[:, LAYOUT.reward_var(h)] == j].sum()) * r for j, r in reward_of.items()
        )
    last = LAYOUT.value_var(len(plan) - 1)
    total += GAMMA ** len(plan) * sum(float(w[allx[:, last] == j].sum()) * v for j, v in value_of.items())
    return total


def _brute_survival(allx, p, obs: int, plan: list[int]) -> float:
    """Σ_h γ^h S_h E[r_h | s, a_0..a_h] + γ^H S_{H-1} E[V_{H-1} | s, a_0..a_{H-1}], every planned action
    hard, S_h = Π_{k=1..h} P(a_k != pad | s, a_0..a_{k-1}); pad rewards/values are 0."""
    reward_of = torch.tensor([*REWARDS, 0.0, 0.0], dtype=torch.float64)
    value_of = torch.tensor([*VALUES, 0.0], dtype=torch.float64)
    total, survival = 0.0, 1.0
    for h in range(len(plan)):
        weight = allx[:, LAYOUT.obs_vars(0)[0]] == obs
        for k in range(h + 1):
            weight = weight & (allx[:, LAYOUT.act_var(k, 0)] == plan[k])
        w = p * weight
        w = w / w.sum()
        total += GAMMA**h * survival * float((w * reward_of[allx[:, LAYOUT.reward_var(h)]]).sum())
        if h == len(plan) - 1:
            value = float((w * value_of[allx[:, LAYOUT.value_var(h)]]).sum())
            total += GAMMA ** len(plan) * survival * value
        else:
            survival *= 1.0 - float(w[allx[:, LAYOUT.act_var(h + 1, 0)] == PAD].sum())
    return total


@pytest.mark.parametrize("form", ["soft_pad", "survival"])
def test_expected_multistep_value_matches_enumeration(circuit, joint, form):
    allx, p = joint
    disc = _discretizer()
    brute = _brute_multistep if form == "soft_pad" else _brute_survival
    obs = torch.tensor([[0], [1], [1], [0]])
    for plan_rows in ([[0], [1], [2], [0]], [[0, 1], [2, 2], [1, 0], [0, 1]]):
        actions = torch.tensor(plan_rows)[:, :, None]
        got = expected_multistep_value(
            circuit, obs, actions, window=K, discount=GAMMA, discretizer=disc, form=form
        )
        for b in range(4):
            want = brute(allx, p, int(obs[b, 0]), plan_rows[b])
            assert abs(float(got[b]) - want) < 1e-9, (plan_rows[b], float(got[b]), want)
    assert len(set(np.round(got.numpy(), 6))) == 3  # the plan changes the value (rows 0 and 3 agree)


def test_the_two_multistep_forms_agree_on_one_step_plans_only(circuit):
    disc = _discretizer()
    obs = torch.tensor([[0], [1]])
    for plan, same in (([[[1]], [[2]]]), True), (([[[1], [2]], [[2], [0]]]), False):
        actions = torch.tensor(plan)
        kw = dict(window=K, discount=GAMMA, discretizer=disc)
        a = expected_multistep_value(circuit, obs, actions, form="survival", **kw)
        b = expected_multistep_value(circuit, obs, actions, form="soft_pad", **kw)
        assert torch.allclose(a, b, atol=1e-12, rtol=0) == same
    with pytest.raises(ValueError, match="soft_pad"):
        expected_multistep_value(circuit, obs, actions, form="soft", **kw)


class _AdapterLike:
    """Only the query API the pyjuice adapter offers (float32 results), nothing TorchCircuit-specific."""

    def __init__(self, inner: TorchCircuit):
        self._inner, self.num_vars, self.num_cats = inner, inner.num_vars, inner.num_cats

    def conditional(self, x, missing, target_vars, soft_evidence=None):
        return self._inner.conditional(x, missing, target_vars, soft_evidence=soft_evidence).float()


def test_queries_need_only_the_adapter_api(circuit):
    disc, wrapped = _discretizer(), _AdapterLike(circuit)
    obs, actions = torch.tensor([[1], [0]]), torch.tensor([[[2], [0]], [[1], [1]]])
    x, missing = _evidence([1, 0], [None, None])
    a = expected_multistep_value(wrapped, obs, actions, window=K, discount=GAMMA, discretizer=disc)
    b = expected_multistep_value(circuit, obs, actions, window=K, discount=GAMMA, discretizer=disc)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    va = value_distribution(wrapped, x, missing, LAYOUT.value_var(0), 3)
    torch.testing.assert_close(
        va, value_distribution(circuit, x, missing, LAYOUT.value_var(0), 3), atol=1e-6, rtol=0
    )
