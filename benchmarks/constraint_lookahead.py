"""Whether a circuit models an action constraint well enough for s-Trifle's constraint lookahead.

Under an action constraint C on dimension j, ``trifle-s-safe`` with ``constraint_lookahead: true``
reweights the GPT's prior of every earlier dimension i < j by the circuit's p(C | s, a^{<=i}) /
p(C | s, a^{<i}) (docs/planning.md#action-constraints). That helps only if the circuit predicts C
better than nothing: the GPT's own exact answer for the dimension just before j,
p_GPT(a^{j-1} | s, a^{<j-1}, C) ∝ p_GPT(a^{j-1} | s, a^{<j-1}) p_GPT(C | s, a^{<=j-1}), is one forward
pass per candidate, so the two models can be compared on held-out data:

* **Predicting C** from the state and a^{<j} on held-out transitions (whole episodes held out with the
  circuit's ``pc.valid_fraction`` and seed): log-loss in nats (lower is better) and AUC, for the GPT
  (the allowed bins' probability of its a^j head) and each circuit (p(a^j allowed | s, a^{<j})).
* **The lookahead on dimension j - 1**: the mean total-variation distance between the GPT's exact
  p(a^{j-1} | s, a^{<j-1}, C) and (a) the GPT's unconditioned proposal, what ``tt-safe`` and the default
  ``trifle-s-safe`` use, (b) that proposal reweighted by the circuit's factor
  (circuit_queries.constraint_likelihood), what the lookahead uses; also on the rows where C is
  unlikely (p_GPT(C | s, a^{<j-1}) < 0.5), where the lookahead matters. If (b) is not below (a), the
  circuit's lookahead moves the proposal away from the constrained behaviour rather than towards it.

The task's first bound is analysed (its dimension j >= 1). One torch thread; about 20 s per circuit on
1000 rows of Hopper. Needs trained checkpoints, e.g. those of ``workflow/config/mujoco_cpu.yaml``::

    .venv/bin/python benchmarks/constraint_lookahead.py --task hopper-medium-local \\
        --tokens data/tokens/hopper-medium-local.npz \\
        --gpt results/checkpoints/hopper-medium-local/gpt/seed0.pt \\
        --pc results/checkpoints/hopper-medium-local/pc/seed0.jpc

Writes ``docs/benchmarks/constraint_lookahead.md`` and ``.json`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from trifle.config import compose
from trifle.data.tokens import TokenData, load_tokens
from trifle.data.windows import split_episodes
from trifle.errors import ConfigError
from trifle.models.circuits import load_circuit
from trifle.models.circuits.diagnostics import episode_rows
from trifle.models.gpt_checkpoint import load_checked_gpt
from trifle.planning.circuit_queries import (
    WindowLayout,
    conditional_unique,
    constraint_evidence,
    constraint_likelihood,
)
from trifle.planning.constraints import allowed_bins, parse_constraint

REPO = Path(__file__).resolve().parents[1]


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of the 0/1 outcomes ``y`` under probabilities ``p``."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """The probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def total_variation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(a - b).sum(axis=-1)


@torch.no_grad()
def gpt_constraint(model, tokens: torch.Tensor, obs_dim: int, dim: int, allowed: torch.Tensor, num_prev: int):
    """What the GPT says for rows ``tokens [B, >= obs_dim + dim]``, with ``num_prev`` the bins of
    dimension dim - 1: ``(p_C, p_C_before, prior, exact)``, i.e. p_GPT(C | s, a^{<dim}) [B],
    p_GPT(C | s, a^{<dim-1}) [B], the proposal p_GPT(a^{dim-1} | s, a^{<dim-1}) [B, num_prev] and its
    exact constrained version p_GPT(a^{dim-1} | s, a^{<dim-1}, C) [B, num_prev] (one forward per
    candidate)."""
    n_allowed, prior = len(allowed), None
    factor = torch.zeros(len(tokens), num_prev, dtype=torch.float64)
    for c in range(num_prev):
        prefix = tokens[:, : obs_dim + dim].clone()
        prefix[:, obs_dim + dim - 1] = c
        out, _ = model(prefix)
        factor[:, c] = (torch.softmax(out[:, -1, :n_allowed].double(), -1) * allowed).sum(-1)
        if prior is None:  # the head before a^{dim-1} does not see it (causal): any candidate's pass gives it
            prior = torch.softmax(out[:, -2, :num_prev].double(), -1)
    # The row's own a^{dim-1} is one of the candidates: its factor is p_GPT(C | s, a^{<dim}).
    p_c = factor.gather(1, tokens[:, obs_dim + dim - 1 : obs_dim + dim].long())[:, 0]
    joint = prior * factor
    before = joint.sum(-1)
    return p_c.numpy(), before.numpy(), prior.numpy(), (joint / before[:, None]).numpy()


def circuit_constraint(circuit, data: TokenData, tokens: torch.Tensor, dim: int, allowed: torch.Tensor):
    """``(p_C, factor)`` from the circuit: p(C | s, a^{<dim}) [B] and the lookahead's factor on dimension
    dim - 1, constraint_likelihood over its candidates [B, n] (s, a^{<dim-1} observed)."""
    od = data.obs_dim
    layout = WindowLayout(od, data.act_dim, circuit.num_vars // data.transition_dim, circuit.num_cats)
    var = layout.act_var(0, dim)
    x = torch.zeros(len(tokens), layout.num_vars, dtype=torch.long)
    missing = torch.ones_like(x, dtype=torch.bool)
    x[:, : od + dim], missing[:, : od + dim] = tokens[:, : od + dim], False
    probs = conditional_unique(circuit, x, missing, [var])[:, 0, : len(allowed)]
    p_c = ((probs * allowed).sum(-1) / probs.sum(-1)).numpy()
    missing[:, od + dim - 1] = True
    soft = constraint_evidence(layout, {dim: allowed})
    num_prev = int(data.discretizer.num_bins[od + dim - 1])
    factor = constraint_likelihood(circuit, x, missing, layout.act_var(0, dim - 1), num_prev, soft)
    return p_c, factor.numpy()


def measure(args) -> dict:
    torch.set_num_threads(1)
    cfg = compose([f"task={args.task}", f"seed={args.seed}"])
    data = load_tokens(args.tokens)
    bounds = parse_constraint(cfg["task"]["action_constraint"], data.act_dim)
    if not bounds or bounds[0].dim == 0:
        raise ConfigError(
            f"task={args.task}: task.action_constraint must bound an action dimension >= 1 "
            f"(one that has an earlier dimension to look ahead from), got {cfg['task']['action_constraint']!r}"
        )
    dim = bounds[0].dim
    allowed = torch.as_tensor(allowed_bins(data.discretizer, data.obs_dim, bounds[:1])[dim])
    _, valid = split_episodes(data.episode_starts, len(data.tokens), cfg["pc"]["valid_fraction"], args.seed)
    rows = episode_rows(data, valid)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(rows, min(args.rows, len(rows)), replace=False))
    tokens = torch.as_tensor(data.tokens[rows])
    met = allowed[tokens[:, data.obs_dim + dim]].double().numpy()
    model, _ = load_checked_gpt(args.gpt, tokens=data, device="cpu")
    model.eval()
    num_prev = int(data.discretizer.num_bins[data.obs_dim + dim - 1])
    g_c, before, prior, exact = gpt_constraint(model, tokens, data.obs_dim, dim, allowed.double(), num_prev)
    unlikely = before < 0.5
    tv_prior = total_variation(prior, exact)
    out = {
        "task": args.task,
        "dimension": dim,
        "rows": len(rows),
        "fraction_meeting": float(met.mean()),
        "unlikely_rows": int(unlikely.sum()),
        "gpt": {"path": str(args.gpt), "log_loss": log_loss(g_c, met), "auc": auc(g_c, met)},
        "no_lookahead_tv": float(tv_prior.mean()),
        "no_lookahead_tv_unlikely": float(tv_prior[unlikely].mean()) if unlikely.any() else float("nan"),
        "circuits": [],
        "machine": platform.platform(),
    }
    for path in args.pc:
        circuit = load_circuit(path, backend="torch", device="cpu")
        c_c, factor = circuit_constraint(circuit, data, tokens, dim, allowed)
        reweighted = prior * factor
        reweighted = reweighted / np.clip(reweighted.sum(-1, keepdims=True), 1e-300, None)
        tv = total_variation(reweighted, exact)
        out["circuits"].append(
            {
                "path": str(path),
                "log_loss": log_loss(c_c, met),
                "auc": auc(c_c, met),
                "lookahead_tv": float(tv.mean()),
                "lookahead_tv_unlikely": float(tv[unlikely].mean()) if unlikely.any() else float("nan"),
            }
        )
    return out


def write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Constraint lookahead: {result['task']}, action dimension {result['dimension']}",
        "",
        f"{result['rows']} held-out transitions; {100 * result['fraction_meeting']:.1f}% of them meet the "
        f"constraint; {result['unlikely_rows']} rows where the GPT gives it less than 0.5 before "
        f"dimension {result['dimension'] - 1}. Generated by `benchmarks/constraint_lookahead.py`.",
        "",
        "| model | C from s and a^{<j}: log-loss (nats) | AUC | proposal of a^{j-1}: TV to the GPT's exact "
        "constrained one | the same, where C is unlikely |",
        "|---|---|---|---|---|",
        f"| GPT (`{result['gpt']['path']}`); its proposal as it is | {result['gpt']['log_loss']:.3f} | "
        f"{result['gpt']['auc']:.3f} | {result['no_lookahead_tv']:.3f} | {result['no_lookahead_tv_unlikely']:.3f} |",
    ]
    for c in result["circuits"]:
        lines.append(
            f"| circuit (`{c['path']}`); the GPT's proposal reweighted by its lookahead | {c['log_loss']:.3f} | "
            f"{c['auc']:.3f} | {c['lookahead_tv']:.3f} | {c['lookahead_tv_unlikely']:.3f} |"
        )
    lines += ["", f"Machine: {result['machine']}.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a task config with an action_constraint")
    parser.add_argument("--tokens", required=True, type=Path)
    parser.add_argument("--gpt", required=True, type=Path)
    parser.add_argument("--pc", required=True, type=Path, nargs="+", help="one or more circuits")
    parser.add_argument("--rows", type=int, default=1000, help="held-out transitions (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the split's and the row sample's seed")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "constraint_lookahead")
    args = parser.parse_args(argv)
    result = measure(args)
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
