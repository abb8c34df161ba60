"""Round trip and every validation failure of the D4RL-layout hdf5 format."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from trifle.data.d4rl_format import load_dataset, save_dataset
from trifle.errors import DataError


def valid_arrays(n: int = 6) -> dict[str, np.ndarray]:
    """Two episodes: one terminated at step 3, one timed out at step 6."""
    terminals = np.zeros(n, dtype=bool)
    timeouts = np.zeros(n, dtype=bool)
    terminals[2], timeouts[n - 1] = True, True
    return {
        "observations": np.arange(n * 2, dtype=np.float32).reshape(n, 2) % 3,
        "actions": (np.arange(n, dtype=np.float32) % 4)[:, None],
        "rewards": np.linspace(-1, 1, n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/illegal": np.array([True, False, False, True, False, False]),
    }


ATTRS = {
    "task": "unit",
    "obs_cardinalities": [3, 3],
    "num_actions": 4,
    "generator": {"epsilon": 0.3, "ids": [1, 2]},
}


def write_raw(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Bypass save_dataset's checks to produce the damaged files a loader must reject."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def test_round_trip(tmp_path: Path) -> None:
    arrays = valid_arrays()
    path = tmp_path / "sub" / "data.hdf5"
    save_dataset(path, {**arrays, "terminals": arrays["terminals"].astype(np.int64)}, ATTRS)
    ds = load_dataset(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(ds.arrays()[key], value)
        assert ds.arrays()[key].dtype == value.dtype
    assert ds.attrs == ATTRS
    assert ds.is_discrete and ds.num_episodes == 2 and ds.episode_ends.tolist() == [2, 5]
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.hdf5"]  # no temporary left behind


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.hdf5: dataset file not found"):
        load_dataset(tmp_path / "nope.hdf5")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.hdf5"
    path.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(DataError, match="garbage.hdf5: not a readable hdf5 file"):
        load_dataset(path)


def test_missing_key(tmp_path: Path) -> None:
    arrays = valid_arrays()
    del arrays["timeouts"]
    with pytest.raises(DataError, match="missing required key 'timeouts'"):
        load_dataset(write_raw(tmp_path / "d.hdf5", arrays))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "observations",
            np.zeros(6, dtype=np.float32),
            "key 'observations' has shape \\(6,\\), expected 2-D",
        ),
        (
            "rewards",
            np.zeros(5, dtype=np.float32),
            "key 'rewards' has shape \\(5,\\), expected 1-D with N=6 rows \\(the length of 'observations'\\)",
        ),
        ("infos/illegal", np.zeros(4, dtype=bool), "key 'infos/illegal' has shape \\(4,\\)"),
        ("rewards", np.zeros((6, 1), dtype=np.float32), "key 'rewards' has shape \\(6, 1\\), expected 1-D"),
    ],
)
def test_wrong_shape(tmp_path: Path, key: str, value: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(write_raw(tmp_path / "d.hdf5", {**valid_arrays(), key: value}))


def test_nan_reward(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["rewards"][4] = np.nan
    with pytest.raises(DataError, match="key 'rewards' contains NaN or infinite values at row 4"):
        load_dataset(write_raw(tmp_path / "d.hdf5", arrays))
    with pytest.raises(DataError, match="'rewards' contains NaN"):
        save_dataset(tmp_path / "never.hdf5", arrays, {})
    assert not list(tmp_path.glob("*never*"))  # rejected before anything was written


def test_wrong_dtype(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["rewards"] = arrays["rewards"].astype(np.float64)
    with pytest.raises(DataError, match="key 'rewards' has dtype float64, expected float32"):
        load_dataset(write_raw(tmp_path / "d.hdf5", arrays))
    arrays = valid_arrays()
    arrays["terminals"] = arrays["terminals"].astype(np.float32)
    with pytest.raises(DataError, match="key 'terminals' has dtype float32, expected bool"):
        load_dataset(write_raw(tmp_path / "e.hdf5", arrays))
    with pytest.raises(DataError, match="'terminals' must hold booleans"):
        save_dataset(tmp_path / "f.hdf5", {**valid_arrays(), "terminals": np.full(6, 2)}, {})


def test_episode_flags(tmp_path: Path) -> None:
    arrays = valid_arrays()
    with pytest.raises(DataError, match="no episode end"):
        save_dataset(
            tmp_path / "d.hdf5", {**arrays, "terminals": np.zeros(6, bool), "timeouts": np.zeros(6, bool)}, {}
        )
    with pytest.raises(DataError, match="both true"):
        save_dataset(tmp_path / "d.hdf5", {**arrays, "timeouts": arrays["terminals"]}, {})


def test_discrete_ranges(tmp_path: Path) -> None:
    arrays = valid_arrays()
    with pytest.raises(
        DataError, match="'observations' must hold integers in \\[0, obs_cardinalities=\\[3, 2\\]\\)"
    ):
        save_dataset(tmp_path / "d.hdf5", arrays, {"obs_cardinalities": [3, 2], "num_actions": 4})
    with pytest.raises(DataError, match="'actions' must be \\[N, 1\\] integers in \\[0, num_actions=3\\)"):
        save_dataset(tmp_path / "d.hdf5", arrays, {"obs_cardinalities": [3, 3], "num_actions": 3})
    with pytest.raises(DataError, match="need both attributes"):
        save_dataset(tmp_path / "d.hdf5", arrays, {"num_actions": 4})
    save_dataset(tmp_path / "continuous.hdf5", {**arrays, "observations": arrays["observations"] + 0.5}, {})
    assert not load_dataset(tmp_path / "continuous.hdf5").is_discrete
