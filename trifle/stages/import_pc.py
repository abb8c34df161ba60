"""Stage `import_pc`: the Trifle authors' released circuit as a task's circuit (workflow `protocol: pretrained`).

The file is converted by trifle.models.circuits.released (which checks its variables and categories
against the task's window); this stage adds the check that the task's tokens use TT's bins (the authors
fitted their circuits on Trajectory Transformer's tokens) and a metrics file like `train_pc`'s: the
log-likelihood per variable on trifle's training and held-out episodes (the authors trained on every
episode, so the held-out figure only shows that tokens and circuit agree) and the same diagnostics of
the circuit's conditionals against the data (trifle.models.circuits.diagnostics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from trifle.data.circuit_windows import token_windows
from trifle.data.tokens import load_tokens, require_quantile_rule
from trifle.data.windows import split_episodes
from trifle.models.circuits.backend import load_circuit
from trifle.models.circuits.diagnostics import write_circuit_metrics
from trifle.models.circuits.released import import_released_circuit
from trifle.models.circuits.training import mean_log_likelihood


def run(cfg: dict[str, Any]) -> Path:
    start = time.perf_counter()
    paths, window = cfg["paths"], cfg["task"]["pc_window"]
    data = load_tokens(paths["tokens"])
    require_quantile_rule(data, "tt", paths["tokens"], "a circuit released by the Trifle authors")
    out = Path(paths["pc"])
    record = import_released_circuit(
        paths["released_pc"],
        out,
        obs_dim=data.obs_dim,
        act_dim=data.act_dim,
        vocab_size=data.vocab_size,
        window=window,
    )
    circuit = load_circuit(out, backend="torch", device="cpu")
    train_ids, valid_ids = split_episodes(
        data.episode_starts, len(data.tokens), cfg["pc"]["valid_fraction"], cfg["seed"]
    )
    num_vars = record["num_vars"]
    scores = {
        name: mean_log_likelihood(
            circuit, torch.from_numpy(token_windows(data, window=window, episode_ids=ids)).long(), 4096
        )
        / num_vars
        for name, ids in (("train_ll_per_var", train_ids), ("heldout_ll_per_var", valid_ids))
    }
    metrics = {**scores, "seconds": time.perf_counter() - start, "source": record}
    write_circuit_metrics(
        cfg,
        circuit,
        data,
        train_ids,
        valid_ids,
        metrics,
        train_ll=scores["train_ll_per_var"],
        heldout_ll=scores["heldout_ll_per_var"],
        released=True,
    )
    return out
