"""The one on-disk dataset format of the project: D4RL's flat hdf5 layout.

Every task, downloaded (Gym-MuJoCo) or generated (Taxi, FrozenLake), is stored as root datasets
``observations [N, obs_dim] float32``, ``actions [N, act_dim] float32``, ``rewards [N] float32``,
``terminals [N] bool`` and ``timeouts [N] bool`` (mutually exclusive, as in D4RL), plus optional
extra ``[N, ...]`` datasets such as ``next_observations`` and ``infos/*``. Discrete tasks store their
integer observations/actions as float32 too and carry the root attributes ``obs_cardinalities`` and
``num_actions``; that is how loaders know the data are discrete. Attributes are stored as JSON text so
that nested values (generator parameters) round-trip exactly.

Both :func:`save_dataset` and :func:`load_dataset` run the same checks, so an invalid file is never
written and a damaged one is reported with its path, the key and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from trifle.errors import DataError
from trifle.io import atomic_path

REQUIRED_DTYPES: dict[str, type] = {
    "observations": np.float32,
    "actions": np.float32,
    "rewards": np.float32,
    "terminals": np.bool_,
    "timeouts": np.bool_,
}


@dataclass
class Dataset:
    """A validated D4RL-layout dataset; ``extras`` holds every optional array by its hdf5 path."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_discrete(self) -> bool:
        return "obs_cardinalities" in self.attrs and "num_actions" in self.attrs

    @property
    def episode_ends(self) -> np.ndarray:
        """Indices of the last step of each complete episode."""
        return np.flatnonzero(self.terminals | self.timeouts)

    @property
    def num_episodes(self) -> int:
        return int(self.episode_ends.size)

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays keyed by hdf5 path (the inverse of :func:`save_dataset`'s ``arrays``)."""
        return {key: getattr(self, key) for key in REQUIRED_DTYPES} | self.extras


def save_dataset(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write ``arrays`` (hdf5 path -> array) and ``attrs`` atomically, casting required keys to D4RL dtypes.

    Boolean flags may be given as integers 0/1; anything else that cannot be cast exactly is rejected.
    """
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    for key, dtype in REQUIRED_DTYPES.items():
        if key in arrays:
            arrays[key] = _cast(path, key, arrays[key], dtype)
    _validate(path, arrays, attrs)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, compression="gzip" if value.ndim else None)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value, sort_keys=True)


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate a D4RL-layout hdf5 file; every problem raises :class:`DataError`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found (expected a D4RL-layout .hdf5 file)")
    try:
        with h5py.File(p, "r") as f:
            arrays: dict[str, np.ndarray] = {}
            f.visititems(
                lambda name, obj: arrays.__setitem__(name, obj[()]) if _is_step_array(name, obj) else None
            )
            attrs = _decoded_attrs(f)
    except OSError as err:
        raise DataError(f"{p}: not a readable hdf5 file ({err})") from err
    _validate(p, arrays, attrs)
    required = {key: arrays.pop(key) for key in REQUIRED_DTYPES}
    return Dataset(**required, extras=arrays, attrs=attrs)


def load_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's attributes alone, decoded as :func:`load_dataset` decodes them, without reading or
    validating any array (for a stage that needs, say, the reference scores, not the data)."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            return _decoded_attrs(f)
    except OSError as err:
        raise DataError(f"{p}: not a readable hdf5 file ({err})") from err


def _decoded_attrs(f: h5py.File) -> dict[str, Any]:
    return {key: _decode_attr(value) for key, value in f.attrs.items()}


def _is_step_array(name: str, obj: Any) -> bool:
    """Per-step arrays only: D4RL's policy datasets also hold ``metadata/*`` (the behaviour policy's
    weights and description), which is not one row per step and no stage reads."""
    return isinstance(obj, h5py.Dataset) and not name.startswith("metadata/")


def _cast(path: str | os.PathLike[str], key: str, value: np.ndarray, dtype: type) -> np.ndarray:
    if dtype is np.bool_ and value.dtype != np.bool_ and not np.isin(value, (0, 1)).all():
        raise DataError(f"{path}: key {key!r} must hold booleans (or 0/1), got other values")
    return value.astype(dtype, copy=False)


def _decode_attr(value: Any) -> Any:
    """JSON-decode our attributes; leave foreign (non-JSON) attributes as plain Python values."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _validate(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Check keys, dtypes, shapes, finiteness, episode ends and discrete ranges."""
    for key, dtype in REQUIRED_DTYPES.items():
        if key not in arrays:
            raise DataError(
                f"{path}: missing required key {key!r} (D4RL layout needs {sorted(REQUIRED_DTYPES)})"
            )
        if arrays[key].dtype != dtype:
            raise DataError(f"{path}: key {key!r} has dtype {arrays[key].dtype}, expected {np.dtype(dtype)}")
    n = arrays["observations"].shape[0] if arrays["observations"].ndim else -1
    for key, value in arrays.items():
        want_ndim = 2 if key in ("observations", "actions") else 1 if key in REQUIRED_DTYPES else None
        if (want_ndim is not None and value.ndim != want_ndim) or value.ndim == 0 or value.shape[0] != n:
            expected = f"{want_ndim}-D" if want_ndim else "at least 1-D"
            raise DataError(
                f"{path}: key {key!r} has shape {value.shape}, expected {expected} with N={n} rows "
                "(the length of 'observations')"
            )
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise DataError(f"{path}: key {key!r} contains NaN or infinite values at row {_first_bad(value)}")
    if n == 0:
        raise DataError(f"{path}: dataset is empty (N=0)")
    if np.any(arrays["terminals"] & arrays["timeouts"]):
        raise DataError(
            f"{path}: keys 'terminals' and 'timeouts' are both true on a step; D4RL keeps them exclusive"
        )
    if not np.any(arrays["terminals"] | arrays["timeouts"]):
        raise DataError(f"{path}: no episode end (no true value in 'terminals' or 'timeouts')")
    _validate_discrete(path, arrays, attrs)


def _first_bad(value: np.ndarray) -> int:
    return int(np.flatnonzero(~np.isfinite(value).reshape(value.shape[0], -1).all(-1))[0])


def _validate_discrete(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], attrs: dict[str, Any]
) -> None:
    """Discrete data must hold integers inside their declared cardinalities, or token ids would be wrong."""
    if "obs_cardinalities" not in attrs and "num_actions" not in attrs:
        return
    if "obs_cardinalities" not in attrs or "num_actions" not in attrs:
        raise DataError(
            f"{path}: discrete datasets need both attributes 'obs_cardinalities' and 'num_actions'"
        )
    cards = np.asarray(attrs["obs_cardinalities"], dtype=np.int64)
    obs, act = arrays["observations"], arrays["actions"]
    if obs.shape[1] != cards.size:
        raise DataError(
            f"{path}: key 'observations' has {obs.shape[1]} columns, 'obs_cardinalities' has {cards.size}"
        )
    if np.any(obs != np.round(obs)) or np.any(obs < 0) or np.any(obs >= cards):
        raise DataError(
            f"{path}: key 'observations' must hold integers in [0, obs_cardinalities={cards.tolist()})"
        )
    num_actions = int(attrs["num_actions"])
    if act.shape[1] != 1 or np.any(act != np.round(act)) or np.any(act < 0) or np.any(act >= num_actions):
        raise DataError(f"{path}: key 'actions' must be [N, 1] integers in [0, num_actions={num_actions})")
