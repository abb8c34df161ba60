"""How many optimizer steps the trajectory GPT needs to clone a known behaviour, against an MLP.

Behaviour cloning of Hopper showed the small GPT far below an MLP trained on the same data
(docs/mujoco.md#gpt-sample-efficiency). This check takes the data out of the question: a synthetic task
whose behaviour is exactly known, 11-d standard Gaussian observations and 3-d actions, every column cut
into 100 quantile bins by the project's ``Discretizer``, single-transition windows. Two behaviours
(``--behaviour``): ``linear``, ``tanh(W s)`` with a fixed random ``W`` of 3 x 11, entries
N(0, 1.5^2 / 11), a single direction per action that attention can read off as a weighted sum of the
observation tokens; and ``mlp``, ``tanh(W2 relu(W1 s + b))`` with 256 hidden units (``W1`` entries
N(0, 4 / 11), ``b`` N(0, 1/4), ``W2`` N(0, 4 / 256), hidden units centred), whose actions depend on
interactions between observation dimensions, as a trained agent's do. Each model is scored by
the root-mean-square error of its greedy action (each action dimension's most likely bin given the
previous ones, decoded to the bin's mean, as ``gpt-bc`` acts) against the true action on held-out rows;
the bins alone cost about 0.01.

Rows: the GPT of ``trifle/conf/gpt/<--gpt>.yaml``, trained as the train_gpt stage trains it (model
config, optimizer groups, warm-up and cosine schedule over the row's steps, loss weights, dropout
seeding), as it is, with another width or learning rate, and with bin embeddings that know the bins'
order (started on a line per column, or a learned per-column direction scaled by the bin's rank:
variants of the embedding only, built here); an MLP (2 x 256, ReLU, Adam 3e-4, batch 64) on the
observation bins' values as a regressor, as a 100-way classifier per action dimension, and as that
classifier on one-hot bins. One seed, one torch thread.

    .venv/bin/python benchmarks/gpt_sample_efficiency.py                  # about 12 minutes on one core
    .venv/bin/python benchmarks/gpt_sample_efficiency.py --behaviour mlp  # about 20 minutes
    .venv/bin/python benchmarks/gpt_sample_efficiency.py --quick          # a few steps per row (a smoke run)

Writes ``docs/benchmarks/gpt_sample_efficiency.md`` and ``.json`` (``_mlp`` before the suffix for the
``mlp`` behaviour; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trifle.config import compose
from trifle.data.discretize import Discretizer
from trifle.models.gpt import TrajectoryGPT
from trifle.models.gpt_training import make_optimizer, model_config, train_step
from trifle.models.training_common import derived_seed, learning_rate

REPO = Path(__file__).resolve().parents[1]
OBS, ACT, BINS = 11, 3, 100
ROWS, HELD_OUT = 100_000, 4000
HIDDEN = 256  # the mlp behaviour's hidden units


@dataclass(frozen=True)
class Task:
    """Tokens of every row (obs, action, reward, value columns) and what the scores need."""

    tokens: torch.Tensor  # [ROWS, OBS + ACT + 2] int64
    disc: Discretizer
    actions: np.ndarray  # [ROWS, ACT] true continuous actions
    train: int  # rows [0, train) train, the last HELD_OUT rows score

    def obs_values(self) -> torch.Tensor:
        """Observations replaced by their bin's mean value (what the value-input MLPs see)."""
        return torch.from_numpy(self.disc.decode(self.tokens.numpy())[:, :OBS]).float()

    def rmse(self, action_bins: torch.Tensor) -> float:
        """Error of greedy action bins [HELD_OUT, ACT], decoded to bin means, against the true actions."""
        decoded = np.stack(
            [self.disc.columns[OBS + k].values[action_bins[:, k].numpy()] for k in range(ACT)], 1
        )
        return float(np.sqrt(((decoded - self.actions[-HELD_OUT:]) ** 2).mean()))


def make_task(seed: int = 0, behaviour: str = "linear") -> Task:
    rng = np.random.default_rng(seed)
    if behaviour == "linear":
        w = rng.normal(size=(ACT, OBS)) / np.sqrt(OBS) * 1.5
        obs = rng.normal(size=(ROWS, OBS))
        act = np.tanh(obs @ w.T)
    elif behaviour == "mlp":
        w1 = rng.normal(size=(HIDDEN, OBS)) / np.sqrt(OBS) * 2.0
        b1 = rng.normal(size=HIDDEN) * 0.5
        w2 = rng.normal(size=(ACT, HIDDEN)) / np.sqrt(HIDDEN) * 2.0
        obs = rng.normal(size=(ROWS, OBS))
        hidden = np.maximum(obs @ w1.T + b1, 0.0)
        act = np.tanh((hidden - hidden.mean(0)) @ w2.T)
    else:
        raise ValueError(f"--behaviour: expected 'linear' or 'mlp', got {behaviour!r}")
    reward = obs.sum(1, keepdims=True) / np.sqrt(OBS)
    data = np.concatenate([obs, act, reward, np.zeros((ROWS, 1))], 1)
    names = [f"o{i}" for i in range(OBS)] + [f"a{i}" for i in range(ACT)] + ["r", "v"]
    kinds = ["quantile"] * (OBS + ACT + 1) + ["categorical"]
    disc = Discretizer.fit(data, kinds, names, n_bins=BINS)
    tokens = torch.from_numpy(disc.encode(data)).long()
    return Task(tokens, disc, act, ROWS - HELD_OUT)


class RankEmbedding(torch.nn.Module):
    """The GPT's token embedding plus a learned per-column direction scaled by the bin's rank in [-1, 1]."""

    def __init__(self, base: torch.nn.Embedding, columns: int, n_embd: int) -> None:
        super().__init__()
        self.base, self.columns = base, columns
        self.direction = torch.nn.Parameter(torch.randn(columns + 1, n_embd) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        column = torch.clamp(ids // BINS, max=self.columns)
        pad = ids >= BINS * self.columns
        rank = torch.where(pad, 0.0, 2.0 * (ids % BINS).float() / (BINS - 1) - 1.0)
        return self.base(ids) + rank[..., None] * self.direction[column]


def ordered_init(model: TrajectoryGPT, columns: int) -> None:
    """Start each column's bin embeddings on a line through their mean, in bin order."""
    n_embd = model.tok_emb.weight.size(1)
    ramp = torch.linspace(-1.0, 1.0, BINS)[:, None]
    with torch.no_grad():
        for col in range(columns):
            rows = model.tok_emb.weight[col * BINS : (col + 1) * BINS]
            u = torch.randn(n_embd) / np.sqrt(n_embd)
            rows.copy_(rows.mean(0) + ramp * u + 0.02 * torch.randn(BINS, n_embd))


def gpt_row(task: Task, gpt: dict, embedding: str, checkpoints: list[int]) -> dict[int, float]:
    """Train the GPT as the train_gpt stage does (its model config, optimizer groups, warm-up and cosine
    schedule over the row's last checkpoint, loss and dropout seeding) on single transitions; held-out
    greedy-action RMSE at each checkpoint step."""
    torch.manual_seed(0)
    columns = task.tokens.size(1)
    model = TrajectoryGPT(model_config({**gpt, "seq_transitions": 1}, OBS, ACT, BINS))
    if embedding == "ordered-init":
        ordered_init(model, columns)
    elif embedding == "rank-direction":
        model.tok_emb = RankEmbedding(model.tok_emb, columns, gpt["n_embd"])
    optimizer = make_optimizer(model, gpt)
    held_out = task.tokens[-HELD_OUT:]
    gen = torch.Generator().manual_seed(0)
    out = {}
    for step in range(1, max(checkpoints) + 1):
        rows = task.tokens[torch.randint(0, task.train, (gpt["batch_size"],), generator=gen)]
        batch = (rows[:, :-1], rows[:, 1:], torch.ones(rows.size(0), columns - 1))
        lr = learning_rate(gpt, step - 1, max(checkpoints))
        train_step(model, optimizer, batch, lr, gpt["grad_clip"], derived_seed(0, 2, step - 1))
        if step in checkpoints:
            model.eval()
            with torch.no_grad():
                idx = held_out[:, :OBS].clone()
                for _ in range(ACT):
                    logits, _ = model(idx)
                    idx = torch.cat([idx, logits[:, -1, :BINS].argmax(-1, keepdim=True)], 1)
            model.train()
            out[step] = task.rmse(idx[:, OBS:])
    return out


def mlp_row(task: Task, head: str, inputs: str, checkpoints: list[int]) -> dict[int, float]:
    """An MLP regressor or per-dimension 100-way classifier; held-out RMSE at each checkpoint step."""
    torch.manual_seed(0)
    x = task.obs_values() if inputs == "values" else F.one_hot(task.tokens[:, :OBS], BINS).float().flatten(1)
    outputs = ACT if head == "regression" else ACT * BINS
    net = torch.nn.Sequential(
        torch.nn.Linear(x.size(1), 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, outputs),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    actions = torch.from_numpy(task.actions).float()
    bins = task.tokens[:, OBS : OBS + ACT]

    def loss(rows: torch.Tensor) -> torch.Tensor:
        out = net(x[rows])
        if head == "regression":
            return F.mse_loss(out, actions[rows])
        return F.cross_entropy(out.view(-1, ACT, BINS).transpose(1, 2), bins[rows])

    def score() -> float:
        with torch.no_grad():
            out = net(x[-HELD_OUT:])
        if head == "regression":
            return float(((out - actions[-HELD_OUT:]) ** 2).mean().sqrt())
        return task.rmse(out.view(-1, ACT, BINS).argmax(-1))

    gen = torch.Generator().manual_seed(0)
    out = {}
    for step in range(1, max(checkpoints) + 1):
        value = loss(torch.randint(0, task.train, (64,), generator=gen))
        opt.zero_grad()
        value.backward()
        opt.step()
        if step in checkpoints:
            out[step] = score()
    return out


def mlp_head_rows(task: Task, checkpoints: list[int]) -> list:
    """The rows both behaviours share: the MLP on the observation bins' values, regressor and classifier."""
    return [
        (
            "MLP on the observation bins' values, regression",
            lambda: mlp_row(task, "regression", "values", checkpoints),
        ),
        (
            "same MLP, 100-way classifier per action dimension, argmax",
            lambda: mlp_row(task, "classes", "values", checkpoints),
        ),
    ]


def linear_rows(task: Task, gpt: dict, name: str, quick: bool) -> list:
    """The linear behaviour's rows: the MLP heads and inputs, and the GPT's learning rate, width and
    embedding variants."""
    checkpoints = [2, 4] if quick else [500, 1000, 2000, 3000]
    long_checkpoints = [2, 4, 6] if quick else [500, 1000, 2000, 3000, 6000]
    return [
        *mlp_head_rows(task, checkpoints),
        (
            "same classifier on one-hot observation bins",
            lambda: mlp_row(task, "classes", "one-hot", checkpoints),
        ),
        (
            f"GPT ({name}: {gpt['n_embd']}-d, lr {gpt['learning_rate']:g})",
            lambda: gpt_row(task, gpt, "learned", checkpoints),
        ),
        (
            f"GPT, lr {2.5 * gpt['learning_rate']:g}",
            lambda: gpt_row(
                task, {**gpt, "learning_rate": 2.5 * gpt["learning_rate"]}, "learned", long_checkpoints
            ),
        ),
        (
            f"GPT, {2 * gpt['n_embd']}-d",
            lambda: gpt_row(task, {**gpt, "n_embd": 2 * gpt["n_embd"]}, "learned", checkpoints),
        ),
        ("GPT, bin embeddings started in order", lambda: gpt_row(task, gpt, "ordered-init", checkpoints)),
        (
            "GPT, learned direction scaled by the bin's rank",
            lambda: gpt_row(task, gpt, "rank-direction", checkpoints),
        ),
    ]


def mlp_behaviour_rows(task: Task, gpt: dict, name: str, quick: bool) -> list:
    """The nonlinear behaviour's rows: the two MLP heads against the GPT as configured (trained as long as
    the next row takes), with the paper's architecture (same optimizer and batch), and with the rank
    embedding."""
    checkpoints = [2, 4] if quick else [1000, 3000, 6000]
    # As many steps of the configured GPT as the paper architecture's 6000 take time (3.4x per step here).
    long_checkpoints = [2, 4, 6] if quick else [1000, 3000, 6000, 10000, 20000]
    paper = compose(["gpt=paper"])["gpt"]
    arch = {k: paper[k] for k in ("n_layer", "n_head", "n_embd")}
    return [
        *mlp_head_rows(task, checkpoints),
        (
            f"GPT ({name}: {gpt['n_layer']} layers, {gpt['n_head']} heads, {gpt['n_embd']}-d)",
            lambda: gpt_row(task, gpt, "learned", long_checkpoints),
        ),
        (
            f"GPT, the paper's architecture ({arch['n_layer']} layers, {arch['n_head']} heads, "
            f"{arch['n_embd']}-d)",
            lambda: gpt_row(task, {**gpt, **arch}, "learned", checkpoints),
        ),
        (
            "GPT, learned direction scaled by the bin's rank",
            lambda: gpt_row(task, gpt, "rank-direction", checkpoints),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpt", default="small", help="gpt config group (trifle/conf/gpt)")
    parser.add_argument("--behaviour", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--quick", action="store_true", help="a few steps per row (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="report path (default: docs/benchmarks/)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    suffix = "" if args.behaviour == "linear" else f"_{args.behaviour}"
    out = args.out or REPO / "docs" / "benchmarks" / f"gpt_sample_efficiency{suffix}.md"
    gpt = compose([f"gpt={args.gpt}"])["gpt"]
    task = make_task(behaviour=args.behaviour)
    make_rows = linear_rows if args.behaviour == "linear" else mlp_behaviour_rows
    rows = make_rows(task, gpt, args.gpt, args.quick)
    began = time.perf_counter()
    results = []
    for name, run in rows:
        start = time.perf_counter()
        scores = run()
        results.append({"model": name, "rmse": scores, "seconds": time.perf_counter() - start})
        print(f"{name}: {scores} ({results[-1]['seconds']:.0f} s)", flush=True)
    steps = sorted({s for r in results for s in r["rmse"]})
    lines = [
        f"# GPT sample efficiency on the synthetic {args.behaviour} behaviour "
        "(benchmarks/gpt_sample_efficiency.py)",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, 1 torch thread. "
        f"Total {time.perf_counter() - began:.0f} s. Task and scoring: the script's docstring. Cells: "
        f"held-out RMSE of the greedy action (action std {task.actions.std():.2f}; the true action bins "
        f"alone score {task.rmse(task.tokens[-HELD_OUT:, OBS : OBS + ACT]):.3f}) after that many optimizer "
        "steps of batch 64.",
        "",
        "| model | " + " | ".join(f"{s} steps" for s in steps) + " | seconds |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for r in results:
        cells = [f"{r['rmse'][s]:.3f}" if s in r["rmse"] else "—" for s in steps]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    report = {"gpt": args.gpt, "behaviour": args.behaviour, "rows": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
