"""Latent variable distillation: the latents it distils are the planted ones, its parameter estimate is
the counts, it is a function of the seed, and ``init="random"`` trains exactly what it trained before."""

from __future__ import annotations

from math import comb
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from trifle.errors import ConfigError
from trifle.models.circuits import TorchCircuit, build_hclt, em_step, load_circuit, train_circuit
from trifle.models.circuits import lvd as lvd_mod
from trifle.models.circuits import training as training_mod
from trifle.models.circuits.lvd import (
    distil_latents,
    kmeans,
    latent_structure,
    lvd_settings,
    supervised_estimate,
    train_mlm,
)
from trifle.models.circuits.structure import chow_liu_tree, mutual_information_matrix, tree_root
from trifle.models.circuits.training import mean_log_likelihood

B, C = 6, 6  # variables per block, categories
SMALL = {
    "dim": 32,
    "layers": 2,
    "heads": 2,
    "steps": 150,
    "batch_size": 128,
    "samples": 2000,
    "kmeans_iters": 30,
}


def _two_block(n: int, seed: int, flip: float = 0.1) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A known HCLT: a binary cluster y_a drives variables 0-5, y_b (= y_a flipped with prob. ``flip``)
    drives 6-11; every (cluster, variable) has its own peaked categorical. Returns x, y [n, 2], and the
    true log-likelihood of each row."""
    probs = np.random.default_rng(100).dirichlet(np.full(C, 0.3), size=(2, 2 * B))  # [cluster, var, cat]
    r = np.random.default_rng(seed)
    ya = r.integers(0, 2, n)
    yb = np.where(r.random(n) < flip, 1 - ya, ya)
    y = np.repeat(np.stack([ya, yb], 1), B, axis=1)
    x = np.minimum((r.random((n, 2 * B, 1)) > np.cumsum(probs[y, np.arange(2 * B)], -1)).sum(-1), C - 1)
    # Exact likelihood: sum over (y_a, y_b) of p(y_a) p(y_b | y_a) p(x | y).
    block = np.log(probs[:, np.arange(2 * B), x]).reshape(2, n, 2, B).sum(-1)  # [cluster, n, block]
    terms = [
        np.log(0.5) + np.log(flip if a != b else 1 - flip) + block[a, :, 0] + block[b, :, 1]
        for a in (0, 1)
        for b in (0, 1)
    ]
    return torch.from_numpy(x), np.stack([ya, yb], 1), np.logaddexp.reduce(np.stack(terms), axis=0)


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1: identical up to renaming, about 0: unrelated)."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = sum(comb(int(v), 2) for v in table.ravel())
    rows, cols = (sum(comb(int(v), 2) for v in s) for s in (table.sum(1), table.sum(0)))
    expected = rows * cols / comb(len(a), 2)
    return (pairs - expected) / ((rows + cols) / 2 - expected)


def _tree_groups(x: torch.Tensor) -> tuple[nx.DiGraph, dict[int, list[int]]]:
    """The exact-MI tree rooted as build_hclt roots it, and each inner node's group (itself + leaf children)."""
    tree = chow_liu_tree(mutual_information_matrix(x, int(x.max()) + 1))
    rooted = nx.bfs_tree(tree, tree_root(tree))
    groups = {}
    for v in rooted:
        chs = list(rooted.successors(v))
        if chs:
            groups[v] = sorted([v] + [c for c in chs if not list(rooted.successors(c))])
    return rooted, groups


def test_lvd_recovers_the_planted_clusters_and_beats_random_init_before_any_em():
    x, y, true_ll = _two_block(2000, 0)
    held, _, held_true = _two_block(2000, 1)
    circuit = TorchCircuit.from_nodes(build_hclt(x, num_cats=C, num_latents=2, seed=0))
    structure = latent_structure(circuit)
    _, groups = _tree_groups(x)
    assert sorted(map(sorted, structure.groups)) == sorted(groups.values())  # latents read off the graph
    assert len(structure.groups) == 2  # one latent per block: {5, 0-4} and {7, 6, 8-11}

    settings = lvd_settings({**SMALL, "steps": 400})  # 150 steps: ARI 0.75-0.87; 400: 0.92-0.96
    model, _ = train_mlm(x, num_cats=C, settings=settings, seed=0, out_path=Path("unused"))
    z = distil_latents(model, x, structure, iters=30, seed=0)
    for j, group in enumerate(structure.groups):
        truth = y[:, 0] if max(group) < B else y[:, 1]
        # The Bayes classifier with the true parameters reaches an ARI of 0.98-0.99 here.
        assert _ari(z[:, j].numpy(), truth) > 0.8, (group, _ari(z[:, j].numpy(), truth))

    random_ll = mean_log_likelihood(circuit, held, 1024) / (2 * B)
    supervised_estimate(circuit, x, z, pseudocount=0.1)
    lvd_ll = mean_log_likelihood(circuit, held, 1024) / (2 * B)
    best = float(held_true.mean()) / (2 * B)
    # Random init is far from the data; LVD's closed form is already within a whisker of the truth.
    assert random_ll < best - 0.3
    assert lvd_ll > best - 0.02, (lvd_ll, best)
    assert lvd_ll > random_ll + 0.3


def test_supervised_estimate_equals_hand_counts_of_a_fully_observed_toy():
    x, _, _ = _two_block(400, 3)
    num_latents, pc = 3, 0.5
    root_ns = build_hclt(x, num_cats=C, num_latents=num_latents, seed=0)
    circuit = TorchCircuit.from_nodes(root_ns, dtype=torch.float64)
    structure = latent_structure(circuit)
    rooted, groups = _tree_groups(x)
    z_tree = {
        v: torch.randint(0, num_latents, (len(x),), generator=torch.Generator().manual_seed(v))
        for v in groups
    }
    owner = [next(v for v in g if v in groups) for g in structure.groups]  # each latent's inner tree node
    supervised_estimate(circuit, x, torch.stack([z_tree[v] for v in owner], 1), pseudocount=pc)
    circuit.write_to_nodes(root_ns)

    def hand(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
        counts = torch.zeros(n_rows, n_cols, dtype=torch.float64)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            counts[r, c] += 1
        return (counts + pc / n_cols) / (counts.sum(1, keepdim=True) + pc)

    checked = 0
    for ns in root_ns:  # walk pyjuice's own graph: checks the TorchCircuit layout and the write-back too
        if ns.is_input():
            v = ns.scope.to_list()[0]
            latent = v if v in groups else next(iter(rooted.predecessors(v)))
            want = hand(z_tree[latent], x[:, v], num_latents, C)
            got = ns.get_params().reshape(num_latents, C).double()
        elif ns.is_sum():
            (prod,) = ns.chs
            v = next(
                c.scope.to_list()[0] for c in prod.chs if c.is_input() and c.scope.to_list()[0] in groups
            )
            parents = list(rooted.predecessors(v))
            up = z_tree[parents[0]] if parents else torch.zeros(len(x), dtype=torch.long)
            want = hand(up, z_tree[v], ns.num_nodes, num_latents)
            got = ns.get_params(as_matrix=True).double()
        else:
            continue
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        checked += 1
    assert checked == 2 * B + len(groups)


def test_kmeans_separates_blobs_and_is_a_function_of_the_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(100)
    pts = centres[truth] + torch.randn(300, 2, generator=g)
    labels = kmeans(pts, 3, iters=20, seed=1)
    assert _ari(labels.numpy(), truth.numpy()) == pytest.approx(1.0)
    assert torch.equal(labels, kmeans(pts, 3, iters=20, seed=1))
    assert kmeans(pts[:2], 3, iters=5, seed=0).tolist() in ([0, 1], [1, 0], [0, 2], [2, 0], [1, 2], [2, 1])


def _train(tmp_path: Path, name: str, **kw) -> dict:
    x, _, _ = _two_block(600, 4)
    held, _, _ = _two_block(200, 5)
    args = dict(num_cats=C, num_latents=2, epochs=2, batch_size=256, pseudocount=0.1, seed=0, progress=False)
    args.update(kw)
    return train_circuit(x, held, out_path=tmp_path / name, **args)


def _params(path: Path) -> list[torch.Tensor]:
    c = load_circuit(path, backend="torch")
    return [c.input_params, *c.sum_params()]


def test_lvd_training_is_deterministic_for_a_seed_and_leaves_the_rng_alone(tmp_path):
    lvd = {**SMALL, "steps": 40}
    state = torch.random.get_rng_state()
    a = _train(tmp_path, "a.jpc", init="lvd", lvd=lvd)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = _train(tmp_path, "b.jpc", init="lvd", lvd=lvd)
    _train(tmp_path, "c.jpc", init="lvd", lvd=lvd, seed=1)
    for p, q in zip(_params(tmp_path / "a.jpc"), _params(tmp_path / "b.jpc"), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(_params(tmp_path / "a.jpc")[0], _params(tmp_path / "c.jpc")[0])
    assert a["init"] == "lvd" and a["lvd"]["mlm_loss"] == b["lvd"]["mlm_loss"]
    assert a["seconds"] == pytest.approx(a["em_seconds"] + a["init_seconds"]) and a["init_seconds"] > 0
    # Before any EM step (history[0] is the log-likelihood under the starting parameters) LVD is far ahead.
    rand = _train(tmp_path, "r.jpc")
    assert a["history"][0]["train_ll_per_var"] > rand["history"][0]["train_ll_per_var"] + 0.3
    assert not list(tmp_path.glob("*.partial.pt")) and not list(tmp_path.glob("*lvd-mlm*"))


def test_lvd_resume_reuses_the_distilled_start(tmp_path, monkeypatch):
    lvd = {**SMALL, "steps": 30}
    full = _train(tmp_path, "full.jpc", init="lvd", lvd=lvd, epochs=3)
    real_em, calls = training_mod.em_step, {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # during the first epoch (the distilled start is saved), then the second
            raise KeyboardInterrupt
        return real_em(*args, **kwargs)

    monkeypatch.setattr(training_mod, "em_step", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "res.jpc", init="lvd", lvd=lvd, epochs=3)
    assert torch.load(tmp_path / "res.jpc.partial.pt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(lvd_mod, "train_mlm", lambda *a, **k: pytest.fail("resume must not redo LVD"))
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "res.jpc", init="lvd", lvd=lvd, epochs=3)
    assert torch.load(tmp_path / "res.jpc.partial.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(Exception, match=r"res\.jpc\.partial\.pt.*lvd"):
        _train(tmp_path, "res.jpc", init="lvd", lvd={**lvd, "steps": 31}, epochs=3)
    with pytest.raises(Exception, match=r"res\.jpc\.partial\.pt.*init"):
        _train(tmp_path, "res.jpc", epochs=3)
    monkeypatch.setattr(training_mod, "em_step", real_em)
    resumed = _train(tmp_path, "res.jpc", init="lvd", lvd=lvd, epochs=3)
    assert resumed["history"] == [
        {**h, "seconds": r["seconds"]} for h, r in zip(full["history"], resumed["history"], strict=True)
    ]
    # The LVD record is carried over from the first run, not measured again.
    assert resumed["lvd"]["mlm_loss"] == full["lvd"]["mlm_loss"] and resumed["init_seconds"] > 0
    for p, q in zip(_params(tmp_path / "full.jpc"), _params(tmp_path / "res.jpc"), strict=True):
        assert torch.equal(p, q)


def test_random_init_trains_exactly_the_plain_em_loop(tmp_path):
    """``init="random"`` (the default) is build_hclt's parameters followed by plain full-batch EM,
    bit for bit, and its checkpoint fingerprint has no LVD keys (old partial files still resume)."""
    x, _, _ = _two_block(600, 4)
    default = _train(tmp_path, "default.jpc")
    explicit = _train(tmp_path, "explicit.jpc", init="random", lvd={"steps": 7})  # lvd is ignored
    circuit = TorchCircuit.from_nodes(build_hclt(x, num_cats=C, num_latents=2, seed=0))
    batches = [x[i : i + 256] for i in range(0, len(x), 256)]
    lls = [em_step(circuit, batches, pseudocount=0.1) / (2 * B) for _ in range(2)]
    assert [h["train_ll_per_var"] for h in default["history"]] == lls
    assert [h["train_ll_per_var"] for h in explicit["history"]] == lls
    for p, q, r in zip(
        _params(tmp_path / "default.jpc"),
        _params(tmp_path / "explicit.jpc"),
        [circuit.input_params, *circuit.sum_params()],
        strict=True,
    ):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert default["init"] == "random" and default["init_seconds"] == 0.0 and "lvd" not in default
    assert default["seconds"] == default["em_seconds"]
    fingerprint = training_mod._fingerprint(x, x, {"a": 1})
    assert set(fingerprint) == {"a", "train_shape", "valid_shape", "train_sha256"}


def test_bad_lvd_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pc.init"):
        _train(tmp_path, "x.jpc", init="distil")
    with pytest.raises(ConfigError, match=r"pc\.lvd\.steps"):
        lvd_settings({"steps": 0})
    with pytest.raises(ConfigError, match="unknown keys"):
        lvd_settings({"epochs": 3})
    with pytest.raises(ConfigError, match="multiple of heads"):
        lvd_settings({"dim": 30, "heads": 4})
    assert not list(tmp_path.iterdir())


def test_config_validates_init_and_lvd():
    from trifle.config import compose

    cfg = compose(["task=taxi-stochastic"])
    assert cfg["pc"]["init"] == "random" and lvd_settings(cfg["pc"]["lvd"]) == cfg["pc"]["lvd"]
    with pytest.raises(ConfigError, match="pc.init"):
        compose(["pc.init=bogus"])
    with pytest.raises(ConfigError, match=r"pc\.lvd\.samples"):
        compose(["pc.lvd.samples=0"])
