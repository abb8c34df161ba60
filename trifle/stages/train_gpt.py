"""Stage `train_gpt`: fit the Trajectory-Transformer-style GPT on a task's tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.tokens import load_tokens
from trifle.io import write_json
from trifle.models.gpt_training import train_gpt
from trifle.stages.devices import resolve_device


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
    write_json(
        cfg["paths"]["gpt_metrics"],
        {
            "task": cfg["task"]["name"],
            "model": "gpt",
            "seed": cfg["seed"],
            "train_ll_per_token": metrics["train_ll_per_token"],
            "heldout_ll_per_token": metrics["heldout_ll_per_token"],
            "train_seconds": metrics["seconds"],
            "details": metrics,
        },
    )
    return out
