"""Latent variable distillation (LVD): initialise an HCLT from clustered masked-LM embeddings.

The paper initialises its HCLT with LVD (Liu, Zhang & Van den Broeck, ICLR 2023; docs/paper.md#circuit).
The recipe, as implemented here (docs/circuits.md, "Latent variable distillation"):

1. **Which latent governs which variables.** pyjuice's HCLT (``BayesianTreeToHiddenRegionGraph``) gives
   every *inner* node v of the Chow-Liu tree one product node block of ``num_latents`` nodes: product j
   multiplies leaf j of X_v, leaf j of every *tree-leaf* child c (a tree leaf gets no latent of its own:
   its leaves hang directly below the parent's latent) and sum node j of every inner child. So a latent
   Z_v is one product block, its value is the product index j, and it governs the group
   {X_v} + {tree-leaf children of v}. The sum block of an inner child u holds p(Z_u | Z_v) (rows: the
   parent's value, columns: the child's); the single root sum node holds p(Z_root). This map is read off
   the node graph (:func:`latent_structure`), not assumed.
2. **Embeddings.** A small BERT-like transformer (:class:`MaskedLM`) is trained as a masked language
   model on the training rows (each token masked with probability :data:`MASK_PROB`, the loss on masked
   positions only) with the project's loop (``trifle.models.training_loop.run_training``). For latent
   Z_v the group's positions are replaced by [MASK], all other variables are given, and the last layer's
   outputs at the group's positions, concatenated, are Z_v's embedding of that row (the paper: "reading
   out the last layer at a subset of variables while the other variables are given as input").
3. **Clusters.** k-means (k-means++ seeding, Lloyd iterations) of each latent's embeddings into
   ``num_latents`` clusters; the cluster index is the row's value of Z_v.
4. **Supervised estimate.** With every Z observed, the circuit's maximum-likelihood parameters are
   counts: p(x_v | z) for every leaf, p(z_u | z_v) for every inner sum block, p(z_root) at the root,
   smoothed with pyjuice's pseudocount rule (exactly one EM M-step whose flows are these hard counts).
   Full-batch EM on the observed variables then continues from there (``training.train_circuit``).

Embeddings, clusters and counts use at most ``samples`` training rows (evenly spaced, so no RNG), which
bounds the cost of step 2 at one masked forward pass per (row, latent); EM then uses every row. Everything
is a function of the seed: the model's initial weights, each step's batch and mask, and the k-means seeding.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trifle.errors import ConfigError, TrifleError
from trifle.models.training_common import adamw, batch_indices, derived_seed, eval_subset, seeded
from trifle.models.training_loop import TrainingJob, optimizer_step, run_training

from .torch_circuit import TorchCircuit, _ProdOp

#: The one setting used for every task (docs/circuits.md, "Latent variable distillation"): a 2-layer,
#: 32-wide masked LM trained for 500 steps of 256 rows, embeddings and k-means on at most 10,000 rows,
#: sized so that LVD costs about as much as the 30 EM epochs of the default CPU run.
LVD_DEFAULTS: dict[str, int] = {
    "dim": 32,
    "layers": 2,
    "heads": 2,
    "steps": 500,
    "batch_size": 256,
    "samples": 10000,
    "kmeans_iters": 30,
}
#: BERT's masking rate; the loss is taken at masked positions only (no 80/10/10 replacement).
MASK_PROB = 0.15
#: Optimiser settings of the masked LM (fixed, not per task).
MLM_OPTIM = {
    "learning_rate": 1e-3,
    "warmup_steps": 100,
    "min_lr_fraction": 0.1,
    "grad_clip": 1.0,
    "betas": (0.9, 0.95),
    "weight_decay": 0.01,
}
#: Rows per forward pass when reading out embeddings.
_CHUNK = 2048


def lvd_settings(lvd: Mapping[str, Any] | None) -> dict[str, int]:
    """:data:`LVD_DEFAULTS` updated with ``lvd``; unknown keys and non-positive values are ConfigErrors."""
    lvd = dict(lvd or {})
    unknown = sorted(set(lvd) - set(LVD_DEFAULTS))
    if unknown:
        raise ConfigError(f"pc.lvd: unknown keys {unknown}; expected some of {sorted(LVD_DEFAULTS)}")
    out = {**LVD_DEFAULTS, **lvd}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"pc.lvd.{key}: expected an integer >= 1, got {value!r}")
        out[key] = int(value)
    if out["dim"] % out["heads"]:
        raise ConfigError(f"pc.lvd: dim={out['dim']} must be a multiple of heads={out['heads']}")
    return out


# ---------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class LatentStructure:
    """Which latent (product block) each parameter block of a TorchCircuit belongs to.

    ``groups[j]``: the variables latent j governs (the input children of product block j).
    ``inputs``: (variable, row offset, rows, latent) for every leaf block: its row r is p(x | z_latent = r).
    ``sums``: (param group, slot, parent latent or None for the root, child latent) for every sum block.
    """

    num_latents: int
    groups: list[list[int]]
    inputs: list[tuple[int, int, int, int]]
    sums: list[tuple[int, int, int | None, int]]


def latent_structure(circuit: TorchCircuit) -> LatentStructure:
    """Read the latent map of an HCLT-shaped circuit off its node graph; anything else is a TrifleError."""
    nodes = list(circuit.root_ns)
    ids = {ns: i for i, ns in enumerate(nodes)}
    parent: dict[int, int] = {}
    for ns in nodes:
        for c in ns.chs:
            if ids[c] in parent:
                raise TrifleError("LVD: a node block has two parents; LVD needs a tree-shaped HCLT")
            parent[ids[c]] = ids[ns]
    prods = [i for i, ns in enumerate(nodes) if ns.is_prod()]
    latent = {i: j for j, i in enumerate(prods)}
    sizes = {nodes[i].num_nodes for i in prods}
    if len(sizes) != 1:
        raise TrifleError(f"LVD: product blocks of different sizes {sorted(sizes)}; not an HCLT")
    (size,) = sizes
    for layer in circuit.plan.layers:
        for op in layer:
            if isinstance(op, _ProdOp) and any(ix is not None for ix in op.idx):
                raise TrifleError("LVD: a product block does not pair its children's nodes one to one")
    groups = [sorted(c.scope.to_list()[0] for c in nodes[i].chs if c.is_input()) for i in prods]
    inputs = []
    for i, (v, off, n) in circuit.plan.input_rows.items():
        if i not in parent or parent[i] not in latent or n != size:
            raise TrifleError("LVD: a leaf block does not sit directly under a latent; not an HCLT")
        inputs.append((v, off, n, latent[parent[i]]))
    sums = []
    for i, (k, slot) in circuit.plan.sum_slots.items():
        ns = nodes[i]
        if len(ns.chs) != 1 or ids[ns.chs[0]] not in latent:
            raise TrifleError("LVD: a sum block has other children than one product block; not an HCLT")
        up = parent.get(i)
        if up is None and ns.num_nodes != 1:
            raise TrifleError("LVD: the root sum block must be a single node")
        if up is not None and (up not in latent or ns.num_nodes != size):
            raise TrifleError("LVD: an inner sum block does not sit directly under a latent; not an HCLT")
        sums.append((k, slot, None if up is None else latent[up], latent[ids[ns.chs[0]]]))
    return LatentStructure(size, groups, inputs, sums)


# ---------------------------------------------------------------------------------------- estimate
def latent_counts(
    circuit: TorchCircuit, structure: LatentStructure, x: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hard counts of the fully observed (x, z), laid out as the circuit's EM flows (float64).

    ``x`` is ``[N, V]`` category ids, ``z`` is ``[N, num latents]`` latent values in [0, num_latents).
    """
    x, z = x.long().cpu(), z.long().cpu()
    if z.dim() != 2 or z.size(0) != x.size(0) or z.size(1) != len(structure.groups):
        raise ConfigError(f"z: expected shape [{x.size(0)}, {len(structure.groups)}], got {tuple(z.shape)}")
    if int(z.min()) < 0 or int(z.max()) >= structure.num_latents:
        raise ConfigError(f"z: latent values must lie in [0, {structure.num_latents})")
    ones = torch.ones(x.size(0), dtype=torch.float64)
    f_in = torch.zeros(circuit.input_params.shape, dtype=torch.float64)
    for v, off, _, j in structure.inputs:
        f_in[v].index_put_((off + z[:, j], x[:, v]), ones, accumulate=True)
    f_sum = [torch.zeros(w.shape, dtype=torch.float64) for w in circuit.sum_params()]
    for k, slot, up, j in structure.sums:
        rows = torch.zeros_like(z[:, j]) if up is None else z[:, up]
        f_sum[k][slot].index_put_((rows, z[:, j]), ones, accumulate=True)
    return f_in, f_sum


def supervised_estimate(
    circuit: TorchCircuit, x: torch.Tensor, z: torch.Tensor, *, pseudocount: float
) -> None:
    """Set ``circuit``'s parameters to the maximum-likelihood estimate of the fully observed (x, z),
    with pyjuice's pseudocount rule: one EM M-step whose flows are the hard counts."""
    from .training import _em_update  # training imports this module lazily; no cycle at import time

    structure = latent_structure(circuit)
    f_in, f_sum = latent_counts(circuit, structure, x, z)
    new_in = _em_update(
        circuit.input_params, f_in, circuit.input_valid.unsqueeze(-1).expand_as(f_in), pseudocount, 1.0
    )
    new_sum = [
        _em_update(w, f, m, pseudocount, 1.0)
        for w, f, m in zip(circuit.sum_params(), f_sum, circuit.sum_masks(), strict=True)
    ]
    circuit.set_params(new_in, new_sum)


# ---------------------------------------------------------------------------------------- masked LM
class MaskedLM(nn.Module):
    """A BERT-like encoder over the V token columns: token + position embeddings, pre-norm transformer
    layers (no dropout), a final LayerNorm whose output is the embedding, and a linear head."""

    def __init__(self, num_vars: int, num_cats: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.mask_id = num_cats
        self.tok = nn.Embedding(num_cats + 1, dim)
        self.pos = nn.Parameter(torch.randn(num_vars, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_cats)
        nn.init.normal_(self.tok.weight, std=0.02)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Last-layer outputs ``[B, V, dim]`` for token ids ``x`` (``mask_id`` marks masked positions)."""
        return self.norm(self.encoder(self.tok(x) + self.pos))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def _mask(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Each position masked with probability MASK_PROB, at least one per row; a function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < MASK_PROB
    forced = torch.randint(0, shape[1], (shape[0],), generator=g)
    mask[torch.arange(shape[0]), forced] = True
    return mask


def _mlm_loss(model: MaskedLM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(torch.where(mask, torch.full_like(x, model.mask_id), x))
    return F.cross_entropy(logits[mask], x[mask])


def train_mlm(
    train: torch.Tensor,
    *,
    num_cats: int,
    settings: Mapping[str, int],
    seed: int,
    out_path,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[MaskedLM, dict[str, Any]]:
    """Train the masked LM on ``train`` with ``run_training`` (no partial checkpoints: it is short)."""
    dev = torch.device(device)
    train = train.long().cpu()
    with seeded(derived_seed(seed, 11), torch.device("cpu")):
        model = MaskedLM(train.size(1), num_cats, settings["dim"], settings["layers"], settings["heads"])
    cfg = {
        **MLM_OPTIM,
        "betas": list(MLM_OPTIM["betas"]),
        "eval_every": 0,
        "checkpoint_every": 0,
        **{k: settings[k] for k in ("dim", "layers", "heads", "batch_size")},
    }
    eval_rows = train[torch.from_numpy(eval_subset(train.size(0), 2048))].to(dev)
    eval_mask = _mask(tuple(eval_rows.shape), derived_seed(seed, 13)).to(dev)

    def batch(step: int):
        idx = torch.from_numpy(
            batch_indices(derived_seed(seed, 12), step, settings["batch_size"], len(train))
        )
        x = train[idx]
        return x.to(dev), _mask(tuple(x.shape), derived_seed(seed, 14, step)).to(dev)

    def step(model, optimizer, b, lr, grad_clip, dropout_seed):
        return optimizer_step(model, optimizer, lambda: _mlm_loss(model, *b), lr, grad_clip, dropout_seed)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            loss = float(_mlm_loss(model, eval_rows, eval_mask))
        model.train()
        return {"mlm_loss": loss}

    digest = hashlib.sha256(train.contiguous().numpy().tobytes()).hexdigest()[:16]
    job = TrainingJob(
        kind="LVD-MLM",
        model=model,
        make_optimizer=lambda m, c: adamw(m, c, also_decay=()),
        batch=batch,
        step=step,
        evaluate=evaluate,
        shown_score=("mlm", "mlm_loss"),
        data={"train_shape": list(train.shape), "train_sha256": digest},
        partial_format="trifle-lvd-mlm-v1",
    )
    outcome = run_training(
        job, cfg, seed=seed, total_steps=settings["steps"], out_path=out_path, device=dev, progress=progress
    )
    model.eval()
    return model, {"mlm_loss": outcome.final_scores.get("mlm_loss"), "mlm_seconds": outcome.seconds}


def group_embeddings(model: MaskedLM, x: torch.Tensor, group: list[int]) -> torch.Tensor:
    """``[N, len(group) * dim]``: for each variable of ``group``, the last layer at its position with that
    variable alone masked (everything else given), concatenated in ``group``'s order."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for lo in range(0, x.size(0), _CHUNK):
            part = []
            for v in group:
                xm = x[lo : lo + _CHUNK].long().clone()
                xm[:, v] = model.mask_id
                part.append(model.hidden(xm.to(dev))[:, v].float().cpu())
            out.append(torch.cat(part, dim=1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- k-means
def kmeans(points: torch.Tensor, k: int, *, iters: int, seed: int) -> torch.Tensor:
    """Cluster labels ``[N]`` by k-means++ seeding then at most ``iters`` Lloyd iterations (float64).

    Deterministic given ``seed``; a cluster that empties keeps its previous centre.
    """
    pts = points.double()
    n = pts.size(0)
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(0, n, (1,), generator=g))
    centers = [pts[first]]
    d2 = ((pts - pts[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2 / total, 1, generator=g))
        else:  # fewer distinct points than clusters: the extra centres duplicate a point
            nxt = int(torch.randint(0, n, (1,), generator=g))
        centers.append(pts[nxt])
        d2 = torch.minimum(d2, ((pts - pts[nxt]) ** 2).sum(dim=1))
    c = torch.stack(centers)
    labels = None
    sq = (pts**2).sum(dim=1, keepdim=True)
    for _ in range(iters):
        dist = sq - 2.0 * pts @ c.T + (c**2).sum(dim=1)
        new = dist.argmin(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=k).double().unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    if labels is None:
        labels = (sq - 2.0 * pts @ c.T + (c**2).sum(dim=1)).argmin(dim=1)
    return labels


# ---------------------------------------------------------------------------------------- pipeline
def distil_latents(
    model: MaskedLM, x: torch.Tensor, structure: LatentStructure, *, iters: int, seed: int
) -> torch.Tensor:
    """``[N, num latents]``: each latent's k-means cluster of its group's masked-LM embeddings."""
    z = torch.empty(x.size(0), len(structure.groups), dtype=torch.long)
    for j, group in enumerate(structure.groups):
        emb = group_embeddings(model, x, group)
        z[:, j] = kmeans(emb, structure.num_latents, iters=iters, seed=derived_seed(seed, 15, j))
    return z


def lvd_initialise(
    circuit: TorchCircuit,
    train: torch.Tensor,
    *,
    num_cats: int,
    pseudocount: float,
    seed: int,
    settings: Mapping[str, int],
    out_path,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Set ``circuit``'s parameters by LVD (module docstring) and return what it took.

    ``out_path`` only names the masked LM's (unused) partial checkpoint, ``<out_path>.partial.pt``.
    The caller's torch RNG state is left untouched.
    """
    settings = lvd_settings(settings)
    structure = latent_structure(circuit)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model, info = train_mlm(
            train,
            num_cats=num_cats,
            settings=settings,
            seed=seed,
            out_path=out_path,
            device=device,
            progress=progress,
        )
        t1 = time.perf_counter()
        rows = train[torch.from_numpy(eval_subset(train.size(0), settings["samples"]))].long()
        z = distil_latents(model, rows, structure, iters=settings["kmeans_iters"], seed=seed)
        t2 = time.perf_counter()
        supervised_estimate(circuit, rows, z, pseudocount=pseudocount)
    t3 = time.perf_counter()
    return {
        **info,
        "num_latent_vars": len(structure.groups),
        "samples": int(rows.size(0)),
        "embed_kmeans_seconds": t2 - t1,
        "estimate_seconds": t3 - t2,
        "seconds": t3 - t0,
    }
