"""Circuit package: exact answers by enumeration, EM against an independent flow computation, I/O, resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models.circuits import (
    TorchCircuit,
    build_hclt,
    circuit_block_size,
    em_step,
    load_circuit,
    resolve_backend,
    save_circuit,
    train_circuit,
)
from trifle.models.circuits import training as training_mod

V, C, L = 4, 3, 2


def _data(n: int, seed: int, num_vars: int = V, num_cats: int = C) -> torch.Tensor:
    """Correlated toy tokens: each variable copies its left neighbour most of the time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, num_cats, (n, num_vars), generator=g)
    for v in range(1, num_vars):
        keep = torch.rand(n, generator=g) < 0.6
        x[:, v] = torch.where(keep, x[:, v - 1], x[:, v])
    return x


@pytest.fixture(scope="module")
def tiny() -> TorchCircuit:
    return TorchCircuit.from_nodes(
        build_hclt(_data(200, 0), num_cats=C, num_latents=L, seed=1), dtype=torch.float64
    )


@pytest.fixture(scope="module")
def joint(tiny: TorchCircuit) -> tuple[torch.Tensor, torch.Tensor]:
    """All C^V assignments and their probabilities."""
    allx = torch.tensor(list(itertools.product(range(C), repeat=V)))
    return allx, tiny.log_prob(allx).exp()


def _brute(allx, p, x_row, miss_row, weights_row) -> torch.Tensor:
    """p(observed, soft evidence) by enumeration, per assignment (to be summed or grouped)."""
    keep = torch.ones(len(allx), dtype=torch.float64)
    for v in range(V):
        factor = weights_row[v, allx[:, v]] if miss_row[v] else (allx[:, v] == x_row[v]).double()
        keep = keep * factor
    return p * keep


def test_joint_sums_to_one(joint):
    _, p = joint
    assert abs(float(p.sum()) - 1.0) < 1e-6


def test_marginals_and_soft_evidence_match_enumeration(tiny, joint):
    allx, p = joint
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, C, (6, V), generator=g)
    miss = torch.rand(6, V, generator=g) < 0.5
    miss[0] = False
    miss[1] = True
    soft = torch.rand(6, V, C, generator=g, dtype=torch.float64) * 2.0  # weights need not be <= 1
    ones = torch.ones(V, C, dtype=torch.float64)
    got = tiny.log_prob(x, miss)
    got_soft = tiny.log_prob(x, miss, soft_evidence=soft)
    for b in range(6):
        assert torch.isclose(got[b], _brute(allx, p, x[b], miss[b], ones).sum().log(), atol=1e-9)
        assert torch.isclose(got_soft[b], _brute(allx, p, x[b], miss[b], soft[b]).sum().log(), atol=1e-9)
    assert abs(float(tiny.log_prob(x[:1], torch.ones(V, dtype=torch.bool)))) < 1e-6


def test_conditional_matches_enumeration(tiny, joint):
    allx, p = joint
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, C, (5, V), generator=g)
    miss = torch.zeros(5, V, dtype=torch.bool)
    miss[:, 2] = True
    soft = torch.rand(5, V, C, generator=g, dtype=torch.float64)
    targets = [3, 0]
    got = tiny.conditional(x, miss, targets, soft_evidence=soft)
    assert got.shape == (5, 2, C)
    assert torch.allclose(got.sum(-1), torch.ones(5, 2, dtype=torch.float64))
    for b in range(5):
        m = miss[b].clone()
        m[targets] = True
        w = _brute(allx, p, x[b], m, soft[b])
        for i, t in enumerate(targets):
            want = torch.stack([w[allx[:, t] == c].sum() for c in range(C)])
            assert torch.allclose(got[b, i], want / want.sum(), atol=1e-9)


def test_float32_agrees_with_float64(tiny):
    root = tiny.root_ns
    c32 = TorchCircuit.from_nodes(root)
    x = _data(50, 9)
    assert torch.allclose(c32.log_prob(x).double(), tiny.log_prob(x), atol=1e-5)


def _flows_by_linearity(circuit: TorchCircuit, x: torch.Tensor, missing) -> tuple[torch.Tensor, list]:
    """Independent EM statistics: in a tree-shaped circuit p is linear in every parameter, so
    theta_k * dp/dtheta_k = p - p(theta_k := 0); the flow is the batch sum of that over p."""
    base_in = circuit.input_params.clone()
    base_sum = [w.clone() for w in circuit.sum_params()]
    p0 = circuit.log_prob(x, missing).exp()

    def flow_with(new_in, new_sum):
        circuit.set_params(new_in, new_sum)
        out = float(((p0 - circuit.log_prob(x, missing).exp()) / p0).sum())
        circuit.set_params(base_in, base_sum)
        return out

    f_in = torch.zeros_like(base_in)
    for idx in zip(*torch.nonzero(circuit.input_valid, as_tuple=True), strict=True):
        for c in range(circuit.num_cats):
            p = base_in.clone()
            p[idx[0], idx[1], c] = 0.0
            f_in[idx[0], idx[1], c] = flow_with(p, base_sum)
    f_sum = []
    for k, m in enumerate(circuit.sum_masks()):
        f = torch.zeros_like(base_sum[k])
        for idx in torch.nonzero(m):
            s = [w.clone() for w in base_sum]
            s[k][tuple(idx)] = 0.0
            f[tuple(idx)] = flow_with(base_in, s)
        f_sum.append(f)
    return f_in, f_sum


def test_em_step_matches_independent_flows_on_batch_of_300():
    circuit = TorchCircuit.from_nodes(
        build_hclt(_data(200, 0), num_cats=C, num_latents=L, seed=1), dtype=torch.float64
    )
    x = _data(300, 5)  # 300 is not a multiple of 128: pyjuice's tail bug would drop 44 samples
    missing = torch.tensor([False, False, True, False])
    pc, step = 0.3, 0.7
    f_in, f_sum = _flows_by_linearity(circuit, x, missing)
    old_in, old_sum = circuit.input_params.clone(), [w.clone() for w in circuit.sum_params()]
    want_ll = float(circuit.log_prob(x, missing).mean())
    ll = em_step(circuit, [x[:128], x[128:256], x[256:]], pseudocount=pc, step_size=step, missing=missing)
    assert abs(ll - want_ll) < 1e-9
    # every sample sends flow 1 through each variable's leaves
    assert torch.allclose(f_in.sum(dim=(1, 2)), torch.full((V,), 300.0, dtype=torch.float64), atol=1e-6)
    new_in = (f_in + pc / C) / (f_in.sum(-1, keepdim=True) + pc)
    want_in = torch.where(circuit.input_valid.unsqueeze(-1), (1 - step) * old_in + step * new_in, old_in)
    assert torch.allclose(circuit.input_params, want_in, atol=1e-9)
    for w, f, m, old in zip(circuit.sum_params(), f_sum, circuit.sum_masks(), old_sum, strict=True):
        nch = m.sum(-1, keepdim=True)
        new = torch.where(m, (f + pc / nch) / (f.sum(-1, keepdim=True) + pc), torch.zeros_like(f))
        assert torch.allclose(w, (1 - step) * old + step * new, atol=1e-9)


def test_em_log_likelihood_never_decreases():
    circuit = TorchCircuit.from_nodes(
        build_hclt(_data(300, 2), num_cats=C, num_latents=L, seed=0), dtype=torch.float64
    )
    x = _data(300, 2)
    lls = [em_step(circuit, [x[:128], x[128:]], pseudocount=0.0) for _ in range(6)]
    assert all(b >= a - 1e-9 for a, b in zip(lls, lls[1:], strict=False))
    assert lls[-1] > lls[0] + 1e-3


def _train(tmp_path: Path, name: str, **kw) -> dict:
    args = dict(num_cats=C, num_latents=L, epochs=3, batch_size=128, pseudocount=0.1, seed=0, progress=False)
    args.update(kw)
    return train_circuit(_data(300, 7), _data(60, 8), out_path=tmp_path / name, **args)


def test_train_save_load_round_trip(tmp_path):
    metrics = _train(tmp_path, "c.jpc")
    assert metrics["backend"] == "torch" and metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert not (tmp_path / "c.jpc.partial.pt").exists()
    circuit = load_circuit(tmp_path / "c.jpc", backend="torch", expect_num_vars=V, expect_num_cats=C)
    valid = _data(60, 8)
    assert abs(float(circuit.log_prob(valid).double().mean()) / V - metrics["heldout_ll_per_var"]) < 1e-6
    save_circuit(circuit, tmp_path / "again.jpc")
    again = load_circuit(tmp_path / "again.jpc", backend="torch")
    assert torch.equal(again.log_prob(valid), circuit.log_prob(valid))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jpc", "c.jpc"]


def _params(path: Path) -> list[torch.Tensor]:
    c = load_circuit(path, backend="torch")
    return [c.input_params, *c.sum_params()]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full = _train(tmp_path, "full.jpc", epochs=4)
    real, calls = training_mod.em_step, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_mod, "em_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "res.jpc", epochs=4)
    assert (tmp_path / "res.jpc.partial.pt").exists() and not (tmp_path / "res.jpc").exists()
    with pytest.raises(CheckpointError, match=r"res\.jpc\.partial\.pt.*pseudocount"):
        _train(tmp_path, "res.jpc", epochs=4, pseudocount=0.5)
    monkeypatch.setattr(training_mod, "em_step", real)
    resumed = _train(tmp_path, "res.jpc", epochs=4)
    assert [h["train_ll_per_var"] for h in resumed["history"]] == [
        h["train_ll_per_var"] for h in full["history"]
    ]
    assert resumed["heldout_ll_per_var"] == full["heldout_ll_per_var"]
    for a, b in zip(_params(tmp_path / "full.jpc"), _params(tmp_path / "res.jpc"), strict=True):
        assert torch.equal(a, b)
    assert not (tmp_path / "res.jpc.partial.pt").exists()


def test_same_seed_same_parameters(tmp_path):
    state = torch.random.get_rng_state()
    a = TorchCircuit.from_nodes(build_hclt(_data(100, 1), num_cats=C, num_latents=L, seed=5))
    b = TorchCircuit.from_nodes(build_hclt(_data(100, 1), num_cats=C, num_latents=L, seed=5))
    c = TorchCircuit.from_nodes(build_hclt(_data(100, 1), num_cats=C, num_latents=L, seed=6))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.input_params, b.input_params) and not torch.equal(a.input_params, c.input_params)
    for x, y in zip(a.sum_params(), b.sum_params(), strict=True):
        assert torch.equal(x, y)


def test_bad_inputs_raise_and_leave_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_circuit(tmp_path / "nope.jpc", backend="torch")
    (tmp_path / "bad.jpc").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"bad\.jpc.*corrupt"):
        load_circuit(tmp_path / "bad.jpc", backend="torch")
    (tmp_path / "bad.jpc").unlink()
    _train(tmp_path, "ok.jpc", epochs=1)
    with pytest.raises(CheckpointError, match="expected a circuit with num_vars=5, found num_vars=4"):
        load_circuit(tmp_path / "ok.jpc", backend="torch", expect_num_vars=5)
    with pytest.raises(CheckpointError, match="num_cats=7, found num_cats=3"):
        load_circuit(tmp_path / "ok.jpc", backend="torch", expect_num_cats=7)
    with pytest.raises(ConfigError, match="auto, torch, pyjuice"):
        resolve_backend("jax")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_backend("pyjuice")
    with pytest.raises(DataError, match=r"train: category ids must lie in \[0, 2\)"):
        _train(tmp_path, "x.jpc", num_cats=2)
    with pytest.raises(ConfigError, match="num_latents"):
        build_hclt(_data(10, 0), num_cats=C, num_latents=0, seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        _train(tmp_path, "x.jpc", batch_size=0)
    with pytest.raises(ConfigError, match="save_circuit"):
        save_circuit(object(), tmp_path / "obj.jpc")
    (tmp_path / "y.jpc.partial.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"y\.jpc\.partial\.pt"):
        _train(tmp_path, "y.jpc")
    (tmp_path / "y.jpc.partial.pt").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jpc"]


def test_input_validation_in_queries(tiny):
    with pytest.raises(DataError, match="x: expected"):
        tiny.log_prob(torch.zeros(2, V + 1, dtype=torch.long))
    with pytest.raises(DataError, match="observed category ids"):
        tiny.log_prob(torch.full((2, V), C))
    miss = torch.tensor([True, False, False, False])
    assert torch.equal(
        tiny.log_prob(torch.tensor([[-1, 0, 1, 2]]), miss), tiny.log_prob(torch.tensor([[0, 0, 1, 2]]), miss)
    )
    with pytest.raises(ConfigError, match="target_vars"):
        tiny.conditional(torch.zeros(1, V, dtype=torch.long), None, [V])


def test_block_size_is_what_pyjuice_sees_and_rules_out_blocks_of_two():
    """pyjuice blocks num_latents by its largest power-of-two divisor; blocks of 2 break its backward."""
    sizes = {
        n: circuit_block_size(build_hclt(_data(200, 0), num_cats=C, num_latents=n, seed=0))
        for n in (1, 2, 4, 6, 12)
    }
    assert sizes == {1: 1, 2: 2, 4: 4, 6: 2, 12: 4}
    assert resolve_backend("torch", 2) == "torch"
    if not torch.cuda.is_available():
        assert resolve_backend("auto", 2) == "torch"


@pytest.mark.gpu
def test_pyjuice_backend_matches_torch_backend_on_cuda(tmp_path):
    # num_latents=4: pyjuice 2.6.3's backward cannot run blocks of 2 (see the test below)
    _train(tmp_path, "g.jpc", backend="torch", epochs=2, num_latents=4)
    ref = load_circuit(tmp_path / "g.jpc", backend="torch", device="cuda")
    pj = load_circuit(tmp_path / "g.jpc", backend="pyjuice")
    x = _data(300, 11).cuda()
    miss = torch.zeros(300, V, dtype=torch.bool, device="cuda")
    miss[:, 1] = True
    soft = torch.rand(300, V, C, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert torch.allclose(pj.log_prob(x).float(), ref.log_prob(x), atol=1e-4)
    assert torch.allclose(pj.log_prob(x, miss, soft).float(), ref.log_prob(x, miss, soft), atol=1e-4)
    assert torch.allclose(pj.conditional(x, miss, [0, 3]), ref.conditional(x, miss, [0, 3]), atol=1e-4)
    assert torch.allclose(pj.conditional(x, miss, [1], soft), ref.conditional(x, miss, [1], soft), atol=1e-4)
    m_pj = _train(tmp_path, "p.jpc", backend="pyjuice", epochs=2, num_latents=4)
    m_t = _train(tmp_path, "t.jpc", backend="torch", epochs=2, num_latents=4)
    assert abs(m_pj["train_ll_per_var"] - m_t["train_ll_per_var"]) < 1e-4


@pytest.mark.gpu
def test_blocks_of_two_run_on_torch_under_auto_and_are_refused_by_pyjuice_on_cuda(tmp_path):
    metrics = _train(tmp_path, "a.jpc", backend="auto", epochs=1)  # L = 2
    assert metrics["backend"] == "torch"
    assert isinstance(load_circuit(tmp_path / "a.jpc", device="cuda"), TorchCircuit)
    with pytest.raises(ConfigError, match="node blocks hold 2"):
        load_circuit(tmp_path / "a.jpc", backend="pyjuice")
    with pytest.raises(ConfigError, match="node blocks hold 2"):
        _train(tmp_path, "b.jpc", backend="pyjuice", epochs=1)
