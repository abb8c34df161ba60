"""Action constraints: config parsing, allowed bins, and the circuit's constrained proposal scores
checked against brute-force enumeration of a tiny circuit's joint distribution.

Setting: one observation column (2 states), two action columns (3 bins each), a 2-bin reward and a
3-bin value, one transition (K = 1): 5 variables with 3 categories, 3^5 assignments. The constraint
allows bins {0, 2} of the *second* action dimension, so scoring the first dimension must anticipate it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.errors import ConfigError
from trifle.models.circuits import TorchCircuit, build_hclt, em_step
from trifle.planning.circuit_queries import (
    WindowLayout,
    candidate_scores,
    constraint_evidence,
    constraint_likelihood,
    kept_bins,
    value_distribution,
)
from trifle.planning.constraints import Bound, allowed_bins, parse_constraint, violations

OBS, ACT, CATS = 1, 2, 3
LAYOUT = WindowLayout(OBS, ACT, 1, CATS)
S, A0, A1, R, V = range(5)
ALLOWED = {1: np.array([True, False, True])}


def _windows(n: int, seed: int) -> torch.Tensor:
    """Correlated rows: the value depends on both actions, the second action on the first."""
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        s = int(g.integers(2))
        a0 = int((s + g.integers(2)) % 3)
        a1 = int((a0 + g.integers(3) * (g.random() < 0.5)) % 3)
        r = int(a1 == 1 or g.random() < 0.2)
        v = int(min(2, (a0 == 2) + (a1 == 1) + g.integers(2)))
        rows.append([s, a0, a1, r, v])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def circuit() -> TorchCircuit:
    data = _windows(500, 0)
    c = TorchCircuit.from_nodes(build_hclt(data, num_cats=CATS, num_latents=3, seed=2), dtype=torch.float64)
    for _ in range(4):
        em_step(c, [data], pseudocount=0.5)
    return c


@pytest.fixture(scope="module")
def joint(circuit) -> tuple[torch.Tensor, torch.Tensor]:
    allx = torch.tensor(list(itertools.product(range(CATS), repeat=5)))
    return allx, circuit.log_prob(allx).exp()


def _mass(allx, p, **fixed) -> torch.Tensor:
    """Total probability of the assignments matching ``fixed`` (var name -> value or set of values)."""
    w = torch.ones(len(allx), dtype=torch.bool)
    for name, value in fixed.items():
        col = allx[:, {"s": S, "a0": A0, "a1": A1, "r": R, "v": V}[name]]
        w &= torch.isin(col, torch.as_tensor(list(value) if isinstance(value, set) else [value]))
    return (p * w).sum()


def _evidence(states: list[int], a0: list[int | None]):
    x, missing = LAYOUT.evidence(torch.tensor(states)[:, None])
    for b, a in enumerate(a0):
        if a is not None:
            x[b, A0], missing[b, A0] = a, False
    return x, missing


def test_constrained_value_distribution_matches_enumeration(circuit, joint):
    allx, p = joint
    soft = constraint_evidence(LAYOUT, {k: torch.as_tensor(v) for k, v in ALLOWED.items()})
    x, missing = _evidence([0, 1, 1], [None, None, 2])
    got = value_distribution(circuit, x, missing, V, 3, soft)
    for b, (s, a0) in enumerate([(0, None), (1, None), (1, 2)]):
        ev = {"s": s, "a1": {0, 2}} | ({} if a0 is None else {"a0": a0})
        want = torch.stack([_mass(allx, p, v=j, **ev) for j in range(3)])
        torch.testing.assert_close(got[b], want / want.sum(), atol=1e-10, rtol=0)


def test_first_dimension_anticipates_the_constraint_on_the_second(circuit, joint):
    """Scores of a^0 = c are proportional to p(V in kept, a^1 allowed | s, a^0 = c)."""
    allx, p = joint
    soft = constraint_evidence(LAYOUT, {k: torch.as_tensor(v) for k, v in ALLOWED.items()})
    x, missing = _evidence([0, 1], [None, None])
    probs = value_distribution(circuit, x, missing, V, 3, soft)
    keep = kept_bins(probs, 0.4, "strict")
    scores, _ = candidate_scores(circuit, x, missing, A0, 3, V, keep, soft)
    for b, s in enumerate([0, 1]):
        kept = {j for j in range(3) if keep[b, j]}
        want = torch.stack([_mass(allx, p, s=s, a0=c, a1={0, 2}, v=kept) for c in range(3)])
        want = want / _mass(allx, p, s=s) / torch.stack([_mass(allx, p, s=s, a0=c) for c in range(3)])
        torch.testing.assert_close(scores[b] / scores[b].sum(), want / want.sum(), atol=1e-9, rtol=0)
    # Without the constraint the scores differ: the constraint changes the first choice.
    plain, _ = candidate_scores(circuit, x, missing, A0, 3, V, keep)
    assert not torch.allclose(plain[0] / plain[0].sum(), scores[0] / scores[0].sum(), atol=1e-3)


@pytest.mark.parametrize("one_pass", [True, False])
def test_without_lookahead_the_scores_are_the_constrained_value_only(circuit, joint, one_pass):
    """``lookahead=False`` (trifle-s-safe's default): a^0 = c scores p(V in kept | s, a^0 = c, a^1 allowed),
    the GPT's prior left as it is; the constraint still changes the scores through the value."""
    allx, p = joint
    soft = constraint_evidence(LAYOUT, {k: torch.as_tensor(v) for k, v in ALLOWED.items()})
    x, missing = _evidence([0, 1], [None, None])
    keep = kept_bins(value_distribution(circuit, x, missing, V, 3, soft), 0.4, "strict")
    scores, _ = candidate_scores(
        circuit, x, missing, A0, 3, V, keep, soft, lookahead=False, one_pass=one_pass
    )
    with_lookahead, _ = candidate_scores(circuit, x, missing, A0, 3, V, keep, soft, one_pass=one_pass)
    plain, _ = candidate_scores(circuit, x, missing, A0, 3, V, keep, one_pass=one_pass)
    for b, s in enumerate([0, 1]):
        kept = {j for j in range(3) if keep[b, j]}
        want = torch.stack([_mass(allx, p, s=s, a0=c, a1={0, 2}, v=kept) for c in range(3)])
        want = want / torch.stack([_mass(allx, p, s=s, a0=c, a1={0, 2}) for c in range(3)])
        torch.testing.assert_close(scores[b], want, atol=1e-9, rtol=0)  # probabilities, not just ratios
    assert not torch.allclose(
        scores / scores.sum(1, keepdim=True), plain / plain.sum(1, keepdim=True), atol=1e-3
    )
    assert not torch.allclose(
        scores / scores.sum(1, keepdim=True), with_lookahead / with_lookahead.sum(1, keepdim=True), atol=1e-3
    )


def test_constrained_dimension_gets_zero_on_disallowed_bins(circuit, joint):
    allx, p = joint
    soft = constraint_evidence(LAYOUT, {k: torch.as_tensor(v) for k, v in ALLOWED.items()})
    x, missing = _evidence([1], [0])
    ratio = constraint_likelihood(circuit, x, missing, A1, 3, soft)
    assert ratio[0, 1] == 0 and bool((ratio[0, [0, 2]] > 0).all())
    # p(C | s, a0, a1 = c) is the indicator of the allowed set: the ratio is constant over allowed c.
    torch.testing.assert_close(ratio[0, 0], ratio[0, 2])
    keep = torch.tensor([[False, True, True]])
    scores, _ = candidate_scores(circuit, x, missing, A1, 3, V, keep, soft)
    want = torch.stack([_mass(allx, p, s=1, a0=0, a1=c, v={1, 2}) for c in range(3)])
    want = want / torch.stack([_mass(allx, p, s=1, a0=0, a1=c) for c in range(3)]) * torch.tensor([1, 0, 1])
    torch.testing.assert_close(scores[0] / scores[0].sum(), want / want.sum(), atol=1e-9, rtol=0)


def test_constraint_config_is_validated():
    assert parse_constraint([{"dim": 2, "high": 0.5}], act_dim=3) == [Bound(2, None, 0.5)]
    assert parse_constraint([]) == [] and parse_constraint(None) == []
    bad = [
        ([{"dim": 3, "high": 0.5}], "3 dimensions"),
        ([{"dim": -1, "high": 0.5}], "dim"),
        ([{"dim": 0}], "expected a bound"),
        ([{"dim": 0, "low": 1.0, "high": 0.0}], "above high"),
        ([{"dim": 0, "high": 0.5}, {"dim": 0, "low": 0.0}], "twice"),
        ([{"dim": 0, "max": 0.5}], "unknown keys"),
        ([{"dim": 0, "high": "x"}], "finite number"),
        ("dim=0", "list"),
    ]
    for entries, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_constraint(entries, act_dim=3)


def test_allowed_bins_are_those_whose_decoded_value_satisfies_the_bound():
    column = ColumnBins("quantile", np.array([0.0, 0.45, 0.55]), np.array([-0.5, 0.2, 0.5, 0.9]))
    obs = ColumnBins("categorical", np.zeros(0), np.array([0.0, 1.0]))
    disc = Discretizer([obs, column], ["obs0", "act0"])
    allowed = allowed_bins(disc, 1, [Bound(0, None, 0.5)])
    assert allowed[0].tolist() == [True, True, True, False]
    with pytest.raises(ConfigError, match="no bin"):
        allowed_bins(disc, 1, [Bound(0, 2.0, None)])
    acts = np.array([[0.5], [0.50001], [-3.0]])
    assert violations(acts, [Bound(0, None, 0.5)]).tolist() == [False, True, False]


@pytest.mark.gpu
def test_constrained_scores_agree_between_the_pyjuice_and_torch_backends_on_cuda(circuit, tmp_path):
    """The planner's constrained queries (shared soft evidence, broadcast over rows) through pyjuice."""
    from trifle.models.circuits import load_circuit, save_circuit

    path = tmp_path / "c.jpc"
    save_circuit(circuit, path)
    torch_c = load_circuit(path, backend="torch", device="cuda")
    pyjuice_c = load_circuit(path, backend="pyjuice", device="cuda")
    soft = constraint_evidence(LAYOUT, {k: torch.as_tensor(v) for k, v in ALLOWED.items()}).cuda()
    x, missing = _evidence([0, 1, 1, 0], [None, 2, 0, 1])
    x, missing = x.cuda(), missing.cuda()
    keep = kept_bins(value_distribution(torch_c, x, missing, V, 3, soft), 0.4, "strict")
    assert torch.allclose(
        value_distribution(pyjuice_c, x, missing, V, 3, soft),
        value_distribution(torch_c, x, missing, V, 3, soft),
        atol=1e-4,
    )
    want, _ = candidate_scores(torch_c, x, missing, A1, 3, V, keep, soft)
    got, _ = candidate_scores(pyjuice_c, x, missing, A1, 3, V, keep, soft)
    assert torch.allclose(got, want, atol=1e-4)
