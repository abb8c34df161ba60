"""Stage `train_dt`: fit the Decision Transformer baseline on a task's labeled (raw) trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.labels import load_labeled
from trifle.devices import resolve_device
from trifle.models.dt_training import train_dt
from trifle.models.metrics import write_model_metrics


def run(cfg: dict[str, Any]) -> Path:
    labeled = load_labeled(cfg["paths"]["labeled"])
    out = Path(cfg["paths"]["dt"])
    metrics = train_dt(
        cfg["dt"],
        labeled=labeled,
        seed=cfg["seed"],
        out_path=out,
        progress=cfg["progress"],
        device=resolve_device(cfg["device"]),
    )
    # For discrete actions the per-token log-likelihood is that of the dataset actions (nats), the
    # quantity comparable across models; a continuous DT is a regressor and has none (null).
    write_model_metrics(
        cfg, "dt", metrics, train_ll=metrics["train_ll_per_token"], heldout_ll=metrics["heldout_ll_per_token"]
    )
    return out
