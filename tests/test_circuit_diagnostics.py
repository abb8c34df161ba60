"""The circuit diagnostics score an exact model of the data as perfect and an action-blind one as poor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.data.tokens import TokenData
from trifle.models.circuits.diagnostics import (
    circuit_diagnostics,
    discrete_state_diagnostics,
    value_calibration,
)


def _dataset(seed: int = 0) -> TokenData:
    """One-step episodes (s, a, r, V): 3 states, 3 actions; the reward depends on the action."""
    rng = np.random.default_rng(seed)
    n = 3000
    s = rng.integers(0, 3, n)
    a = rng.integers(0, 3, n)
    r = (rng.random(n) < (0.2 + 0.3 * a)).astype(np.int64)
    v = np.clip(s + a + rng.integers(0, 2, n), 0, 4)
    tokens = np.stack([s, a, r, v], axis=1)
    cols = [
        ColumnBins("categorical", np.zeros(0), np.arange(3.0)),
        ColumnBins("categorical", np.zeros(0), np.arange(3.0)),
        ColumnBins("categorical", np.zeros(0), np.array([-1.0, 1.0])),
        ColumnBins("quantile", np.arange(0.5, 4.0), np.arange(5.0) * 10),
    ]
    disc = Discretizer(cols, ["s", "a", "r", "v"])
    return TokenData(tokens, np.arange(n), np.ones(n, bool), obs_dim=1, act_dim=1, discretizer=disc)


class CountingCircuit:
    """A 'circuit' whose conditionals are the data's counts given the evidence (or given s only)."""

    def __init__(self, data: TokenData, use_action: bool = True):
        self.tokens, self.use_action = data.tokens, use_action
        self.num_vars, self.num_cats = 4, 5

    def conditional(self, x, missing, targets, soft_evidence=None):
        out = torch.zeros(x.size(0), len(targets), self.num_cats, dtype=torch.float64)
        for b in range(x.size(0)):
            match = self.tokens[:, 0] == int(x[b, 0])
            if self.use_action and not bool(missing[b, 1]):
                match &= self.tokens[:, 1] == int(x[b, 1])
            for t, var in enumerate(targets):
                counts = np.bincount(self.tokens[match, var], minlength=self.num_cats)
                out[b, t] = torch.as_tensor(counts / counts.sum())
        return out


def test_exact_conditionals_score_perfectly():
    data = _dataset()
    diag = discrete_state_diagnostics(CountingCircuit(data), data, np.arange(len(data.tokens)), discount=0.9)
    assert diag["reward_tv"] == pytest.approx(0.0, abs=1e-12)
    assert diag["q_within_state_corr"] == pytest.approx(1.0, abs=1e-9)
    assert diag["diagnostic_pairs"] == 9


def test_an_action_blind_circuit_is_exposed():
    data = _dataset()
    blind = discrete_state_diagnostics(
        CountingCircuit(data, use_action=False), data, np.arange(len(data.tokens)), discount=0.9
    )
    # p(r | s) vs p(r | s, a): the action moves p(r = 1) from 0.2 to 0.8, so the TV is about 0.2.
    assert blind["reward_tv"] > 0.15
    assert not blind["q_within_state_corr"] > 0.1  # NaN or ~0: no within-state ranking


def test_calibration_of_the_exact_model_and_of_a_shifted_one():
    data = _dataset(1)
    rows = np.arange(len(data.tokens))
    good = value_calibration(CountingCircuit(_dataset(1)), data, rows)
    assert good["value_calibration_error"] < 0.03
    assert good["value_corr"] > 0.5

    class Shifted(CountingCircuit):
        def conditional(self, x, missing, targets, soft_evidence=None):
            out = super().conditional(x, missing, targets, soft_evidence)
            return torch.roll(out, 1, dims=-1)  # every value one bin too high

    bad = value_calibration(Shifted(data), data, rows)
    assert bad["value_calibration_error"] > 0.1


def test_continuous_tasks_get_only_the_calibration():
    data = _dataset()
    cols = list(data.discretizer.columns)
    cols[0] = ColumnBins("quantile", np.array([0.5, 1.5]), np.arange(3.0))
    cont = TokenData(
        data.tokens, data.episode_starts, data.episode_terminal, 1, 1, Discretizer(cols, ["s", "a", "r", "v"])
    )
    ids = np.arange(len(data.tokens))
    diag = circuit_diagnostics(CountingCircuit(cont), cont, ids[:2000], ids[2000:], discount=0.9)
    assert np.isnan(diag["reward_tv"]) and np.isnan(diag["q_within_state_corr"])
    assert diag["value_calibration_error"] < 0.05
