"""Stage `tokens`: fit the per-column discretizer and save tokens together with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.labels import load_labeled
from trifle.data.tokens import save_tokens, tokenize


def run(cfg: dict[str, Any]) -> Path:
    labeled = load_labeled(cfg["paths"]["labeled"])
    attrs = labeled.attrs
    data = tokenize(
        labeled,
        cfg["task"]["discretizer"],
        obs_cardinalities=attrs.get("obs_cardinalities"),
        num_actions=attrs.get("num_actions"),
    )
    out = Path(cfg["paths"]["tokens"])
    save_tokens(out, data)
    return out
