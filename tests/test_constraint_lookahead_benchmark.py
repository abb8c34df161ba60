"""benchmarks/constraint_lookahead.py: its GPT and circuit quantities against enumeration of tiny models'
joint distributions, and its scores by hand.

Setting: one observation column, three action columns (3 bins each), reward and value; the constraint
allows bins {0, 2} of the last action dimension (j = 2), so the lookahead acts on dimension 1.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.data.tokens import TokenData
from trifle.models.circuits import TorchCircuit, build_hclt, em_step
from trifle.models.gpt import GPTConfig, TrajectoryGPT

REPO = Path(__file__).resolve().parents[1]
OBS, ACT, BINS = 1, 3, 3
D = OBS + ACT + 2
ALLOWED = torch.tensor([1.0, 0.0, 1.0])


def _bench():
    path = REPO / "benchmarks" / "constraint_lookahead.py"
    spec = importlib.util.spec_from_file_location("constraint_lookahead", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _gpt() -> TrajectoryGPT:
    torch.manual_seed(3)
    model = TrajectoryGPT(
        GPTConfig(obs_dim=OBS, act_dim=ACT, vocab_size=BINS, block_size=D, n_layer=1, n_head=2, n_embd=16)
    )
    with torch.no_grad():  # sharper, state-dependent heads than the initialisation gives
        model.head_weight.normal_(0.0, 2.0)
    return model.eval()


def _rows(n: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        s = int(g.integers(3))
        a0 = int((s + g.integers(2)) % 3)
        a1 = int((a0 + (g.random() < 0.3)) % 3)
        a2 = int((a1 * 2 + (g.random() < 0.2)) % 3)
        rows.append([s, a0, a1, a2, int(a2 == 1), int(min(2, a1 + (g.random() < 0.5)))])
    return torch.tensor(rows)


def _data(tokens: torch.Tensor) -> TokenData:
    cat = ColumnBins("categorical", np.zeros(0), np.arange(3.0))
    columns = [cat, cat, cat, cat, ColumnBins("categorical", np.zeros(0), np.arange(2.0)), cat]
    disc = Discretizer(columns, ["obs", "act0", "act1", "act2", "reward", "value"])
    return TokenData(tokens.numpy(), np.array([0]), np.array([True]), OBS, ACT, disc)


def test_the_gpts_constrained_proposal_is_the_enumerated_conditional():
    bench, model = _bench(), _gpt()
    tokens = _rows(5, 1)
    p_c, before, prior, exact = bench.gpt_constraint(model, tokens, OBS, 2, ALLOWED.double(), BINS)
    with torch.no_grad():
        for b, row in enumerate(tokens):
            # p(a1, a2 | s, a0) by the chain rule, each factor from a forward pass of its own prefix
            joint = torch.zeros(BINS, BINS, dtype=torch.float64)
            for a1, a2 in itertools.product(range(BINS), repeat=2):
                prefix = torch.tensor([[int(row[0]), int(row[1]), a1]])
                logits, _ = model(prefix)
                p1 = torch.softmax(logits[0, 1, :BINS].double(), -1)[a1]
                p2 = torch.softmax(logits[0, 2, :BINS].double(), -1)[a2]
                joint[a1, a2] = p1 * p2
            allowed_mass = joint[:, ALLOWED.bool()].sum(1)
            torch.testing.assert_close(torch.as_tensor(prior[b]), joint.sum(1), atol=1e-6, rtol=0)
            torch.testing.assert_close(torch.as_tensor(before[b]), allowed_mass.sum(), atol=1e-6, rtol=0)
            torch.testing.assert_close(
                torch.as_tensor(exact[b]), allowed_mass / allowed_mass.sum(), atol=1e-6, rtol=0
            )
            own = joint[int(row[2])]
            torch.testing.assert_close(
                torch.as_tensor(p_c[b]), own[ALLOWED.bool()].sum() / own.sum(), atol=1e-6, rtol=0
            )


def test_the_circuits_constraint_probability_and_factor_match_enumeration():
    bench = _bench()
    train = _rows(400, 0)
    circuit = TorchCircuit.from_nodes(
        build_hclt(train, num_cats=3, num_latents=3, seed=1), dtype=torch.float64
    )
    for _ in range(4):
        em_step(circuit, [train], pseudocount=0.5)
    allx = torch.tensor(list(itertools.product(range(3), repeat=D)))
    p = circuit.log_prob(allx).exp()

    def mass(**fixed):
        keep = torch.ones(len(allx), dtype=torch.bool)
        for col, value in fixed.items():
            keep &= torch.isin(allx[:, int(col[1:])], torch.as_tensor(value))
        return (p * keep).sum()

    tokens = _rows(4, 7)
    p_c, factor = bench.circuit_constraint(circuit, _data(train), tokens, 2, ALLOWED)
    for b, row in enumerate(tokens):
        s, a0, a1 = (int(v) for v in row[:3])
        want = mass(c0=[s], c1=[a0], c2=[a1], c3=[0, 2]) / mass(c0=[s], c1=[a0], c2=[a1])
        assert p_c[b] == pytest.approx(float(want), abs=1e-9)
        given = [mass(c0=[s], c1=[a0], c2=[c], c3=[0, 2]) / mass(c0=[s], c1=[a0], c2=[c]) for c in range(3)]
        given = torch.stack(given).numpy()
        np.testing.assert_allclose(factor[b] / factor[b].sum(), given / given.sum(), atol=1e-9)


def test_scores_by_hand():
    bench = _bench()
    y = np.array([1.0, 0.0, 1.0, 0.0])
    assert bench.log_loss(np.array([0.5] * 4), y) == pytest.approx(np.log(2))
    assert bench.auc(np.array([0.9, 0.1, 0.8, 0.2]), y) == 1.0
    assert bench.auc(np.array([0.1, 0.9, 0.2, 0.8]), y) == 0.0
    assert bench.auc(np.array([0.5] * 4), y) == 0.5
    assert bench.total_variation(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])).tolist() == [1.0]
