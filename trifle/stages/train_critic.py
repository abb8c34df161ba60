"""Stage `train_critic`: fit IQL's critic (twin Q, V, target Q) on a task's labeled transitions, for TT(+Q)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.labels import load_labeled
from trifle.devices import resolve_device
from trifle.models.iql_training import train_critic
from trifle.models.metrics import write_model_metrics


def run(cfg: dict[str, Any]) -> Path:
    labeled = load_labeled(cfg["paths"]["labeled"])
    out = Path(cfg["paths"]["critic"])
    metrics = train_critic(
        cfg["critic"],
        labeled=labeled,
        discount=cfg["task"]["labels"]["discount"],
        seed=cfg["seed"],
        out_path=out,
        progress=cfg["progress"],
        device=resolve_device(cfg["device"]),
    )
    # A critic models no tokens or actions: it has no log-likelihood (null in the models table); its
    # TD errors and mean Q are under `details`.
    write_model_metrics(cfg, "critic", metrics, train_ll=None, heldout_ll=None)
    return out
