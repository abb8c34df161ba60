"""The one-pass candidate scores (circuit_queries.one_pass_scores, TorchCircuit.candidate_marginals)
against the per-candidate reference path and, where the circuit can be enumerated, brute force.

Both paths must give the same scores: on the tiny enumerable task (tests/circuit_support/tiny_task.py,
K = 2 windows with a pad category), on a randomly initialised HCLT of Gym-MuJoCo's category count with
three action dimensions, for the ``value`` and ``return`` correction targets, with and without an
action constraint's soft evidence, and with duplicate rows; and a trifle-s planner must act the same
with either path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_planning_beam import ACT as BEAM_ACT
from test_planning_beam import OBS as BEAM_OBS
from test_planning_beam import K as BEAM_K
from test_planning_beam import _cfg, _circuit, _rollout, _tiny_gpt, _toy_discretizer

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.models.circuits import TorchCircuit, build_hclt
from trifle.planning.circuit_queries import (
    CorrectionTarget,
    PerCandidate,
    WindowLayout,
    candidate_scores,
    constraint_evidence,
    kept_bins,
)
from trifle.planning.planners import make_planner

from circuit_support import tiny_task as tiny

TINY = WindowLayout(tiny.OBS, tiny.ACT, tiny.K, tiny.CATS)
TARGETS = ("value", "return")


def _target(kind: str, layout: WindowLayout, discretizer: Discretizer, discount: float) -> CorrectionTarget:
    if kind == "return":
        return CorrectionTarget.return_to_go(layout, discretizer, discount)
    return CorrectionTarget.value(layout.value_var(0), discretizer.num_bins[-1])


def _both(circuit, x, missing, var, nc, target, keep, soft):
    """(one-pass scores, reference scores) of the same query."""
    fast, dists = candidate_scores(circuit, x, missing, var, nc, target, keep, soft)
    ref, _ = candidate_scores(circuit, x, missing, var, nc, target, keep, soft, one_pass=False)
    assert dists is None
    return fast, ref


# ----------------------------------------------------------------------------- the tiny task, enumerated
@pytest.fixture(scope="module")
def tiny_circuit() -> TorchCircuit:
    return tiny.fitted_circuit()


@pytest.fixture(scope="module")
def tiny_joint(tiny_circuit) -> tuple[torch.Tensor, torch.Tensor]:
    return tiny.enumerated_joint(tiny_circuit)


def _tiny_soft(kind: str) -> torch.Tensor | None:
    """None, a constraint on the scored action itself (bins {0, 2}), or one on the second transition's
    action (bins {1, 3}: the pad stays allowed), which the first action must anticipate."""
    if kind == "none":
        return None
    if kind == "own":
        return constraint_evidence(TINY, {0: torch.tensor([True, False, True])})
    soft = torch.ones(TINY.num_vars, tiny.CATS, dtype=torch.float64)
    soft[TINY.act_var(1, 0)] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    return soft


def _brute_scores(allx, p, x, missing, var, nc, target: CorrectionTarget, keep, soft) -> torch.Tensor:
    """The scores by summing the enumerated joint: per-candidate target distributions (V normalised
    over its real bins per reward bin, r over its real bins), times the constraint factor."""
    out = torch.zeros(x.size(0), nc, dtype=torch.float64)
    for b in range(x.size(0)):
        hard = torch.ones(len(allx), dtype=torch.float64)
        weight = torch.ones(len(allx), dtype=torch.float64)  # soft weights of the other missing vars
        for v in range(allx.size(1)):
            if v == var:  # the candidate replaces var's own evidence
                continue
            if not missing[b, v]:
                hard = hard * (allx[:, v] == x[b, v])
            elif soft is not None and v != var:
                weight = weight * soft[v, allx[:, v]]
        mass = p * hard * weight
        vv, vb = allx[:, target.value_var], target.value_bins
        for c in range(nc):
            at_c = mass * (allx[:, var] == c)
            if target.reward_var is None:
                m = torch.stack([at_c[vv == j].sum() for j in range(vb)])
                out[b, c] = (keep[b] * m / m.sum()).sum()
                continue
            rr, nr = allx[:, target.reward_var], target.reward_bins
            pr = torch.stack([at_c[rr == k].sum() for k in range(nr)])
            for k in range(nr):
                m = torch.stack([at_c[(rr == k) & (vv == j)].sum() for j in range(vb)])
                kept = keep[b, target.levels[k * vb : (k + 1) * vb]]
                out[b, c] += pr[k] / pr.sum() * (kept * m / m.sum()).sum()
        if soft is not None:
            own = soft[var, allx[:, var]]
            with_c = torch.stack([(mass * own)[allx[:, var] == c].sum() for c in range(nc)])
            without = torch.stack([(p * hard)[allx[:, var] == c].sum() for c in range(nc)])
            with_c = with_c / (mass * own).sum()
            out[b] *= with_c / (without / (p * hard).sum())
    return out


@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("soft_kind", ["none", "own", "later"])
@pytest.mark.parametrize("rule", ["mass", "strict"])
def test_tiny_task_both_paths_match_brute_force(tiny_circuit, tiny_joint, target_kind, soft_kind, rule):
    allx, p = tiny_joint
    target = _target(target_kind, TINY, tiny.discretizer(), tiny.GAMMA)
    soft = _tiny_soft(soft_kind)
    # Duplicate rows, both states, and a row scoring the second transition's action given the first's.
    x, missing = TINY.evidence(torch.tensor([[0], [1], [0], [1], [1]]))
    x[4, TINY.act_var(0, 0)], missing[4, TINY.act_var(0, 0)] = 2, False
    var = TINY.act_var(0, 0)
    keep = kept_bins(target.distribution(tiny_circuit, x, missing, soft), 0.3, rule)
    fast, ref = _both(tiny_circuit, x, missing, var, 3, target, keep, soft)
    want = _brute_scores(allx, p, x, missing, var, 3, target, keep, soft)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fast, want, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(fast[0], fast[2], atol=0, rtol=0)  # duplicates get one answer
    assert float(fast[:4].max() - fast[:4].min()) > 1e-3  # the scores tell candidates apart
    # The second transition's action (scored over its 4 categories, the pad included).
    var1 = TINY.act_var(1, 0)
    fast1, ref1 = _both(tiny_circuit, x, missing, var1, 4, target, keep, soft)
    want1 = _brute_scores(allx, p, x, missing, var1, 4, target, keep, soft)
    torch.testing.assert_close(fast1, ref1, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fast1, want1, atol=1e-9, rtol=1e-8)


def test_candidate_marginals_are_the_joint_of_every_category(tiny_circuit, tiny_joint):
    """d log Z / d E[t, c] = p(t = c, e_{-t}) / p(e): each target's own evidence counts in Z only, soft
    weights on another variable count everywhere; w_t * it is ``conditional``."""
    allx, p = tiny_joint
    v = TINY.value_var(0)
    x, missing = TINY.evidence(torch.tensor([[1]]))
    x[0, 1], missing[0, 1] = 2, False  # the target's own hard evidence: replaced by its soft weights
    soft = torch.ones(1, TINY.num_vars, tiny.CATS, dtype=torch.float64)
    soft[0, v] = torch.tensor([0.2, 0.0, 1.0, 0.5])
    soft[0, 1] = torch.tensor([1.0, 0.5, 0.0, 1.0])
    got = tiny_circuit.candidate_marginals(x, missing, [1, v], soft_evidence=soft)
    w_v = soft[0, v, allx[:, v]]
    w_a = soft[0, 1, allx[:, 1]]
    mass = p * (allx[:, 0] == 1)
    z = (mass * w_v * w_a).sum()
    want_a = torch.stack([(mass * w_v)[allx[:, 1] == c].sum() for c in range(tiny.CATS)]) / z
    want_v = torch.stack([(mass * w_a)[allx[:, v] == c].sum() for c in range(tiny.CATS)]) / z
    torch.testing.assert_close(got[0, 0], want_a, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[0, 1], want_v, atol=1e-12, rtol=1e-10)
    post = soft[:, [1, v]] * got
    cond = tiny_circuit.conditional(x, missing, [1, v], soft_evidence=soft)
    torch.testing.assert_close(post / post.sum(-1, keepdim=True), cond, atol=1e-12, rtol=0)


def test_a_row_without_a_one_pass_answer_falls_back_to_the_reference(tiny_circuit):
    """NaN from the one-pass query (a sum node the evidence zeroes) -> that row takes the per-candidate path."""

    class Broken:
        num_vars, num_cats = tiny_circuit.num_vars, tiny_circuit.num_cats
        conditional = staticmethod(tiny_circuit.conditional)

        @staticmethod
        def candidate_marginals(x, missing, target_vars, soft_evidence=None):
            out = tiny_circuit.candidate_marginals(x, missing, target_vars, soft_evidence)
            return torch.where((x[:, 0] == 1)[:, None, None], torch.full_like(out, torch.nan), out)

    target = _target("return", TINY, tiny.discretizer(), tiny.GAMMA)
    x, missing = TINY.evidence(torch.tensor([[0], [1], [1]]))
    keep = kept_bins(target.distribution(tiny_circuit, x, missing), 0.3, "mass")
    got, _ = candidate_scores(Broken(), x, missing, TINY.act_var(0, 0), 3, target, keep)
    want, _ = candidate_scores(tiny_circuit, x, missing, TINY.act_var(0, 0), 3, target, keep, one_pass=False)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- a larger random HCLT
OBS3, ACT3, CATS100, REWARD_BINS, VALUE_BINS = 3, 3, 100, 5, 90
BIG = WindowLayout(OBS3, ACT3, 1, CATS100)


def _big_discretizer() -> Discretizer:
    cat = lambda n: ColumnBins("categorical", np.zeros(0), np.arange(n, dtype=np.float64))  # noqa: E731
    reward = ColumnBins("categorical", np.zeros(0), np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))
    value = ColumnBins("quantile", np.linspace(0, 1, VALUE_BINS - 1), np.linspace(-3, 40, VALUE_BINS))
    columns = [cat(CATS100)] * (OBS3 + ACT3) + [reward, value]
    names = [f"obs{i}" for i in range(OBS3)] + [f"act{i}" for i in range(ACT3)] + ["reward", "value"]
    return Discretizer(columns, names)


def _big_root():
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, CATS100, (300, BIG.num_vars), generator=g)
    data[:, BIG.reward_var(0)] %= REWARD_BINS
    data[:, BIG.value_var(0)] %= VALUE_BINS
    data[:, BIG.act_var(0, 1)] = (data[:, 0] + data[:, BIG.act_var(0, 0)]) % CATS100  # some dependence
    return build_hclt(data, num_cats=CATS100, num_latents=6, seed=4)


@pytest.fixture(scope="module")
def big_root():
    return _big_root()


@pytest.fixture(scope="module")
def big_circuit(big_root) -> TorchCircuit:
    return TorchCircuit.from_nodes(big_root, dtype=torch.float64)


def _big_rows(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six rows, two of them duplicates, with the action dimensions before ``dim`` observed."""
    obs = torch.tensor([[3, 50, 7], [3, 50, 7], [99, 0, 12], [41, 41, 41], [3, 50, 7], [5, 6, 8]])
    x, missing = BIG.evidence(obs)
    for i in range(dim):
        x[:, BIG.act_var(0, i)] = torch.tensor([10, 10, 77, 0, 11, 97]) + i
        missing[:, BIG.act_var(0, i)] = False
    return x, missing


@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_random_hclt_both_paths_agree(big_circuit, target_kind, constrained, dim):
    target = _target(target_kind, BIG, _big_discretizer(), 0.99)
    soft = None
    if constrained:  # the last dimension's bins of odd index only: dims 0, 1 anticipate it, dim 2 obeys
        soft = constraint_evidence(BIG, {2: torch.arange(CATS100) % 2 == 1})
    x, missing = _big_rows(dim)
    keep = kept_bins(target.distribution(big_circuit, x, missing, soft), 0.2, "mass")
    fast, ref = _both(big_circuit, x, missing, BIG.act_var(0, dim), CATS100, target, keep, soft)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(fast[0], fast[1], atol=0, rtol=0)
    assert bool((fast > 0).any(dim=1).all())
    if constrained and dim == 2:
        assert bool((fast[:, ::2] == 0).all())


def test_float32_one_pass_is_as_precise_as_a_conditional(big_root, big_circuit):
    """In float32 the one-pass scores' relative error (against the float64 reference) stays within the
    float32 ``conditional``'s own per-entry error: the scores are ratios of such conditionals, never of
    Z, whose float32 rounding grows with |log Z|. (The per-candidate scores, sums over V of
    conditionals, average that error down further; both are float32 rounding, ~1e-7.)"""
    c32 = TorchCircuit.from_nodes(big_root, dtype=torch.float32)
    target = _target("value", BIG, _big_discretizer(), 0.99)
    x, missing = _big_rows(1)
    keep = kept_bins(target.distribution(big_circuit, x, missing), 0.2, "mass")
    var = BIG.act_var(0, 1)
    exact, _ = candidate_scores(big_circuit, x, missing, var, CATS100, target, keep, one_pass=False)
    fast, ref = _both(c32, x, missing, var, CATS100, target, keep, None)
    cond = [c.conditional(x, missing, [var, BIG.value_var(0)]).double() for c in (c32, big_circuit)]
    err_cond = float(((cond[0] - cond[1]).abs() / cond[1]).max())
    err_fast = float(((fast - exact).abs() / exact).max())
    err_ref = float(((ref - exact).abs() / exact).max())
    assert err_fast < 2e-6 and err_ref < 2e-6, (err_fast, err_ref)
    assert err_fast < 3 * err_cond, (err_fast, err_cond)


# ----------------------------------------------------------------------------- the planner
@pytest.fixture(scope="module")
def beam_models():
    return _tiny_gpt(), _circuit()


@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("constrained", [False, True])
def test_trifle_s_takes_the_same_actions_with_either_path(beam_models, target_kind, constrained):
    """Same seed, same actions: the scores agree to float precision, so every draw lands the same."""
    gpt, circuit = beam_models

    def run(circ) -> np.ndarray:
        cfg = _cfg("trifle-s", correction_target=target_kind, value_threshold="mass", constrained=constrained)
        planner = make_planner(
            cfg,
            constraint=[{"dim": 0, "high": 1.0}] if constrained else None,
            model=gpt,
            discretizer=_toy_discretizer(),
            obs_dim=BEAM_OBS,
            act_dim=BEAM_ACT,
            discount=0.9,
            circuit=circ,
            circuit_window=BEAM_K,
        )
        return _rollout(planner, seed=11, steps=6)

    one_pass, reference = run(circuit), run(PerCandidate(circuit))
    np.testing.assert_array_equal(one_pass, reference)
    assert len(set(map(tuple, one_pass))) > 1  # the plans vary, so agreement is not trivial
