"""A tiny discretized task whose circuit can be enumerated: the brute-force ground truth of the
Trifle-query tests (tests/test_planning_queries.py, tests/test_dt_trifle.py).

One observation column (2 states), one action column (3 actions), a categorical reward (2 levels) and a
quantile value column (3 levels), K = 2 transitions per window, 4 categories with the pad token last.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.models.circuits import TorchCircuit, build_hclt, em_step

OBS, ACT, K, CATS = 1, 1, 2, 4
D = OBS + ACT + 2
PAD = CATS - 1
REWARDS = np.array([-1.0, 5.0])
VALUES = np.array([-2.0, 0.5, 4.0])
GAMMA = 0.9


def discretizer() -> Discretizer:
    cat = lambda v: ColumnBins("categorical", np.zeros(0), np.asarray(v, np.float64))  # noqa: E731
    columns = [
        cat([0, 1]),
        cat([0, 1, 2]),
        cat(REWARDS),
        ColumnBins("quantile", np.array([0.0, 2.0]), VALUES),
    ]
    return Discretizer(columns, ["obs", "act", "reward", "value"])


def windows(n: int, seed: int) -> torch.Tensor:
    """Windows whose action, reward and value depend on the state and each other; some end early."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        window = []
        for _ in range(K):
            s = int(torch.randint(0, 2, (1,), generator=g))
            a = (s + int(torch.randint(0, 2, (1,), generator=g))) % 3
            r = int(a == 2 or torch.rand(1, generator=g) < 0.2)
            v = min(2, r + s + int(torch.randint(0, 2, (1,), generator=g)))
            window += [s, a, r, v]
        if torch.rand(1, generator=g) < 0.3:
            window[D:] = [PAD] * D  # the episode ended after the first transition
        rows.append(window)
    return torch.tensor(rows)


def fitted_circuit() -> TorchCircuit:
    """An HCLT fitted to 400 windows by 4 EM steps (float64, so enumeration sums to 1 exactly enough)."""
    data = windows(400, 0)
    c = TorchCircuit.from_nodes(build_hclt(data, num_cats=CATS, num_latents=3, seed=1), dtype=torch.float64)
    for _ in range(4):
        em_step(c, [data], pseudocount=0.5)
    return c


def enumerated_joint(circuit: TorchCircuit) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window and its probability under ``circuit``."""
    allx = torch.tensor(list(itertools.product(range(CATS), repeat=K * D)))
    return allx, circuit.log_prob(allx).exp()
