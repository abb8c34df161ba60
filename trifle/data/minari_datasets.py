"""Minari datasets (Farama's successor of D4RL) converted into the project's D4RL layout.

Minari keeps a dataset as a directory ``<root>/<namespace>/<name>-v<N>/data/`` (``<root>`` is
``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``) holding ``metadata.json`` and, for its hdf5
backend, ``main_data.hdf5`` with one group ``episode_<i>`` per episode: ``observations`` (T+1 rows: the
reset observation and every next one), ``actions``, ``rewards``, ``terminations``, ``truncations`` (T
rows each) and ``infos`` (a group, possibly nested, usually T+1 rows). This is the layout of Minari 0.5.4's
own writer (``minari/dataset/_storages/hdf5_storage.py``, ``minari/storage/datasets_root_dir.py``).

The file is read with h5py directly, so converting a dataset on disk needs neither the ``minari``
package nor jax; ``minari`` (the ``minari`` extra) is imported only to download a dataset by id.

A Minari dataset names the env it was collected in (``env_spec``, e.g. ``Hopper-v5``), and its
reference returns (``ref_min_score``/``ref_max_score``) were measured there, so the task must evaluate
in that very env: :func:`load_minari_dataset` refuses a task whose ``task.env`` is another version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from trifle.errors import ConfigError, DataError

DATASETS_PATH_ENV = "MINARI_DATASETS_PATH"
DATA_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
OPTIONS = ("dataset_id", "path")


def check_options(params: dict[str, Any]) -> None:
    """``task.dataset`` of a minari task names exactly one of ``dataset_id`` and ``path``; checked when the
    config is validated, so a typo fails before any job starts."""
    unknown = sorted(set(params) - {"generator", *OPTIONS})
    if unknown:
        raise ConfigError(f"task.dataset: generator 'minari' takes `dataset_id` or `path`, not {unknown}")
    given = [key for key in OPTIONS if params.get(key) is not None]
    if len(given) != 1:
        found = "both" if given else "neither"
        raise ConfigError(
            f"task.dataset: generator 'minari' takes exactly one of `dataset_id` (e.g. mujoco/hopper/medium-v0) "
            f"and `path` (a Minari dataset directory), got {found}"
        )
    for key in given:
        if not isinstance(params[key], str) or not params[key]:
            raise ConfigError(f"task.dataset.{key} = {params[key]!r} is invalid: expected a non-empty string")


def datasets_root() -> Path:
    """Where Minari keeps its datasets: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``."""
    root = os.environ.get(DATASETS_PATH_ENV)
    return Path(root) if root is not None else Path.home() / ".minari" / "datasets"


def locate(dataset_id: str | None = None, path: str | None = None) -> Path:
    """The ``data`` directory of a dataset: ``path`` (the dataset directory or its ``data``), or the local
    copy of ``dataset_id``, downloaded with ``minari`` when it is not on disk."""
    if path is not None:
        source = Path(path).expanduser()
        data = source if (source / METADATA_FILE).is_file() else source / "data"
        if not (data / METADATA_FILE).is_file():
            raise DataError(
                f"{source}: not a Minari dataset directory (no {METADATA_FILE} in it or in its data/; "
                "task.dataset.path)"
            )
        return data
    assert dataset_id is not None
    data = datasets_root() / dataset_id / "data"
    if not (data / METADATA_FILE).is_file():
        _download(dataset_id, data)
    return data


def _download(dataset_id: str, data: Path) -> None:
    """``minari.download_dataset``, which writes under the same root (it reads ``MINARI_DATASETS_PATH``
    too)."""
    try:
        import minari
    except ImportError:
        raise DataError(
            f"Minari dataset {dataset_id!r} is not in {data.parent} and the `minari` package is not installed "
            "to download it (pip install -e '.[minari]', or set task.dataset.path to a local copy)"
        ) from None
    try:
        minari.download_dataset(dataset_id)
    except Exception as err:  # network, unknown id, version: minari raises many kinds
        raise DataError(
            f"Minari dataset {dataset_id!r}: download failed ({type(err).__name__}: {err}); "
            f"put a copy under {datasets_root()} or set task.dataset.path"
        ) from err
    if not (data / METADATA_FILE).is_file():
        raise DataError(f"Minari dataset {dataset_id!r}: downloaded, but {data / METADATA_FILE} is missing")


def read_metadata(data: Path) -> dict[str, Any]:
    """``metadata.json``, checked for what the conversion needs: the hdf5 backend and the env's id."""
    file = data / METADATA_FILE
    try:
        metadata = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: not a readable Minari metadata file ({err})") from err
    if metadata.get("data_format", "hdf5") != "hdf5":
        raise DataError(
            f"{file}: data_format is {metadata['data_format']!r}; only Minari's hdf5 format is read here"
        )
    if not isinstance(metadata.get("total_episodes"), int):
        raise DataError(f"{file}: lacks an integer 'total_episodes'")
    env_id(metadata, file)
    return metadata


def env_id(metadata: dict[str, Any], where: Path | str = METADATA_FILE) -> str:
    """The gymnasium id of the env the data was collected in (``env_spec`` is EnvSpec's JSON text)."""
    spec = metadata.get("env_spec")
    try:
        return str(json.loads(spec)["id"]) if isinstance(spec, str) else str(spec["id"])
    except (TypeError, KeyError, json.JSONDecodeError):
        raise DataError(
            f"{where}: no env_spec with an env id, so the env to evaluate in is unknown"
        ) from None


def check_env(metadata: dict[str, Any], env: str, where: Path | str) -> None:
    """The task must evaluate in the env the dataset was collected in (and its reference scores hold for)."""
    from trifle.envs.mujoco import MUJOCO_ENVS

    gym_id = env_id(metadata, where)
    if MUJOCO_ENVS.get(env) == gym_id:
        return
    names = [name for name, gid in MUJOCO_ENVS.items() if gid == gym_id]
    hint = f"set task.env={names[0]}" if names else f"supported envs: {sorted(set(MUJOCO_ENVS.values()))}"
    raise ConfigError(
        f"task.env={env!r} evaluates in {MUJOCO_ENVS.get(env, 'no MuJoCo env')}, but Minari dataset "
        f"{metadata.get('dataset_id', where)!r} was collected in {gym_id}; {hint}"
    )


def load_minari_dataset(
    env: str, dataset_id: str | None = None, path: str | None = None, progress: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A Minari dataset as D4RL-layout arrays and attrs (for :func:`trifle.data.d4rl_format.save_dataset`).

    Episodes are concatenated: ``observations`` are each episode's first T observations,
    ``next_observations`` its last T, ``terminals`` its terminations and ``timeouts`` its truncations
    (except where it also terminated: D4RL keeps the two exclusive; an episode with neither flag on its last
    step gets a timeout there, counted in the attrs' ``unflagged_episode_ends``). Numeric ``infos``
    leaves present in every episode become ``infos/<path>``, the rows of the observations. The env is
    checked before any episode is read.
    """
    check_options({"dataset_id": dataset_id, "path": path})
    data = locate(dataset_id, path)
    metadata = read_metadata(data)
    check_env(metadata, env, data / METADATA_FILE)
    arrays, unflagged = _read_episodes(data / DATA_FILE, metadata, progress)
    attrs = {
        "generator": "minari",
        "env": env,
        "gym_id": env_id(metadata),
        "minari_dataset_id": metadata.get("dataset_id"),
        "minari_version": metadata.get("minari_version"),
        "source": str(data.parent),
        "num_episodes": int(metadata["total_episodes"]),
        "unflagged_episode_ends": unflagged,
        # Minari's reference returns; None where the dataset has none (trifle.envs.mujoco.reference_scores).
        "ref_min_score": metadata.get("ref_min_score"),
        "ref_max_score": metadata.get("ref_max_score"),
    }
    return arrays, attrs


def _read_episodes(file: Path, metadata: dict[str, Any], progress: bool) -> tuple[dict[str, np.ndarray], int]:
    n = metadata["total_episodes"]
    if n < 1:
        raise DataError(f"{file}: the dataset has no episodes (total_episodes={n})")
    parts: dict[str, list[np.ndarray]] = {}
    infos: list[dict[str, np.ndarray]] = []
    unflagged = 0
    try:
        with h5py.File(file, "r") as f:
            for i in tqdm(range(n), desc="minari episodes", unit="ep", disable=not progress):
                name = f"episode_{i}"
                if name not in f:
                    raise DataError(f"{file}: lacks group {name!r} (metadata.json has total_episodes={n})")
                episode, info, flagged = _episode(f[name], f"{file}:{name}")
                unflagged += not flagged
                for key, value in episode.items():
                    parts.setdefault(key, []).append(value)
                infos.append(info)
    except OSError as err:
        raise DataError(f"{file}: not a readable hdf5 file ({err})") from err
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    steps = metadata.get("total_steps")
    if steps is not None and steps != len(arrays["rewards"]):
        raise DataError(
            f"{file}: holds {len(arrays['rewards'])} steps, metadata.json says total_steps={steps}"
        )
    shared = set.intersection(*(set(info) for info in infos))
    for key in sorted(shared):
        try:
            arrays[f"infos/{key}"] = np.concatenate([info[key] for info in infos])
        except ValueError:  # shapes differ between episodes: not a per-step array
            continue
    return arrays, unflagged


def _episode(group: Any, where: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]:
    """One episode's transitions, checked for Minari's row counts and flags only on the last step; and
    whether its last step carried a flag."""
    fields = {}
    for key in ("observations", "actions", "rewards", "terminations", "truncations"):
        if not isinstance(group.get(key), h5py.Dataset):
            raise DataError(
                f"{where}: lacks dataset {key!r} (Dict/Tuple observation or action spaces are not supported)"
            )
        fields[key] = group[key][()]
    obs, steps = fields["observations"], len(fields["rewards"])
    if (
        steps < 1
        or len(obs) != steps + 1
        or any(len(fields[k]) != steps for k in fields if k != "observations")
    ):
        raise DataError(
            f"{where}: expected T+1 observations and T actions/rewards/terminations/truncations (T >= 1), got "
            + ", ".join(f"{k} {len(v)}" for k, v in fields.items())
        )
    term = fields["terminations"].astype(bool)
    trunc = fields["truncations"].astype(bool) & ~term
    if np.any(term[:-1] | trunc[:-1]):
        raise DataError(f"{where}: an episode ends before its last step (terminations/truncations)")
    # An episode the collector stopped without a flag still ends here; a timeout keeps it apart from the
    # next one without claiming a real terminal (the attrs count these).
    flagged = bool(term[-1] or trunc[-1])
    trunc[-1] |= not term[-1]
    episode = {
        "observations": obs[:-1].reshape(steps, -1),
        "actions": fields["actions"].reshape(steps, -1),
        "rewards": fields["rewards"].reshape(steps),
        "terminals": term,
        "timeouts": trunc,
        "next_observations": obs[1:].reshape(steps, -1),
    }
    info = {}
    if isinstance(group.get("infos"), h5py.Group):
        for key, value in _leaves(group["infos"]).items():
            per_step = value.dtype.kind in "biuf" and value.ndim and len(value) in (steps, steps + 1)
            if per_step and (value.dtype.kind != "f" or np.isfinite(value).all()):
                info[key] = value[:steps]  # T+1 rows: row t is the info returned with observation t
    return episode, info, flagged


def _leaves(group: h5py.Group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every dataset under ``group`` by its path (Minari nests dict-valued infos as groups)."""
    out = {}
    for key, value in group.items():
        if isinstance(value, h5py.Group):
            out |= _leaves(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value[()]
    return out
