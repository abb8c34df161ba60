"""Stage `labels`: segment the raw dataset into episodes and attach discounted value labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.d4rl_format import load_dataset
from trifle.data.labels import label_trajectories, save_labeled


def run(cfg: dict[str, Any]) -> Path:
    raw, out = Path(cfg["paths"]["raw"]), Path(cfg["paths"]["labeled"])
    dataset = load_dataset(raw)
    labels = cfg["task"]["labels"]
    labeled = label_trajectories(
        dataset.arrays(),
        discount=labels["discount"],
        termination_penalty=labels["termination_penalty"],
        source=str(raw),
        attrs=dataset.attrs,
    )
    save_labeled(out, labeled)
    return out
