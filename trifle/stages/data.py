"""Stage `data`: produce the raw dataset of a task in D4RL's hdf5 layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.d4rl_format import save_dataset
from trifle.data.toy_datasets import generate_frozenlake_dataset, generate_taxi_dataset
from trifle.errors import ConfigError

GENERATORS = {"taxi": generate_taxi_dataset, "frozenlake": generate_frozenlake_dataset}


def run(cfg: dict[str, Any]) -> Path:
    params = dict(cfg["task"]["dataset"])
    name = params.pop("generator")
    if name not in GENERATORS:
        raise ConfigError(
            f"task.dataset.generator='{name}' is unknown; expected one of: {', '.join(GENERATORS)}"
        )
    try:
        arrays, attrs = GENERATORS[name](**params, progress=cfg["progress"])
    except TypeError as err:
        raise ConfigError(f"task.dataset: invalid options for generator '{name}': {err}") from err
    out = Path(cfg["paths"]["raw"])
    save_dataset(out, arrays, attrs)
    return out
