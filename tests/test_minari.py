"""The `minari` data source: a Minari dataset on disk, converted into the project's D4RL layout.

The fixture writes a small dataset of real Hopper-v5 steps (random actions) in exactly the layout of
Minari 0.5.4's hdf5 storage (``minari/dataset/_storages/hdf5_storage.py``: one ``episode_<i>`` group per
episode, T+1 observations and infos, chunked resizable datasets, the episode attrs) with its
``metadata.json`` fields. Where the ``minari`` package is installed, ``minari.load_dataset`` must read
those files and agree with them, so the hand-written layout is Minari's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium
import h5py
import numpy as np
import pytest

from trifle.data import minari_datasets
from trifle.data.d4rl_format import load_dataset
from trifle.data.minari_datasets import load_minari_dataset
from trifle.envs.mujoco import normalized_score, reference_scores
from trifle.errors import ConfigError, DataError

DATASET_ID = "trifle-test/hopper/random-v0"
REF_MIN, REF_MAX = -20.0, 3000.0
MAX_STEPS = 25  # short episodes, so some end by truncation and some by a fall


def _box(space: gymnasium.spaces.Box) -> str:
    """minari.serialization.serialize_space of a Box."""
    return json.dumps(
        {
            "type": "Box",
            "dtype": str(space.dtype),
            "shape": list(space.shape),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    )


def _rollout(env: gymnasium.Env, rng: np.random.Generator, seed: int) -> dict:
    obs, info = env.reset(seed=seed)
    episode = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
    infos = {"x_position": [info["x_position"]], "sim": {"qpos": [env.unwrapped.data.qpos.copy()]}}
    while True:
        action = rng.uniform(-1.0, 1.0, size=env.action_space.shape).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        for key, value in (
            ("observations", obs),
            ("actions", action),
            ("rewards", reward),
            ("terminations", terminated),
            ("truncations", truncated),
        ):
            episode[key].append(value)
        infos["x_position"].append(info["x_position"])
        infos["sim"]["qpos"].append(env.unwrapped.data.qpos.copy())
        if terminated or truncated:
            return episode | {"infos": infos, "seed": seed}


def _write_group(group: h5py.Group, data: dict) -> None:
    """hdf5_storage._add_episode_to_group: dicts become groups, lists chunked datasets resizable in rows."""
    for key, value in data.items():
        if isinstance(value, dict):
            _write_group(group.create_group(key), value)
        else:
            value = np.asarray(value)
            group.create_dataset(key, data=value, chunks=True, maxshape=(None, *value.shape[1:]))


def write_minari_dataset(
    root: Path, dataset_id: str = DATASET_ID, episodes: int = 4, env_id: str = "Hopper-v5", refs: bool = True
) -> tuple[Path, list[dict]]:
    """A Minari dataset of real ``env_id`` steps at ``root/<dataset_id>``, as Minari writes it."""
    env = gymnasium.make(env_id, max_episode_steps=MAX_STEPS)
    rng = np.random.default_rng(0)
    data = root / dataset_id / "data"
    data.mkdir(parents=True)
    written = [_rollout(env, rng, seed) for seed in range(episodes)]
    with h5py.File(data / "main_data.hdf5", "w", track_order=True) as f:
        for i, episode in enumerate(written):
            group = f.create_group(f"episode_{i}")
            group.attrs["id"] = i
            group.attrs["seed"] = episode["seed"]
            group.attrs["total_steps"] = len(episode["rewards"])
            _write_group(group, {k: v for k, v in episode.items() if k != "seed"})
    metadata = {
        "total_episodes": episodes,
        "total_steps": sum(len(e["rewards"]) for e in written),
        "data_format": "hdf5",
        "jpeg_encoding": True,
        "observation_space": _box(env.observation_space),
        "action_space": _box(env.action_space),
        "env_spec": env.spec.to_json(),
        "dataset_id": dataset_id,
        "algorithm_name": "random",
        "author": ["trifle tests"],
        "author_email": ["none"],
        "code_permalink": "tests/test_minari.py",
        "description": "random Hopper-v5 steps",
        "minari_version": "0.5.4",
        "dataset_size": 0.1,
    }
    if refs:
        metadata |= {"ref_min_score": REF_MIN, "ref_max_score": REF_MAX, "num_episodes_average_score": 100}
    (data / "metadata.json").write_text(json.dumps(metadata))
    env.close()
    return data.parent, written


@pytest.fixture()
def minari_root(tmp_path, monkeypatch) -> tuple[Path, list[dict]]:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root, write_minari_dataset(root)[1]


def test_minari_reads_the_hand_written_dataset(minari_root):
    """Minari's own loader reads the fixture's files and returns the very episodes written."""
    minari = pytest.importorskip("minari", reason="the `minari` package is not installed (the minari extra)")
    _, written = minari_root
    dataset = minari.load_dataset(DATASET_ID)
    assert dataset.total_episodes == len(written) and dataset.env_spec.id == "Hopper-v5"
    for episode, want in zip(dataset.iterate_episodes(), written, strict=True):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(episode, key), np.asarray(want[key]))
        np.testing.assert_array_equal(episode.infos["sim"]["qpos"], np.asarray(want["infos"]["sim"]["qpos"]))
    returns = np.array([sum(e["rewards"]) for e in written])
    ours = normalized_score("hopper-v5", returns, {"ref_min_score": REF_MIN, "ref_max_score": REF_MAX})
    np.testing.assert_allclose(ours / 100.0, minari.get_normalized_score(dataset, returns))


def test_conversion_concatenates_the_episodes(minari_root):
    _, written = minari_root
    arrays, attrs = load_minari_dataset("hopper-v5", dataset_id=DATASET_ID)
    lengths = [len(e["rewards"]) for e in written]
    ends = np.cumsum(lengths) - 1
    for key, minari_key, rows in (
        ("observations", "observations", slice(None, -1)),
        ("next_observations", "observations", slice(1, None)),
        ("actions", "actions", slice(None)),
        ("rewards", "rewards", slice(None)),
        ("infos/x_position", None, slice(None, -1)),
    ):
        series = [
            np.asarray(e[minari_key] if minari_key else e["infos"]["x_position"])[rows] for e in written
        ]
        np.testing.assert_array_equal(arrays[key], np.concatenate(series))
    np.testing.assert_array_equal(
        arrays["infos/sim/qpos"],
        np.concatenate([np.asarray(e["infos"]["sim"]["qpos"])[:-1] for e in written]),
    )
    term = np.concatenate([e["terminations"] for e in written])
    trunc = np.concatenate([e["truncations"] for e in written])
    np.testing.assert_array_equal(arrays["terminals"], term)
    np.testing.assert_array_equal(arrays["timeouts"], trunc & ~term)
    assert term.any() and trunc.any(), "the fixture should hold both kinds of episode end"
    np.testing.assert_array_equal(np.flatnonzero(arrays["terminals"] | arrays["timeouts"]), ends)
    assert attrs["env"] == "hopper-v5" and attrs["gym_id"] == "Hopper-v5"
    assert attrs["minari_dataset_id"] == DATASET_ID and attrs["num_episodes"] == len(written)
    assert (attrs["ref_min_score"], attrs["ref_max_score"]) == (REF_MIN, REF_MAX)
    assert attrs["unflagged_episode_ends"] == 0
    assert reference_scores("hopper-v5", attrs) == (REF_MIN, REF_MAX)


def test_a_local_directory_needs_no_id(tmp_path):
    directory, written = write_minari_dataset(tmp_path / "elsewhere")
    for path in (directory, directory / "data"):
        arrays, _ = load_minari_dataset("hopper-v5", path=str(path))
        assert len(arrays["rewards"]) == sum(len(e["rewards"]) for e in written)


def test_data_stage_writes_a_minari_dataset(minari_root, tmp_path, capsys):
    """`data` end to end on a local Minari directory: the project's file, its attrs and the scores the
    evaluation would use."""
    from trifle.config import compose
    from trifle.stages import data, evaluate

    root, written = minari_root
    cfg = compose(["task=hopper-medium-minari", f"task.dataset.dataset_id={DATASET_ID}", "progress=false"])
    out = tmp_path / "raw" / "hopper-medium-minari.hdf5"
    cfg["paths"]["raw"] = str(out)
    assert data.run(cfg) == out
    stored = load_dataset(out)
    assert stored.num_episodes == len(written) and stored.attrs["gym_id"] == "Hopper-v5"
    assert evaluate.score_references(cfg) == {"ref_min_score": REF_MIN, "ref_max_score": REF_MAX}
    # The same through `path`, with the command line's config checks.
    cfg = compose(
        [
            "task=hopper-medium-minari",
            "task.dataset.dataset_id=null",
            f"task.dataset.path={root / DATASET_ID}",
        ]
    )
    cfg["paths"]["raw"] = str(tmp_path / "second.hdf5")
    assert load_dataset(data.run(cfg)).num_episodes == len(written)


def test_missing_reference_scores_leave_the_scores_out(tmp_path, capsys):
    from trifle.stages import evaluate

    directory, _ = write_minari_dataset(tmp_path / "m", refs=False)
    arrays, attrs = load_minari_dataset("hopper-v5", path=str(directory))
    assert attrs["ref_min_score"] is None and reference_scores("hopper-v5", attrs) is None
    with pytest.raises(DataError, match="no reference scores for env 'hopper-v5'"):
        normalized_score("hopper-v5", 1.0, attrs)
    from trifle.data.d4rl_format import save_dataset

    raw = tmp_path / "raw.hdf5"
    save_dataset(raw, arrays, attrs)
    cfg = {"task": {"name": "hopper-minari", "env": "hopper-v5"}, "paths": {"raw": str(raw)}}
    assert evaluate.score_references(cfg) is None
    assert f"its dataset {raw} has no ref_min_score/ref_max_score" in capsys.readouterr().out
    # D4RL's reference scores still hold for the v4 envs.
    assert reference_scores("hopper", attrs) == reference_scores("hopper")


def test_env_version_mismatch_names_both(minari_root):
    with pytest.raises(
        ConfigError, match=r"task.env='hopper' evaluates in Hopper-v4.*Hopper-v5; set task.env=hopper-v5"
    ):
        load_minari_dataset("hopper", dataset_id=DATASET_ID)


def test_option_errors_name_the_keys(minari_root):
    with pytest.raises(ConfigError, match="exactly one of `dataset_id`.*got both"):
        load_minari_dataset("hopper-v5", dataset_id=DATASET_ID, path="/x")
    with pytest.raises(ConfigError, match="got neither"):
        minari_datasets.check_options({"generator": "minari"})
    with pytest.raises(ConfigError, match=r"not \['name'\]"):
        minari_datasets.check_options({"generator": "minari", "dataset_id": DATASET_ID, "name": "x"})
    from trifle.config import compose

    with pytest.raises(ConfigError, match="got both"):
        compose(["task=hopper-medium-minari", "task.dataset.path=/x"])


def test_missing_path_or_id_is_one_line(minari_root, monkeypatch, tmp_path):
    with pytest.raises(DataError, match="not a Minari dataset directory"):
        load_minari_dataset("hopper-v5", path=str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "minari", None)  # as if not installed
    with pytest.raises(DataError, match="is not in .* the `minari` package is not installed"):
        load_minari_dataset("hopper-v5", dataset_id="trifle-test/hopper/absent-v0")


def test_a_failed_download_is_one_line(minari_root, monkeypatch):
    minari = pytest.importorskip("minari", reason="the `minari` package is not installed (the minari extra)")

    def refuse(dataset_id, force_download=False):
        raise ValueError(f"Couldn't find any version for dataset {dataset_id}")

    monkeypatch.setattr(minari, "download_dataset", refuse)
    with pytest.raises(DataError, match="'trifle-test/hopper/absent-v0': download failed \\(ValueError"):
        load_minari_dataset("hopper-v5", dataset_id="trifle-test/hopper/absent-v0")


def test_damaged_episodes_are_named(tmp_path):
    directory, _ = write_minari_dataset(tmp_path / "m", episodes=2)
    with h5py.File(directory / "data" / "main_data.hdf5", "a") as f:
        del f["episode_1/observations"]
        f["episode_1"].create_dataset("observations", data=np.zeros((3, 11)))
    with pytest.raises(DataError, match="episode_1: expected T\\+1 observations"):
        load_minari_dataset("hopper-v5", path=str(directory))
