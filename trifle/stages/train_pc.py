"""Stage `train_pc`: fit the HCLT circuit over windows of `task.pc_window` transitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trifle.data.circuit_windows import circuit_num_cats, token_windows
from trifle.data.tokens import load_tokens
from trifle.data.windows import split_episodes
from trifle.models.circuits.backend import load_circuit
from trifle.models.circuits.diagnostics import write_circuit_metrics
from trifle.models.circuits.training import train_circuit


def run(cfg: dict[str, Any]) -> Path:
    data = load_tokens(cfg["paths"]["tokens"])
    pc, window = cfg["pc"], cfg["task"]["pc_window"]
    # Same held-out episodes as the GPT when the valid fractions agree (same seed, same split).
    train_ids, valid_ids = split_episodes(
        data.episode_starts, len(data.tokens), pc["valid_fraction"], cfg["seed"]
    )

    def windows(ids):
        return torch.from_numpy(token_windows(data, window=window, episode_ids=ids))

    out = Path(cfg["paths"]["pc"])
    metrics = train_circuit(
        windows(train_ids),
        windows(valid_ids),
        num_cats=circuit_num_cats(data.vocab_size, window),
        num_latents=pc["num_latents"],
        epochs=pc["epochs"],
        batch_size=pc["batch_size"],
        pseudocount=pc["pseudocount"],
        seed=cfg["seed"],
        out_path=out,
        backend=pc["backend"],
        progress=cfg["progress"],
        structure=pc["structure"],
        init=pc["init"],
        lvd=pc["lvd"],
    )
    # Conditionals against the data's counts (trifle.models.circuits.diagnostics), on the saved circuit.
    write_circuit_metrics(
        cfg,
        load_circuit(out, backend="torch", device="cpu"),
        data,
        train_ids,
        valid_ids,
        metrics,
        train_ll=metrics["train_ll_per_var"],
        heldout_ll=metrics["heldout_ll_per_var"],
    )
    return out
