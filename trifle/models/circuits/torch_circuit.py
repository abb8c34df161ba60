"""Plain-PyTorch execution of the exact circuit pyjuice builds, so the CPU path needs no Triton kernels.

The pyjuice node graph is compiled once into depth-ordered layers:

* one input layer: every Categorical leaf of variable v reads an evidence vector ``E[b, v, :]``
  (one-hot for observed variables, all-ones or soft weights for missing ones), so all leaves of all
  variables are a single batched matmul ``E @ theta^T`` followed by a log;
* product layers: a sum of (index-selected) child log-values;
* sum layers: sum node blocks of equal shape at the same depth are stacked and evaluated together as
  a max-stabilised batched matmul in exp-space, ``m + log(exp(x - m) @ W^T)``.

Conditionals and EM statistics come from one backward pass of autograd: d log Z / d log E gives the
posterior marginal of every variable at once, and theta * d log Z / d theta gives pyjuice's
parameter flows. d log Z / d E itself (``candidate_marginals``) is p(X_v = c, e) / p(e) for every
category c, which is how the planner scores all candidates of an action dimension in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trifle.errors import ConfigError, DataError, TrifleError


@dataclass
class _ProdOp:
    """One product node block: output = sum over children of child values at the given node indices."""

    out: int
    chs: list[int]
    idx: list[torch.Tensor | None]  # None means identity (child has exactly this node layout)


@dataclass
class _SumGroup:
    """Sum node blocks with identical (num_nodes, num_child_nodes) at one depth, evaluated by one bmm."""

    outs: list[int]
    chs: list[list[int]]
    param_index: int  # index into TorchCircuit.sum_params / sum_masks


@dataclass
class _Plan:
    """Static structure of the compiled circuit (no parameters)."""

    num_vars: int
    num_cats: int
    root: int
    input_ops: list[tuple[int, int, int, int]]  # (ns id, var, row offset, num nodes)
    layers: list[list[_ProdOp] | list[_SumGroup]] = field(default_factory=list)
    input_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # ns id -> (var, offset, n)
    sum_slots: dict[int, tuple[int, int]] = field(default_factory=dict)  # ns id -> (group param idx, slot)


def _node_index(edge_ids: torch.Tensor, ch_block_size: int, num_nodes: int, block_size: int) -> torch.Tensor:
    """Expand a product node block's edge ids (block- or node-level) to child node indices per node."""
    if edge_ids.size(0) == num_nodes // block_size:  # block-sparse: block i -> child block edge_ids[i]
        base = edge_ids.long().repeat_interleave(block_size) * ch_block_size
        return base + torch.arange(block_size).repeat(edge_ids.size(0))
    return edge_ids.long()  # sparse: one child node index per product node


def _check_supported(ns) -> None:
    """Refuse node kinds this executor does not implement rather than computing something else."""
    from pyjuice.nodes.distributions import Categorical

    if ns.is_tied():
        raise TrifleError("TorchCircuit: tied (shared) parameters are not supported; rebuild without tying")
    if ns.is_input():
        if type(ns.dist) is not Categorical or len(ns.scope) != 1:
            raise TrifleError(
                f"TorchCircuit: only univariate Categorical inputs are supported, got {ns.dist}"
            )
    elif type(ns).__name__ not in ("SumNodes", "ProdNodes"):
        raise TrifleError(f"TorchCircuit: unsupported node type {type(ns).__name__}")


def _depths(nodes: list, ids: dict) -> list[int]:
    """Longest path from the leaves; nodes of equal depth depend only on shallower ones."""
    depth = [0] * len(nodes)
    for i, ns in enumerate(nodes):
        if not ns.is_input():
            depth[i] = 1 + max(depth[ids[c]] for c in ns.chs)
    return depth


class TorchCircuit(torch.nn.Module):
    """A pyjuice circuit evaluated with ordinary PyTorch ops (log-space, batched, CPU or GPU).

    Parameters are buffers (not ``nn.Parameter``) because they are trained by EM, not by gradient
    descent; autograd is used only to obtain flows and posterior marginals.
    """

    def __init__(
        self, plan: _Plan, input_params: torch.Tensor, input_valid: torch.Tensor, sum_params, sum_masks
    ):
        super().__init__()
        self.plan = plan
        self.register_buffer("input_params", input_params)  # [V, Lmax, C]
        self.register_buffer("input_valid", input_valid)  # [V, Lmax] bool: padding rows are False
        for i, (w, m) in enumerate(zip(sum_params, sum_masks, strict=True)):
            self.register_buffer(f"sum_params_{i}", w)  # [G, N, M] dense, zero where no edge
            self.register_buffer(f"sum_mask_{i}", m)
        self._num_sum_groups = len(sum_params)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_nodes(cls, root_ns, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Compile pyjuice node set ``root_ns`` (parameters must be initialised) into a TorchCircuit."""
        nodes = list(root_ns)  # children before parents
        ids = {ns: i for i, ns in enumerate(nodes)}
        for ns in nodes:
            _check_supported(ns)
        if not nodes[-1].is_sum() or nodes[-1].num_nodes != 1:
            raise TrifleError(
                "TorchCircuit: the root must be a single sum node (pyjuice HCLT with num_root_ns=1)"
            )
        plan, input_params, input_valid = cls._compile_inputs(nodes, ids, dtype)
        plan.root = ids[nodes[-1]]
        sum_params, sum_masks = cls._compile_inner(nodes, ids, plan, dtype)
        circuit = cls(plan, input_params, input_valid, sum_params, sum_masks).to(device)
        circuit.root_ns = root_ns  # kept so the trained parameters can be written back and saved
        return circuit

    @staticmethod
    def _compile_inputs(nodes: list, ids: dict, dtype: torch.dtype):
        """Pack every variable's leaves into rows of one padded [V, Lmax, C] table."""
        inputs = [ns for ns in nodes if ns.is_input()]
        cats = {ns.dist.num_cats for ns in inputs}
        if len(cats) != 1:
            raise TrifleError(f"TorchCircuit: all inputs must share num_cats, found {sorted(cats)}")
        num_cats = cats.pop()
        num_vars = 1 + max(ns.scope.to_list()[0] for ns in inputs)
        rows = [0] * num_vars
        ops = []
        for ns in inputs:
            v = ns.scope.to_list()[0]
            ops.append((ids[ns], v, rows[v], ns.num_nodes))
            rows[v] += ns.num_nodes
        if min(rows) == 0:
            raise TrifleError(
                f"TorchCircuit: variables {[v for v in range(num_vars) if rows[v] == 0]} have no leaf"
            )
        lmax = max(rows)
        params = torch.full((num_vars, lmax, num_cats), 1.0 / num_cats, dtype=torch.float64)
        valid = torch.zeros(num_vars, lmax, dtype=torch.bool)
        for (_, v, off, n), ns in zip(ops, inputs, strict=True):
            if ns.get_params() is None:
                raise TrifleError("TorchCircuit: input parameters are not initialised (call init_parameters)")
            params[v, off : off + n] = ns.get_params().detach().double().reshape(n, num_cats)
            valid[v, off : off + n] = True
        plan = _Plan(num_vars=num_vars, num_cats=num_cats, root=-1, input_ops=ops)
        plan.input_rows = {i: (v, off, n) for i, v, off, n in ops}
        return plan, params.to(dtype), valid

    @staticmethod
    def _compile_inner(nodes: list, ids: dict, plan: _Plan, dtype: torch.dtype):
        """Group inner node blocks into depth-ordered product layers and shape-grouped sum layers."""
        depth = _depths(nodes, ids)
        sum_params, sum_masks = [], []
        for d in range(1, max(depth) + 1):
            prods = [
                _ProdOp(ids[ns], [ids[c] for c in ns.chs], TorchCircuit._prod_indices(ns))
                for ns in nodes
                if depth[ids[ns]] == d and ns.is_prod()
            ]
            if prods:
                plan.layers.append(prods)
            groups: dict[tuple[int, int], list] = {}
            for ns in nodes:
                if depth[ids[ns]] == d and ns.is_sum():
                    groups.setdefault((ns.num_nodes, ns.num_ch_nodes), []).append(ns)
            layer = []
            for members in groups.values():
                k = len(sum_params)
                sum_params.append(torch.stack([TorchCircuit._dense_params(ns) for ns in members]).to(dtype))
                sum_masks.append(torch.stack([TorchCircuit._edge_mask(ns) for ns in members]))
                for slot, ns in enumerate(members):
                    plan.sum_slots[ids[ns]] = (k, slot)
                layer.append(
                    _SumGroup([ids[ns] for ns in members], [[ids[c] for c in ns.chs] for ns in members], k)
                )
            if layer:
                plan.layers.append(layer)
        return sum_params, sum_masks

    @staticmethod
    def _prod_indices(ns) -> list[torch.Tensor | None]:
        idx = []
        for j, c in enumerate(ns.chs):
            e = ns.edge_ids[:, j]
            full = _node_index(e, c.block_size, ns.num_nodes, ns.block_size)
            same = full.numel() == c.num_nodes and torch.equal(full, torch.arange(c.num_nodes))
            idx.append(None if same else full)
        return idx

    @staticmethod
    def _dense_params(ns) -> torch.Tensor:
        if not ns.has_params():
            raise TrifleError("TorchCircuit: sum parameters are not initialised (call init_parameters)")
        return ns.get_params(as_matrix=True).detach().double()

    @staticmethod
    def _edge_mask(ns) -> torch.Tensor:
        nb, bs, cbs = ns.num_node_blocks, ns.block_size, ns.ch_block_size
        blocks = torch.zeros(nb, ns.num_ch_node_blocks, dtype=torch.bool)
        blocks[ns.edge_ids[0].long(), ns.edge_ids[1].long()] = True
        return blocks.repeat_interleave(bs, 0).repeat_interleave(cbs, 1)

    # ------------------------------------------------------------------ properties
    @property
    def num_vars(self) -> int:
        return self.plan.num_vars

    @property
    def num_cats(self) -> int:
        return self.plan.num_cats

    @property
    def num_nodes(self) -> int:
        """Input plus sum nodes: pyjuice's ``TensorCircuit.num_nodes`` convention (products are its
        "elements"), so the number is comparable with pyjuice's own summary."""
        sums = sum(w.size(0) * w.size(1) for w in self.sum_params())
        return int(self.input_valid.sum()) + sums

    @property
    def num_params(self) -> int:
        """Sum-edge weights: pyjuice's ``num_parameters()`` convention (input parameters excluded)."""
        return sum(int(m.sum()) for m in self.sum_masks())

    @property
    def num_input_params(self) -> int:
        """Categorical leaf parameters (num_cats per input node)."""
        return int(self.input_valid.sum()) * self.num_cats

    def sum_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"sum_params_{i}") for i in range(self._num_sum_groups)]

    def sum_masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"sum_mask_{i}") for i in range(self._num_sum_groups)]

    def set_params(self, input_params: torch.Tensor, sum_params: Sequence[torch.Tensor]) -> None:
        """Replace all parameters in place (same shapes); used by EM and checkpoint resume."""
        self.input_params.copy_(input_params)
        for dst, src in zip(self.sum_params(), sum_params, strict=True):
            dst.copy_(src)

    # ------------------------------------------------------------------ evaluation
    def evidence(self, x: torch.Tensor, missing=None, soft_evidence=None) -> torch.Tensor:
        """Per-variable category weights [B, V, C]: one-hot if observed, soft weights (default 1) if missing."""
        x = self._check_x(x)
        b, v, c = x.size(0), self.num_vars, self.num_cats
        miss = self._check_missing(missing, b)
        observed_x = torch.where(miss, torch.zeros_like(x), x)
        bad = (observed_x < 0) | (observed_x >= c)
        if bool(bad.any()):
            raise DataError(f"x: observed category ids must lie in [0, {c}), found {int(observed_x[bad][0])}")
        # zeros + scatter: one pass over [B, V, C], where one_hot + cast + where took three (EM builds this
        # for every mini-batch, and it was a third of train_pc's time).
        onehot = torch.zeros(b, v, c, dtype=self.input_params.dtype, device=x.device)
        onehot.scatter_(2, observed_x.unsqueeze(-1), 1.0)
        if soft_evidence is None:
            return onehot.masked_fill_(miss.unsqueeze(-1), 1.0) if bool(miss.any()) else onehot
        if soft_evidence.shape != (b, v, c):
            raise DataError(f"soft_evidence: expected shape {(b, v, c)}, got {tuple(soft_evidence.shape)}")
        if bool((soft_evidence < 0).any()):
            raise DataError("soft_evidence: weights must be non-negative")
        soft = soft_evidence.to(device=onehot.device, dtype=onehot.dtype)
        return torch.where(miss.unsqueeze(-1), soft, onehot)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.size(1) != self.num_vars:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"x: expected a tensor [batch, {self.num_vars}], got {shape}")
        if x.dtype.is_floating_point:
            raise DataError(f"x: expected integer category ids, got dtype {x.dtype}")
        return x.long().to(self.input_params.device)

    def _check_missing(self, missing, batch: int) -> torch.Tensor:
        dev = self.input_params.device
        if missing is None:
            return torch.zeros(batch, self.num_vars, dtype=torch.bool, device=dev)
        missing = missing.to(device=dev, dtype=torch.bool)
        if missing.shape == (self.num_vars,):
            return missing.unsqueeze(0).expand(batch, -1)
        if missing.shape != (batch, self.num_vars):
            raise DataError(
                f"missing: expected shape [{self.num_vars}] or [{batch}, {self.num_vars}], got {tuple(missing.shape)}"
            )
        return missing

    def forward_evidence(self, ev: torch.Tensor, input_params=None, sum_params=None) -> torch.Tensor:
        """log Z(E) per sample [B] for evidence weights ``ev`` [B, V, C]; parameters may be overridden
        (EM passes leaf tensors that require grad to read flows off autograd)."""
        p_in = self.input_params if input_params is None else input_params
        leaf = torch.bmm(ev.transpose(0, 1), p_in.transpose(1, 2)).log()  # [V, B, Lmax]
        return self._upward(leaf.unbind(0), sum_params)

    def _upward(self, per_var: Sequence[torch.Tensor], sum_params=None) -> torch.Tensor:
        """log Z per sample [B] from the leaves' log-values, one [B, Lmax] tensor per variable.

        Callers pass ``leaf.unbind(0)`` of a [V, B, Lmax] tensor, whose backward is a single stack; indexing
        ``leaf[v]`` once per input node block instead made autograd write a zero-filled [V, B, Lmax]
        gradient per block (half of an EM step's backward on Taxi's 49-variable window).
        """
        p_sum = self.sum_params() if sum_params is None else sum_params
        vals: dict[int, torch.Tensor] = {}
        for i, v, off, n in self.plan.input_ops:
            vals[i] = per_var[v][:, off : off + n]
        for layer in self.plan.layers:
            for op in layer:
                if isinstance(op, _ProdOp):
                    vals[op.out] = self._eval_prod(op, vals)
                else:
                    self._eval_sum_group(op, vals, p_sum[op.param_index])
        return vals[self.plan.root][:, 0]

    @staticmethod
    def _eval_prod(op: _ProdOp, vals: dict) -> torch.Tensor:
        out = None
        for c, ix in zip(op.chs, op.idx, strict=True):
            term = vals[c] if ix is None else vals[c][:, ix]
            out = term if out is None else out + term
        return out

    @staticmethod
    def _eval_sum_group(group: _SumGroup, vals: dict, weights: torch.Tensor) -> None:
        x = torch.stack([torch.cat([vals[c] for c in chs], dim=1) for chs in group.chs])  # [G, B, M]
        m = x.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        y = torch.bmm((x - m).exp(), weights.transpose(1, 2)).log() + m  # [G, B, N]
        for out, values in zip(group.outs, y.unbind(0), strict=True):  # one backward stack (see _upward)
            vals[out] = values

    def log_prob(self, x: torch.Tensor, missing=None, soft_evidence=None) -> torch.Tensor:
        """log p(observed variables, soft evidence on missing ones) per sample, shape [B]."""
        with torch.no_grad():
            return self.forward_evidence(self.evidence(x, missing, soft_evidence))

    def forward(self, x: torch.Tensor, missing=None, soft_evidence=None) -> torch.Tensor:
        return self.log_prob(x, missing, soft_evidence)

    def conditional(
        self, x: torch.Tensor, missing, target_vars: Sequence[int], soft_evidence=None
    ) -> torch.Tensor:
        """p(X_t = c | evidence on the other variables) for every target t, shape [B, T, C], from one
        upward and one downward (autograd) pass; each target is treated as missing."""
        targets = self._check_targets(target_vars)
        own, grad = self._target_gradients(x, missing, targets, soft_evidence)
        post = own * grad
        return post / post.sum(dim=-1, keepdim=True)

    def candidate_marginals(
        self, x: torch.Tensor, missing, target_vars: Sequence[int], soft_evidence=None
    ) -> torch.Tensor:
        """d log Z / dE[t, c] = p(X_t = c, e_{-t}) / p(e) for every category c of every target t, [B, T, C].

        Why one pass gives every candidate: Z(E) is linear in each variable's evidence row E[t, :] (every
        leaf reads one variable, and a decomposable product never multiplies two leaves of the same
        variable), so dZ / dE[t, c] is Z with that row replaced by the one-hot of c, i.e. the joint
        p(X_t = c, e_{-t}) of candidate c with the evidence on the other variables (their soft weights
        included, e.g. "V in the kept levels" as weights on the value variable). One upward and one
        downward pass thus answer what C evidence rows, one per candidate, would. Targets are treated
        as missing and their own soft weights count in Z only: with weights w_t,
        sum_c w_t[c] * out[t, c] = 1, and ``conditional`` is ``w_t * out`` normalised.

        Returned relative to p(e), not as log-joints: log Z itself has float32 rounding of order
        eps * |log Z|, which would not cancel between two evidence rows, while these ratios are as
        precise as ``conditional``'s and the caller's ratios of them never need Z. Only the targets'
        leaves take part in autograd. Evidence of probability zero gives NaN (0/0 in the downward
        pass, as a sum node the evidence makes exactly zero does), which callers treat as no answer.
        """
        targets = self._check_targets(target_vars)
        _, grad = self._target_gradients(x, missing, targets, soft_evidence)
        return grad

    def _target_gradients(
        self, x: torch.Tensor, missing, targets: list[int], soft_evidence
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' evidence rows E[:, targets] [B, T, C] (treated as missing) and d log Z / d them."""
        distinct = list(dict.fromkeys(targets))
        if len(distinct) < len(targets):  # a repeated target: one leaf row, answered once per mention
            own, grad = self._target_gradients(x, missing, distinct, soft_evidence)
            where = [distinct.index(t) for t in targets]
            return own[:, where], grad[:, where]
        x = self._check_x(x)
        miss = self._check_missing(missing, x.size(0)).clone()
        miss[:, targets] = True
        ev = self.evidence(x, miss, soft_evidence)
        p_in = self.input_params
        with torch.no_grad():
            leaf = torch.bmm(ev.transpose(0, 1), p_in.transpose(1, 2)).log()  # [V, B, Lmax]
        own = ev[:, targets, :].clone().requires_grad_(True)
        with torch.enable_grad():
            per_var = list(leaf.unbind(0))  # only the targets' leaves enter autograd
            own_leaf = torch.bmm(own.transpose(0, 1), p_in[targets].transpose(1, 2)).log()
            for t, values in zip(targets, own_leaf.unbind(0), strict=True):
                per_var[t] = values
            logz = self._upward(per_var)
            (grad,) = torch.autograd.grad(logz.sum(), own)
        return own.detach(), grad

    def _check_targets(self, target_vars: Sequence[int]) -> list[int]:
        targets = [int(t) for t in target_vars]
        if not targets or any(t < 0 or t >= self.num_vars for t in targets):
            raise ConfigError(
                f"target_vars: expected a non-empty list of ids in [0, {self.num_vars}), got {targets}"
            )
        return targets

    # ------------------------------------------------------------------ export
    def write_to_nodes(self, root_ns) -> None:
        """Copy the current parameters back into the pyjuice node graph this circuit was compiled from."""
        nodes = list(root_ns)
        ids = {ns: i for i, ns in enumerate(nodes)}
        if len(nodes) - 1 != self.plan.root:
            raise TrifleError("write_to_nodes: node graph does not match the compiled circuit")
        params_in = self.input_params.detach().float().cpu()
        for ns in nodes:
            i = ids[ns]
            if ns.is_input():
                v, off, n = self.plan.input_rows[i]
                ns.set_params(params_in[v, off : off + n].clone(), normalize=False)
            elif ns.is_sum():
                k, slot = self.plan.sum_slots[i]
                dense = getattr(self, f"sum_params_{k}")[slot].detach().float().cpu()
                nb, bs, cbs = ns.num_node_blocks, ns.block_size, ns.ch_block_size
                four = dense.reshape(nb, bs, ns.num_ch_node_blocks, cbs).permute(0, 2, 1, 3)
                ns.set_params(four.contiguous(), normalize=False)
