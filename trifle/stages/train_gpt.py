"""Stage `train_gpt`: fit the Trajectory-Transformer-style GPT on a task's tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.tokens import load_tokens
from trifle.devices import resolve_device
from trifle.models.gpt_training import train_gpt
from trifle.models.metrics import write_model_metrics


def run(cfg: dict[str, Any]) -> Path:
    data = load_tokens(cfg["paths"]["tokens"])
    out = Path(cfg["paths"]["gpt"])
    metrics = train_gpt(
        cfg["gpt"],
        tokens=data.tokens,
        episode_starts=data.episode_starts,
        episode_terminal=data.episode_terminal,
        obs_dim=data.obs_dim,
        act_dim=data.act_dim,
        vocab_size=data.vocab_size,
        seed=cfg["seed"],
        out_path=out,
        progress=cfg["progress"],
        device=resolve_device(cfg["device"]),
    )
    write_model_metrics(
        cfg,
        "gpt",
        metrics,
        train_ll=metrics["train_ll_per_token"],
        heldout_ll=metrics["heldout_ll_per_token"],
    )
    return out
