"""Importing circuits in the Trifle authors' format: pyjuice's .jpc as of commit 293fdc1e (2023-10-31).

The files are written here the way that pyjuice wrote them (``io.save`` -> ``serialize_nodes`` ->
``pickle.dump`` of a list of node dicts, Python 3.8's default protocol 4), including the module names
its pickles name: ``numpy.core.multiarray._reconstruct`` (numpy 1.x) and
``pyjuice.nodes.distributions.categorical.Categorical``. The circuit is a small HCLT built as 2023
pyjuice's ``BayesianTreeToHiddenRegionGraph`` built it, with random *unnormalised* parameters. The
imported circuit's probabilities are checked against brute-force enumeration computed here from the
same parameters, normalised as 2023 ``TensorCircuit._init_params`` normalised them.
"""

from __future__ import annotations

import io
import itertools
import json
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from trifle.errors import CheckpointError
from trifle.models.circuits import load_circuit
from trifle.models.circuits.released import import_released_circuit, read_released_jpc
from trifle.planning.circuit_queries import WindowLayout, value_distribution

OBS_DIM, ACT_DIM, NUM_CATS, NUM_LATENTS = 2, 1, 3, 4
NUM_VARS = OBS_DIM + ACT_DIM + 2  # one transition: s0 s1 a r v
# Chow-Liu tree over the 5 variables, rooted at its centre (variable 2), as children lists.
TREE = {2: [0, 3], 0: [1], 3: [4], 1: [], 4: []}
ROOT = 2


class Node:
    """A 2023 node set, as plain attributes (what serialize_nodes read from pyjuice's objects)."""

    def __init__(self, kind, num_nodes, chs=(), edge_ids=None, params=None, var=None):
        self.kind, self.num_nodes, self.chs = kind, num_nodes, list(chs)
        self.edge_ids, self.params, self.var = edge_ids, params, var


def full_edges(n: int, m: int) -> np.ndarray:
    """2023 SumNodes._construct_edges with edge_ids=None: every (node, child node) pair, node-major."""
    return np.stack([np.repeat(np.arange(n), m), np.tile(np.arange(m), n)]).astype(np.int64)


def hclt_2023(rng: np.random.Generator) -> Node:
    """2023 BayesianTreeToHiddenRegionGraph over TREE: leaves are inputs, inner variables a product of
    their children's sums (or inputs) and their own inputs under a sum; unnormalised parameters."""

    def leaf(v):
        return Node("Input", NUM_LATENTS, var=v, params=rng.uniform(0.1, 2.0, NUM_LATENTS * NUM_CATS))

    def build(v):
        if not TREE[v]:
            return leaf(v)
        chs = [build(c) for c in TREE[v]] + [leaf(v)]
        prod = Node("Product", NUM_LATENTS, chs, np.tile(np.arange(NUM_LATENTS)[:, None], (1, len(chs))))
        n = 1 if v == ROOT else NUM_LATENTS
        e = full_edges(n, NUM_LATENTS)
        return Node("Sum", n, [prod], e, rng.uniform(0.1, 2.0, e.shape[1]))

    return build(ROOT)


def sparse_mixture(rng: np.random.Generator) -> Node:
    """A non-HCLT circuit with sparse sum edges and a sum directly over inputs (2023 pyjuice wraps such an
    input in an identity product, which is serialised too), so no node blocks fit."""
    ins = [Node("Input", 3, var=v, params=rng.uniform(0.1, 2.0, 3 * NUM_CATS)) for v in range(NUM_VARS)]
    wrapped = Node("Product", 3, [ins[0]], np.arange(3)[:, None])
    s0 = Node("Sum", 2, [wrapped], np.array([[0, 0, 1], [0, 2, 1]]), rng.uniform(0.1, 2.0, 3))
    prod = Node("Product", 2, [s0, *ins[1:]], np.array([[0, 1, 2, 0, 1], [1, 0, 0, 2, 2]]))
    return Node("Sum", 1, [prod], full_edges(1, 2), rng.uniform(0.1, 2.0, 2))


def postorder(root: Node) -> list[Node]:
    """2023 pyjuice's node_iterator: depth-first, children in order, each node set after its children."""
    seen, out = set(), []

    def dfs(ns):
        if id(ns) in seen:
            return
        seen.add(id(ns))
        for c in ns.chs:
            dfs(c)
        out.append(ns)

    dfs(root)
    return out


@contextmanager
def pickling_as_in_2023(numpy_style: str):
    """Make pickle write the globals a 2023 environment wrote: pyjuice's Categorical class and, for
    numpy 1.x, ``numpy.core.multiarray._reconstruct``. Both are stand-ins in temporary modules."""
    import pyjuice  # noqa: F401  (the real package is imported first, so the stand-in cannot shadow it)

    cat_mod = types.ModuleType("pyjuice.nodes.distributions.categorical")

    class Categorical:
        def __init__(self, num_cats):
            self.num_cats = num_cats

        def __getstate__(self):  # as 2023's Categorical.__getstate__
            return {"num_cats": self.num_cats}

    Categorical.__module__, Categorical.__qualname__ = cat_mod.__name__, "Categorical"
    cat_mod.Categorical = Categorical
    np_mod = types.ModuleType("numpy.core.multiarray")

    def _reconstruct(*args):
        raise AssertionError("never called: stands in for numpy 1.x's function while pickling")

    _reconstruct.__module__, _reconstruct.__qualname__ = np_mod.__name__, "_reconstruct"
    np_mod._reconstruct = _reconstruct

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if numpy_style == "numpy1" and type(obj) is np.ndarray:
                _, args, state = obj.__reduce__()
                return _reconstruct, args, state
            return NotImplemented

    patched = {cat_mod.__name__: cat_mod}
    if numpy_style == "numpy1":
        patched[np_mod.__name__] = np_mod
    saved = {name: sys.modules.get(name) for name in patched}
    sys.modules.update(patched)
    try:
        yield Categorical, Pickler
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def dumps_2023(obj, pickler_cls) -> bytes:
    buf = io.BytesIO()
    pickler_cls(buf, protocol=4).dump(obj)
    return buf.getvalue()


def serialize_2023(root: Node, numpy_style: str = "numpy1") -> bytes:
    """2023 serialize_nodes + io.save: one dict per node set in node_iterator order, arrays as numpy
    (float32 parameters, int64 edge ids, as ``tensor.detach().cpu().numpy()`` gave), the distribution
    as nested pickle bytes."""
    nodes = postorder(root)
    ids = {id(ns): i for i, ns in enumerate(nodes)}
    with pickling_as_in_2023(numpy_style) as (Categorical, Pickler):
        out = []
        for ns in nodes:
            info = {"type": ns.kind, "num_nodes": ns.num_nodes, "chs": tuple(ids[id(c)] for c in ns.chs)}
            if ns.kind != "Input":
                info["edge_ids"] = np.asarray(ns.edge_ids, dtype=np.int64)
            if ns.params is not None:
                info["params"] = np.asarray(ns.params, dtype=np.float32)
            if ns.kind == "Input":
                info["scope"] = [ns.var]
                info["dist"] = dumps_2023(Categorical(NUM_CATS), Pickler)
            out.append(info)
        return dumps_2023(out, Pickler)


# ----------------------------------------------------------------------------- independent reference


def normalised_2023(ns: Node) -> np.ndarray:
    """2023 TensorCircuit._init_params: sum weights (w + 1e-6/n_ch) / (sum w + 1e-6); input rows / sum."""
    p = np.asarray(ns.params, dtype=np.float32).astype(np.float64)
    if ns.kind == "Input":
        p = p.reshape(ns.num_nodes, NUM_CATS)
        return p / p.sum(axis=1, keepdims=True)
    out = np.empty_like(p)
    for node in range(ns.num_nodes):
        sel = ns.edge_ids[0] == node
        out[sel] = (p[sel] + 1e-6 / sel.sum()) / (p[sel].sum() + 1e-6)
    return out


def brute_joint(root: Node) -> np.ndarray:
    """p(x) for every one of the NUM_CATS**NUM_VARS assignments, by evaluating the node-level circuit."""
    xs = np.array(list(itertools.product(range(NUM_CATS), repeat=NUM_VARS)))
    memo = {}

    def value(ns):  # [A, num_nodes]
        if id(ns) in memo:
            return memo[id(ns)]
        if ns.kind == "Input":
            v = normalised_2023(ns)[:, xs[:, ns.var]].T
        elif ns.kind == "Product":
            v = np.ones((len(xs), ns.num_nodes))
            for j, c in enumerate(ns.chs):
                v = v * value(c)[:, ns.edge_ids[:, j]]
        else:
            chv = np.concatenate([value(c) for c in ns.chs], axis=1)
            w = normalised_2023(ns)
            v = np.zeros((len(xs), ns.num_nodes))
            for e in range(ns.edge_ids.shape[1]):
                v[:, ns.edge_ids[0, e]] += w[e] * chv[:, ns.edge_ids[1, e]]
        memo[id(ns)] = v
        return v

    return value(root)[:, 0].reshape((NUM_CATS,) * NUM_VARS)


def brute_marginal(joint: np.ndarray, x: np.ndarray, missing: np.ndarray) -> float:
    idx = tuple(slice(None) if m else int(v) for v, m in zip(x, missing, strict=True))
    return float(joint[idx].sum())


# ----------------------------------------------------------------------------- tests


def write(tmp_path: Path, root: Node, numpy_style: str = "numpy1") -> Path:
    src = tmp_path / "pc-toy-medium-v2.jpc"
    src.write_bytes(serialize_2023(root, numpy_style))
    return src


def do_import(src: Path, tmp_path: Path, **kw) -> Path:
    out = tmp_path / "checkpoints" / "pc" / "seed0.jpc"
    args = {"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "vocab_size": NUM_CATS, **kw}
    import_released_circuit(src, out, **args)
    return out


@pytest.mark.parametrize(
    ("builder", "numpy_style", "block"),
    [(hclt_2023, "numpy1", NUM_LATENTS), (hclt_2023, "numpy2", NUM_LATENTS), (sparse_mixture, "numpy1", 1)],
)
def test_imported_circuit_matches_brute_force(tmp_path, builder, numpy_style, block):
    root = builder(np.random.default_rng(0))
    src = write(tmp_path, root, numpy_style)
    out = do_import(src, tmp_path)
    joint = brute_joint(root)
    assert abs(joint.sum() - 1.0) < 1e-9
    circuit = load_circuit(
        out, backend="torch", device="cpu", expect_num_vars=NUM_VARS, expect_num_cats=NUM_CATS
    )
    assert max(ns.block_size for ns in circuit.root_ns) == block

    # every full assignment
    xs = torch.tensor(list(itertools.product(range(NUM_CATS), repeat=NUM_VARS)))
    got = circuit.log_prob(xs).double().exp().numpy()
    np.testing.assert_allclose(got, joint.reshape(-1), atol=1e-5, rtol=1e-4)

    # marginals: every assignment under every missing pattern
    rows, masks, want = [], [], []
    for pattern in itertools.product([False, True], repeat=NUM_VARS):
        for x in xs[:: 7 if any(pattern) else 1]:
            rows.append(x)
            masks.append(pattern)
            want.append(brute_marginal(joint, x.numpy(), np.array(pattern)))
    got = circuit.log_prob(torch.stack(rows), torch.tensor(masks)).double().exp().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)

    # conditionals p(X_t | observed), for every single target and every assignment of the others
    for t in range(NUM_VARS):
        missing = torch.zeros(len(xs), NUM_VARS, dtype=torch.bool)
        missing[:, t] = True
        cond = circuit.conditional(xs, missing, [t])[:, 0].double().numpy()
        want = np.empty_like(cond)
        for i, x in enumerate(xs.tolist()):
            x[t] = slice(None)
            want[i] = joint[tuple(x)] / joint[tuple(x)].sum()
        np.testing.assert_allclose(cond, want, atol=1e-5)


def test_planner_value_query_on_imported_circuit(tmp_path):
    """The planner's value query, p(value | state) with action, reward and value missing, as Trifle asks it."""
    root = hclt_2023(np.random.default_rng(1))
    out = do_import(write(tmp_path, root), tmp_path)
    circuit = load_circuit(out, backend="torch", device="cpu")
    layout = WindowLayout(obs_dim=OBS_DIM, act_dim=ACT_DIM, window=1, num_cats=NUM_CATS)
    obs = torch.tensor(list(itertools.product(range(NUM_CATS), repeat=OBS_DIM)))
    x, missing = layout.evidence(obs)
    got = value_distribution(circuit, x, missing, layout.value_var(0), NUM_CATS).numpy()
    joint = brute_joint(root).sum(axis=(2, 3))  # p(s0, s1, v)
    want = joint.reshape(-1, NUM_CATS) / joint.reshape(-1, NUM_CATS).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_import_records_its_source(tmp_path):
    src = write(tmp_path, hclt_2023(np.random.default_rng(2)))
    out = do_import(src, tmp_path)
    record = json.loads(out.with_name("seed0.source.json").read_text())
    assert record["num_vars"] == NUM_VARS and record["num_cats"] == NUM_CATS and record["window"] == 1
    assert record["variables"] == ["obs0", "obs1", "act0", "reward", "value"]
    assert record["source_format"].endswith("293fdc1e2f7967df4f981880e38ad5ca187bcbc7")
    kinds = [nd.kind for nd in read_released_jpc(src)]  # 5 inputs; a product and a sum per inner variable
    assert kinds.count("Input") == 5 and kinds.count("Product") == 3 and kinds.count("Sum") == 3
    assert kinds[-1] == "Sum"


def one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_file_is_one_line(tmp_path):
    src = write(tmp_path, hclt_2023(np.random.default_rng(3)))
    src.write_bytes(src.read_bytes()[:-40])
    with pytest.raises(CheckpointError) as excinfo:
        do_import(src, tmp_path)
    one_line_error(excinfo, str(src), "truncated")


def test_foreign_pickle_class_is_refused_without_running_it(tmp_path):
    src = tmp_path / "pc-evil.jpc"
    src.write_bytes(pickle.dumps([{"type": "Input", "payload": Path("x")}], protocol=4))
    with pytest.raises(CheckpointError) as excinfo:
        do_import(src, tmp_path)
    one_line_error(excinfo, str(src), "pathlib", "refusing")

    # inside a node's nested distribution pickle too (e.g. another distribution or arbitrary code)
    data = pickle.loads(serialize_2023(hclt_2023(np.random.default_rng(4)), "numpy2"))
    data[0]["dist"] = pickle.dumps(print)
    src.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(CheckpointError) as excinfo:
        do_import(src, tmp_path)
    one_line_error(excinfo, str(src), "builtins.print", "node set 0")


def test_variable_count_mismatch_is_one_line(tmp_path):
    src = write(tmp_path, hclt_2023(np.random.default_rng(5)))
    with pytest.raises(CheckpointError) as excinfo:
        do_import(src, tmp_path, obs_dim=3)
    one_line_error(excinfo, str(src), "covers 5 variables", "has 6")
    with pytest.raises(CheckpointError) as excinfo:
        do_import(src, tmp_path, vocab_size=NUM_CATS - 1)
    one_line_error(excinfo, "num_cats=3", "one category more")
    assert not (tmp_path / "checkpoints" / "pc" / "seed0.jpc").exists()
