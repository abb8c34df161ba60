"""The HCLT's tree: exact mutual information recovers planted dependency trees and keeps each action
next to its reward on Taxi-like tokens (pyjuice's pixel estimator does not)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from trifle.errors import ConfigError
from trifle.models.circuits import TorchCircuit, build_hclt
from trifle.models.circuits.structure import (
    chow_liu_tree,
    mutual_information_matrix,
    tree_distance,
)


def _plug_in_mi(x: np.ndarray, y: np.ndarray) -> float:
    """Mutual information by a dictionary of counts: an independent reference for the vectorised code."""
    n = len(x)
    joint, px, py = {}, {}, {}
    for a, b in zip(x.tolist(), y.tolist(), strict=True):
        joint[(a, b)] = joint.get((a, b), 0) + 1
        px[a] = px.get(a, 0) + 1
        py[b] = py.get(b, 0) + 1
    return sum(c / n * np.log((c / n) / (px[a] / n * py[b] / n)) for (a, b), c in joint.items())


def test_mutual_information_matches_counting():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 3000)
    b = np.where(rng.random(3000) < 0.7, a * 3 % 7, rng.integers(0, 90, 3000))
    c = rng.integers(40, 45, 3000)
    data = np.stack([a, b, c], axis=1)
    mi = mutual_information_matrix(torch.as_tensor(data), num_cats=100, bias_correction=False)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert mi[i, j] == pytest.approx(_plug_in_mi(data[:, i], data[:, j]), abs=1e-10)
    p = np.bincount(c)[40:] / 3000
    assert mi[2, 2] == pytest.approx(-np.sum(p * np.log(p)))


def _sample_tree_network(tree: nx.Graph, root: int, cats: list[int], n: int, rng) -> np.ndarray:
    """Samples of a tree Bayesian network: a child copies a function of its parent with prob. 0.85."""
    x = np.zeros((n, len(cats)), np.int64)
    x[:, root] = rng.integers(0, cats[root], n)
    for parent, child in nx.bfs_edges(tree, root):
        mapped = (x[:, parent] * 7 + child) % cats[child]
        noise = rng.integers(0, cats[child], n)
        x[:, child] = np.where(rng.random(n) < 0.85, mapped, noise)
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chow_liu_recovers_a_planted_tree(seed):
    rng = np.random.default_rng(seed)
    num_vars = 10
    planted = nx.random_labeled_tree(num_vars, seed=seed)
    # Columns with very different ranges, as trajectory tokens have (few actions, 100 value bins).
    cats = [int(k) for k in rng.choice([3, 6, 12, 50, 100], num_vars)]
    data = _sample_tree_network(planted, 0, cats, 20000, rng)
    tree = chow_liu_tree(mutual_information_matrix(torch.as_tensor(data), num_cats=100))
    assert {frozenset(e) for e in tree.edges} == {frozenset(e) for e in planted.edges}


def _taxi_like_tokens(n: int, rng) -> np.ndarray:
    """Columns (s, a, r, V) in Taxi's token ranges: 500 states, 6 actions, reward ids 0-2, values 0-99.

    The reward is mostly determined by the action (illegal pick-up/drop-off -> id 0), the value by the state.
    """
    s = rng.integers(0, 500, n)
    greedy = s % 6
    a = np.where(rng.random(n) < 0.8, greedy, rng.integers(0, 6, n))
    illegal = (a >= 4) & (rng.random(n) < 0.9)
    r = np.where(illegal, 0, np.where(rng.random(n) < 0.02, 2, 1))
    v = np.clip((s // 5) + rng.integers(-2, 3, n) - 10 * (r == 0), 0, 99)
    return np.stack([s % 100, a, r, v], axis=1)


def test_exact_tree_puts_each_action_next_to_its_reward():
    rng = np.random.default_rng(3)
    one = _taxi_like_tokens(6000, rng)
    # Three consecutive transitions of independent rows, flattened like the circuit's windows.
    window = np.concatenate([one, np.roll(one, 1, axis=0), np.roll(one, 2, axis=0)], axis=1)
    data = torch.as_tensor(window)
    exact = chow_liu_tree(mutual_information_matrix(data, num_cats=101))
    for t in range(3):
        assert tree_distance(exact, 4 * t + 1, 4 * t + 2) == 1, f"a_{t} and r_{t} not adjacent"


def test_build_hclt_uses_the_exact_tree_and_a_conditional_follows_the_action():
    """After EM on Taxi-like tokens, p(r = illegal | a) must track the data's counts for every action."""
    from trifle.models.circuits.training import em_step

    rng = np.random.default_rng(4)
    data = torch.as_tensor(_taxi_like_tokens(4000, rng))
    circuit = TorchCircuit.from_nodes(
        build_hclt(data, num_cats=100, num_latents=8, seed=0), dtype=torch.float64
    )
    batches = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    for _ in range(15):
        em_step(circuit, batches, pseudocount=0.01)
    x = torch.zeros(6, 4, dtype=torch.long)
    x[:, 1] = torch.arange(6)
    missing = torch.ones(6, 4, dtype=torch.bool)
    missing[:, 1] = False
    p_illegal = circuit.conditional(x, missing, [2])[:, 0, 0]
    counts = np.array([np.mean(data[:, 2].numpy()[data[:, 1].numpy() == a] == 0) for a in range(6)])
    assert np.max(np.abs(p_illegal.numpy() - counts)) < 0.05


def test_build_hclt_rejects_an_unknown_structure():
    data = torch.zeros(10, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="pc.structure"):
        build_hclt(data, num_cats=2, num_latents=2, seed=0, structure="chow")


def _taxi_tokens(num_episodes: int):
    """Tokens of the project's own stochastic-Taxi data (Q-learning's first delivering episodes)."""
    from trifle.config import compose
    from trifle.data.toy_datasets import toy_task_tokens

    task = compose(["task=taxi-stochastic", f"task.dataset.num_episodes={num_episodes}"])["task"]
    return toy_task_tokens(task)[0]


def test_taxi_windows_keep_every_action_next_to_its_reward():
    """On Taxi's K = 3 windows the exact tree joins a_t and r_t for every t; pyjuice's pixel estimator
    reads MI(a_0; r_0) as a small fraction of its exact value (and so cannot be relied on to)."""
    from pyjuice.structures.hclt import mutual_information_chunked

    from trifle.data.circuit_windows import circuit_windows

    data = _taxi_tokens(150)
    ids = np.arange(len(data.episode_starts))
    windows = circuit_windows(
        data.tokens,
        data.episode_starts,
        data.episode_terminal,
        window=3,
        episode_ids=ids,
        pad_token=data.vocab_size,
    )
    dim, act, rew = data.transition_dim, data.obs_dim, data.obs_dim + data.act_dim
    exact = mutual_information_matrix(windows, data.vocab_size + 1)
    tree = chow_liu_tree(exact)
    for t in range(3):
        assert tree_distance(tree, t * dim + act, t * dim + rew) == 1, f"a_{t} and r_{t} not adjacent"
    x = torch.as_tensor(windows)
    binned = mutual_information_chunked(x, x, 32, 0.5 / 32, 64).numpy()
    assert exact[act, rew] > 0.1
    assert binned[act, rew] < 0.25 * exact[act, rew]
