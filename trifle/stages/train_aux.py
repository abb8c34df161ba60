"""Stage `train_aux`: fit one return model of the optimality score (``aux.kind``: state or action)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.labels import load_labeled
from trifle.data.tokens import load_tokens
from trifle.devices import resolve_device
from trifle.models.aux_training import train_aux
from trifle.models.metrics import write_model_metrics


def run(cfg: dict[str, Any]) -> Path:
    out = Path(cfg["paths"]["aux"])
    metrics = train_aux(
        cfg["aux"],
        tokens=load_tokens(cfg["paths"]["tokens"]),
        labeled=load_labeled(cfg["paths"]["labeled"]),
        discount=cfg["task"]["labels"]["discount"],
        seed=cfg["seed"],
        out_path=out,
        progress=cfg["progress"],
        device=resolve_device(cfg["device"]),
    )
    # Log-likelihoods are of the return token alone (nats per row), not of a whole transition.
    write_model_metrics(
        cfg,
        "aux",
        metrics,
        kind=metrics["kind"],
        train_ll=metrics["train_ll_per_token"],
        heldout_ll=metrics["heldout_ll_per_token"],
    )
    return out
