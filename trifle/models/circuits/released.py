"""Import the Trifle authors' released circuits (``pc-{dataset}.jpc``) into trifle's circuit checkpoints.

The authors' code (github.com/liebenxj/Trifle, ``scripts/plan.py``) loads ``pc-{dataset}.jpc`` with
``pyjuice.io.load`` and pins pyjuice at commit ``293fdc1e`` (2023-10-31). That pyjuice's ``.jpc`` (its
``pyjuice/io/io.py`` and ``io/serialization.py``, unchanged from June to December 2023) is a plain
``pickle.dump`` of a list of dicts, one per node set, children before parents and the root last:

* ``type``: ``"Input"``, ``"Product"`` or ``"Sum"``; ``num_nodes``: the number of nodes in the set;
  ``chs``: a tuple of list indices of the child node sets.
* Product: ``edge_ids``, an integer array ``[num_nodes, num_chs]``; product node i multiplies node
  ``edge_ids[i, j]`` of child j.
* Sum: ``edge_ids``, an integer array ``[2, num_edges]`` of (sum node, child node) pairs, the child node
  counted across the concatenated children; ``params``, one weight per edge, in the same order. The
  children are always Product sets: 2023 pyjuice wraps an input child of a sum in an identity product,
  and that wrapper is itself serialised.
* Input: ``scope``, a list of variable ids; ``dist``, the *bytes* of ``pickle.dumps(distribution)``
  (for ``Categorical`` a state of ``{"num_cats": n}``); ``params``, the flat ``[num_nodes * num_cats]``
  table, row-major by node.
* ``source_node`` (optional): the list index of the set whose parameters a tied set shares.

That version has no node blocks (``block_size`` arrived in 2024), so every edge is one node-level edge.
The file is read here with a restricted unpickler, without that pyjuice: only numpy's array-rebuilding
functions and the ``Categorical`` class are resolved, and anything else stops the import with one line
naming the file. The circuit is then rebuilt as nodes of the installed pyjuice (block sizes chosen so
pyjuice's kernels can run it, see :func:`_block_sizes`) and saved with :func:`save_circuit`, so
:func:`load_circuit` and ``trifle.planning.circuit_queries`` read it like a circuit ``train_pc`` wrote.

Parameters are normalised as 2023 pyjuice's ``TensorCircuit`` did when it compiled the loaded nodes
(``TensorCircuit._init_params``): sum weights as ``(w + 1e-6 / n_children) / (sum w + 1e-6)`` per sum
node, Categorical tables by their row sums. So the imported circuit computes what the authors' planner
computed, up to float rounding.

Variables: the authors' circuits cover one transition (``pc_len == 1`` is asserted in their planner) of
their Trajectory-Transformer tokens, ``obs_dim`` state tokens, ``act_dim`` action tokens, the reward and
the value (reward-to-go) token, which is trifle's ``WindowLayout`` for a window of K = 1, variable for
variable. Nothing is remapped: a circuit whose variable count or ``num_cats`` differs from the task's
window is refused with one line saying how (e.g. the authors' ``halfcheetah-medium-replay-v2`` circuit,
queried with ``vocab_size + 1`` categories, against trifle's K = 1 windows, which have no pad category).
Whether the tokens *mean* the same thing (the same discretisation of the same D4RL data) cannot be seen
in the file; the caller vouches for that.
"""

from __future__ import annotations

import argparse
import io
import pickle
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.errors import CheckpointError
from trifle.io import sha256_of, write_json

from .backend import save_circuit

#: The pyjuice commit the authors' README pins (git checkout 293fdc1e...), whose .jpc format is read here.
LEGACY_PYJUICE_COMMIT = "293fdc1e2f7967df4f981880e38ad5ca187bcbc7"
#: 2023 ``TensorCircuit._init_params`` normalised sum weights with this pseudocount when compiling.
LEGACY_SUM_PSEUDOCOUNT = 1e-6
NODE_TYPES = ("Input", "Product", "Sum")


@dataclass(frozen=True)
class LegacyNode:
    """One node set of a 2023 .jpc, as plain data (arrays checked for shape and kind)."""

    kind: str
    num_nodes: int
    chs: tuple[int, ...]
    edge_ids: np.ndarray | None = None
    params: np.ndarray | None = None
    var: int | None = None
    num_cats: int | None = None


class _LegacyCategorical:
    """Stands in for 2023 ``pyjuice.nodes.distributions.categorical.Categorical`` while unpickling."""

    num_cats: Any = None

    def __setstate__(self, state):
        self.num_cats = state.get("num_cats") if isinstance(state, dict) else None


class _Refused(Exception):
    """A pickle asked for a global outside the allowed set."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's array-rebuilding functions, under the module names numpy 1.x and 2.x write into pickles."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x before numpy._core existed
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            table[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


_CATEGORICAL = {
    ("pyjuice.nodes.distributions.categorical", "Categorical"): _LegacyCategorical,
    ("pyjuice.nodes.distributions", "Categorical"): _LegacyCategorical,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed``; any other class or function is refused, not imported."""

    def __init__(self, data: bytes, allowed: dict[tuple[str, str], Any]):
        super().__init__(io.BytesIO(data))
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _unpickle(path: Path, data: bytes, allowed: dict, what: str):
    try:
        return _RestrictedUnpickler(data, allowed).load()
    except _Refused as exc:
        raise CheckpointError(
            f"{path}: {what} refers to {exc}, which a 2023 pyjuice .jpc does not contain (it holds only "
            "numpy arrays and Categorical distributions); refusing to load it"
        ) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{path}: cannot read {what}: the file is truncated or not a pickle ({_one_line(exc)})"
        ) from None


def read_released_jpc(path: str | Path) -> list[LegacyNode]:
    """Parse a .jpc written by 2023 pyjuice (commit 293fdc1e) into checked :class:`LegacyNode` records."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: circuit file not found")
    raw = _unpickle(path, path.read_bytes(), _numpy_globals(), "the node list")
    if not isinstance(raw, list) or not raw:
        raise CheckpointError(
            f"{path}: expected a pickled non-empty list of node dicts (2023 pyjuice .jpc), got {type(raw).__name__}"
        )
    nodes = []
    for i, info in enumerate(raw):
        try:
            nodes.append(_parse_node(path, i, info, nodes))
        except CheckpointError:
            raise
        except Exception as exc:  # malformed fields: report which node, in one line
            raise CheckpointError(f"{path}: node set {i}: malformed entry ({_one_line(exc)})") from None
    return nodes


def _int_array(path: Path, i: int, value, shape_ok, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or not shape_ok(arr.shape):
        raise CheckpointError(f"{path}: node set {i}: bad {what} (dtype {arr.dtype}, shape {arr.shape})")
    return arr.astype(np.int64)


def _float_array(path: Path, i: int, value, size: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.size != size:
        raise CheckpointError(
            f"{path}: node set {i}: {what} has {arr.size} entries of dtype {arr.dtype}, expected {size} numbers"
        )
    arr = arr.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)) or bool((arr < 0).any()):
        raise CheckpointError(f"{path}: node set {i}: {what} holds negative or non-finite values")
    return arr


def _parse_node(path: Path, i: int, info, done: list[LegacyNode]) -> LegacyNode:
    if not isinstance(info, dict) or info.get("type") not in NODE_TYPES:
        raise CheckpointError(f"{path}: node set {i}: expected a dict with type in {NODE_TYPES}")
    if "source_node" in info:
        raise CheckpointError(
            f"{path}: node set {i} shares (ties) the parameters of node set {info['source_node']}; tied "
            "circuits are not supported (TorchCircuit has no tying, and the authors' HCLTs do not tie)"
        )
    kind, n = info["type"], int(info["num_nodes"])
    chs = tuple(int(c) for c in info["chs"])
    if n < 1 or any(not 0 <= c < i for c in chs):
        raise CheckpointError(f"{path}: node set {i}: num_nodes {n} or children {chs} out of range")
    if kind == "Input":
        if chs:
            raise CheckpointError(f"{path}: node set {i}: an input node set has children")
        scope = [int(v) for v in info["scope"]]
        dist = _unpickle(path, bytes(info["dist"]), _CATEGORICAL, f"node set {i}'s distribution")
        if len(scope) != 1 or scope[0] < 0:
            raise CheckpointError(
                f"{path}: node set {i}: only univariate inputs are supported, scope {scope}"
            )
        if (
            not isinstance(dist, _LegacyCategorical)
            or not isinstance(dist.num_cats, int)
            or dist.num_cats < 2
        ):
            raise CheckpointError(f"{path}: node set {i}: expected a Categorical with num_cats >= 2")
        if "params" not in info:
            raise CheckpointError(f"{path}: node set {i}: input parameters are missing")
        params = _float_array(path, i, info["params"], n * dist.num_cats, "the Categorical table")
        return LegacyNode(
            kind, n, chs, params=params.reshape(n, dist.num_cats), var=scope[0], num_cats=dist.num_cats
        )
    if not chs:
        raise CheckpointError(f"{path}: node set {i}: a {kind} node set has no children")
    ch_sizes = [done[c].num_nodes for c in chs]
    if kind == "Product":
        e = _int_array(path, i, info["edge_ids"], lambda s: s == (n, len(chs)), "product edge_ids")
        if bool((e < 0).any()) or any(bool((e[:, j] >= m).any()) for j, m in enumerate(ch_sizes)):
            raise CheckpointError(f"{path}: node set {i}: product edge ids point outside their children")
        return LegacyNode(kind, n, chs, edge_ids=e)
    if any(done[c].kind != "Product" for c in chs):
        raise CheckpointError(f"{path}: node set {i}: a sum node set's children must be product node sets")
    e = _int_array(path, i, info["edge_ids"], lambda s: len(s) == 2 and s[0] == 2, "sum edge_ids")
    m = sum(ch_sizes)
    if bool((e < 0).any()) or bool((e[0] >= n).any()) or bool((e[1] >= m).any()):
        raise CheckpointError(
            f"{path}: node set {i}: sum edge ids point outside the node set or its children"
        )
    if np.unique(e[0] * m + e[1]).size != e.shape[1] or np.unique(e[0]).size != n:
        raise CheckpointError(f"{path}: node set {i}: repeated sum edges, or a sum node without edges")
    if "params" not in info:
        raise CheckpointError(f"{path}: node set {i}: sum parameters are missing")
    params = _float_array(path, i, info["params"], e.shape[1], "the sum weights")
    return LegacyNode(kind, n, chs, edge_ids=e, params=params)


def circuit_shape(nodes: list[LegacyNode], path: str | Path = "circuit") -> tuple[int, int]:
    """``(num_vars, num_cats)``, checking every variable 0..num_vars-1 has leaves and num_cats is shared."""
    inputs = [nd for nd in nodes if nd.kind == "Input"]
    if not inputs:
        raise CheckpointError(f"{path}: the circuit has no input node sets")
    cats = sorted({nd.num_cats for nd in inputs})
    if len(cats) != 1:
        raise CheckpointError(f"{path}: the inputs do not share one num_cats, found {cats}")
    covered = {nd.var for nd in inputs}
    num_vars = 1 + max(covered)
    if len(covered) != num_vars:
        missing = sorted(set(range(num_vars)) - covered)
        raise CheckpointError(
            f"{path}: variables {missing} have no leaves; variables must be 0..{num_vars - 1}"
        )
    if nodes[-1].kind != "Sum" or nodes[-1].num_nodes != 1:
        raise CheckpointError(f"{path}: the root (last node set) must be a single sum node")
    return num_vars, cats[0]


def _pow2_part(k: int) -> int:
    return k & -k


def _block_sizes(nodes: list[LegacyNode]) -> list[int]:
    """One power-of-two block size per node set for the installed pyjuice's block-structured nodes.

    The largest power of two dividing every non-root set's size (an HCLT's ``num_latents``), provided
    every product is block-diagonal and every sum's edges fill whole blocks under it (true of an HCLT:
    identity products, dense latent-to-latent sums); otherwise 1 everywhere, which any circuit fits.
    The block size changes only the speed of pyjuice's kernels, never the function computed.
    """
    sizes = [nd.num_nodes for nd in nodes[:-1]] or [nodes[-1].num_nodes]
    big = _pow2_part(gcd(*sizes))
    bs = [gcd(big, nd.num_nodes) for nd in nodes]
    if big > 1 and all(_fits(nd, b, [bs[c] for c in nd.chs], nodes) for nd, b in zip(nodes, bs, strict=True)):
        return bs
    return [1] * len(nodes)


def _fits(nd: LegacyNode, b: int, ch_bs: list[int], nodes: list[LegacyNode]) -> bool:
    if nd.kind == "Input":
        return True
    if nd.kind == "Product":
        if any(c != b for c in ch_bs):
            return False
        e = nd.edge_ids.reshape(nd.num_nodes // b, b, -1)
        first = e[:, :1, :]
        return bool((first % b == 0).all()) and bool((e == first + np.arange(b)[None, :, None]).all())
    cb = ch_bs[0]
    if any(c != cb for c in ch_bs):
        return False
    m = sum(nodes[c].num_nodes for c in nd.chs)
    _, counts = np.unique((nd.edge_ids[0] // b) * (m // cb) + nd.edge_ids[1] // cb, return_counts=True)
    return bool((counts == b * cb).all())


def _normalised(nd: LegacyNode) -> np.ndarray:
    """Parameters as 2023 ``TensorCircuit._init_params`` normalised them (module docstring)."""
    if nd.kind == "Input":
        rows = nd.params.sum(axis=1, keepdims=True)
        return nd.params / np.where(rows > 0, rows, 1.0)
    parent = nd.edge_ids[0]
    totals = np.bincount(parent, weights=nd.params, minlength=nd.num_nodes)
    nchs = np.bincount(parent, minlength=nd.num_nodes)
    p = LEGACY_SUM_PSEUDOCOUNT
    return (nd.params + p / nchs[parent]) / (totals[parent] + p)


def to_pyjuice_nodes(nodes: list[LegacyNode]):
    """Rebuild the circuit as nodes of the installed pyjuice (parameters set, root returned)."""
    from pyjuice.nodes import inputs, multiply, summate
    from pyjuice.nodes.distributions import Categorical

    bs = _block_sizes(nodes)
    built = []
    for nd, b in zip(nodes, bs, strict=True):
        params = _normalised(nd) if nd.params is not None else None
        if nd.kind == "Input":
            ns = inputs(
                nd.var,
                num_node_blocks=nd.num_nodes // b,
                block_size=b,
                dist=Categorical(num_cats=nd.num_cats),
            )
            ns.set_params(torch.from_numpy(params).float(), normalize=False)
        elif nd.kind == "Product":
            chs = [built[c] for c in nd.chs]
            ns = multiply(*chs, edge_ids=torch.from_numpy(nd.edge_ids[::b] // b))
        else:
            chs = [built[c] for c in nd.chs]
            cb = bs[nd.chs[0]]
            m = sum(nodes[c].num_nodes for c in nd.chs)
            block_edges = np.unique(np.stack([nd.edge_ids[0] // b, nd.edge_ids[1] // cb]), axis=1)
            ns = summate(
                *chs, num_node_blocks=nd.num_nodes // b, block_size=b, edge_ids=torch.from_numpy(block_edges)
            )
            dense = np.zeros((nd.num_nodes, m))
            dense[nd.edge_ids[0], nd.edge_ids[1]] = params
            dense = dense.reshape(nd.num_nodes // b, b, m // cb, cb).transpose(0, 2, 1, 3)
            ns.set_params(torch.from_numpy(np.ascontiguousarray(dense)).float(), normalize=False)
        built.append(ns)
    return built[-1]


def transition_layout(obs_dim: int, act_dim: int) -> list[str]:
    """Names of one transition's tokens in trifle's (and the authors') order."""
    return [f"obs{j}" for j in range(obs_dim)] + [f"act{j}" for j in range(act_dim)] + ["reward", "value"]


def check_layout(
    path: str | Path,
    num_vars: int,
    num_cats: int,
    *,
    obs_dim: int,
    act_dim: int,
    vocab_size: int,
    window: int,
) -> None:
    """Refuse, in one line, a circuit whose variables or categories are not trifle's K-transition window."""
    from trifle.data.circuit_windows import circuit_num_cats

    dim = obs_dim + act_dim + 2
    if num_vars != window * dim:
        raise CheckpointError(
            f"{path}: the circuit covers {num_vars} variables but trifle's window of {window} transition(s) of "
            f"{obs_dim} state + {act_dim} action + reward + value tokens has {window * dim}; nothing is remapped"
        )
    want = circuit_num_cats(vocab_size, window)
    if num_cats != want:
        extra = (
            " (one category more than the tokens: the authors' extra category, e.g. their "
            "halfcheetah-medium-replay-v2 circuit; a K = 1 window has no pad category)"
            if num_cats == vocab_size + 1 and window == 1
            else ""
        )
        raise CheckpointError(
            f"{path}: the circuit has num_cats={num_cats} but trifle's windows of K={window} with "
            f"vocab_size={vocab_size} need num_cats={want}{extra}"
        )


def import_released_circuit(
    src: str | Path, out: str | Path, *, obs_dim: int, act_dim: int, vocab_size: int, window: int = 1
) -> dict[str, Any]:
    """Read the authors' ``src`` (.jpc, 2023 pyjuice), check it fits trifle's window, write ``out`` (.jpc).

    Beside ``out`` goes ``<stem>.source.json``: where the circuit came from (path, sha256, format) and
    the layout it was checked against. Returns that record.
    """
    src, out = Path(src), Path(out)
    nodes = read_released_jpc(src)
    num_vars, num_cats = circuit_shape(nodes, src)
    check_layout(
        src, num_vars, num_cats, obs_dim=obs_dim, act_dim=act_dim, vocab_size=vocab_size, window=window
    )
    save_circuit(to_pyjuice_nodes(nodes), out)
    record = {
        "source": str(src),
        "source_sha256": sha256_of(src),
        "source_format": f"pyjuice .jpc (io.serialization) at commit {LEGACY_PYJUICE_COMMIT}",
        "num_vars": num_vars,
        "num_cats": num_cats,
        "window": window,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "vocab_size": vocab_size,
        "variables": transition_layout(obs_dim, act_dim) * window,
        "block_size": max(_block_sizes(nodes)),
        "sum_pseudocount": LEGACY_SUM_PSEUDOCOUNT,
    }
    write_json(out.with_name(f"{out.stem}.source.json"), record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the authors' pc-{dataset}.jpc")
    parser.add_argument("out", type=Path, help="trifle circuit to write (.jpc)")
    parser.add_argument("--obs-dim", type=int, required=True)
    parser.add_argument("--act-dim", type=int, required=True)
    parser.add_argument("--vocab-size", type=int, required=True, help="token categories per variable")
    parser.add_argument("--window", type=int, default=1, help="transitions per circuit window (K)")
    args = parser.parse_args(argv)
    record = import_released_circuit(
        args.src,
        args.out,
        obs_dim=args.obs_dim,
        act_dim=args.act_dim,
        vocab_size=args.vocab_size,
        window=args.window,
    )
    print(f"{args.out}: {record['num_vars']} variables, num_cats={record['num_cats']} (from {args.src})")


if __name__ == "__main__":
    main()
