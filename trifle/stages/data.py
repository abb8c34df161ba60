"""Stage `data`: produce the raw dataset of a task in D4RL's hdf5 layout.

Sources (``task.dataset.generator``): ``d4rl`` fetches a published D4RL file (a local copy or a
verified, resumable download), ``file`` takes a D4RL-layout file of your own (``path``, optionally
pinned by ``sha256``), ``minari`` converts a Minari dataset (``dataset_id`` or ``path``; it must have been
collected in the env ``task.env`` evaluates in), ``mujoco`` generates a D4RL-format dataset in gymnasium's
MuJoCo environment, and ``taxi`` / ``frozenlake`` generate the toy tasks' datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trifle.data.d4rl_download import fetch_d4rl, fetch_file
from trifle.data.d4rl_format import load_dataset, save_dataset
from trifle.data.minari_datasets import load_minari_dataset
from trifle.data.mujoco_datasets import generate_mujoco_dataset
from trifle.data.toy_datasets import TOY_GENERATORS
from trifle.errors import ConfigError

GENERATORS = {**TOY_GENERATORS, "mujoco": generate_mujoco_dataset, "minari": load_minari_dataset}
SOURCES = ("d4rl", "file", *GENERATORS)


def _fetch(params: dict[str, Any], out: Path, progress: bool) -> None:
    try:
        fetch_d4rl(params.pop("name"), out, **params, progress=progress)
    except TypeError as err:
        raise ConfigError(f"task.dataset: invalid options for generator 'd4rl': {err}") from err


def behaviour_dir(raw: Path, params: dict[str, Any]) -> Path:
    """Where a trained behaviour policy lives: ``data/behaviour/<env>-<policy><steps>[-target<return>]-seed<seed>``.

    Keyed by what determines the policy, so tasks drawing data from the same agent share one training,
    and beside the datasets, so DVC pins and shares the trained agent with them.
    """
    agent = "sac" if params["policy"] == "sac-replay" else params["policy"]  # the replay of the same agent
    target = params.get("sac_target_return")
    stop = "" if target is None else f"-target{target:g}"
    name = f"{params['env']}-{agent}{params.get('sac_steps', '')}{stop}-seed{params.get('seed', 0)}"
    return raw.parent.parent / "behaviour" / name


def _take_file(params: dict[str, Any], out: Path, label: str) -> None:
    """Check the user's file, then place it: a wrong file fails here, not in `labels`, and is named by the
    user's path (task.dataset.path), not by the project's copy, which is then never made."""
    unknown = sorted(set(params) - {"path", "sha256"})
    if "path" not in params or unknown:
        raise ConfigError(
            f"task.dataset: generator 'file' takes `path` and an optional `sha256`, got keys {sorted(params)}"
        )
    source = Path(params["path"]).expanduser()
    if source.is_file():  # a missing file is fetch_file's to report
        load_dataset(source)
    fetch_file(source, out, sha256=params.get("sha256"), label=label)


def _generate(name: str, params: dict[str, Any], out: Path, progress: bool) -> None:
    try:
        arrays, attrs = GENERATORS[name](**params, progress=progress)
    except TypeError as err:
        raise ConfigError(f"task.dataset: invalid options for generator '{name}': {err}") from err
    save_dataset(out, arrays, attrs)


def run(cfg: dict[str, Any]) -> Path:
    params = dict(cfg["task"]["dataset"])
    name = params.pop("generator")
    if name not in SOURCES:
        raise ConfigError(
            f"task.dataset.generator='{name}' is unknown; expected one of: {', '.join(SOURCES)}"
        )
    out = Path(cfg["paths"]["raw"])
    if name == "d4rl":
        _fetch(params, out, cfg["progress"])
    elif name == "file":
        _take_file(params, out, cfg["task"]["name"])
    else:
        if name in ("mujoco", "minari"):
            params["env"] = cfg["task"]["env"]
            if name == "mujoco" and params.get("policy") in ("sac", "sac-replay"):
                params.setdefault("work_dir", str(behaviour_dir(out, params)))
        _generate(name, params, out, cfg["progress"])
    return out
