"""Value labels, discretizers and token files against hand-computed answers."""

import numpy as np
import pytest

from trifle.data.discretize import Discretizer, fit_quantile
from trifle.data.labels import (
    discounted_values,
    label_trajectories,
    load_labeled,
    save_labeled,
    segment_episodes,
)
from trifle.data.tokens import load_tokens, save_tokens, tokenize
from trifle.errors import DataError

DISC = {
    "observations": "categorical",
    "actions": "categorical",
    "rewards": "categorical",
    "values": "quantile",
    "n_bins": 4,
}


def _arrays() -> dict[str, np.ndarray]:
    # Two episodes: rows 0-2 end in a real terminal, rows 3-4 end in a timeout.
    return {
        "observations": np.array([[0], [1], [2], [0], [1]], np.float32),
        "actions": np.array([[1], [0], [1], [1], [1]], np.float32),
        "rewards": np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32),
        "terminals": np.array([0, 0, 1, 0, 0], bool),
        "timeouts": np.array([0, 0, 0, 0, 1], bool),
    }


def test_segment_marks_unfinished_tail_as_timeout():
    starts, terminal = segment_episodes(np.array([0, 1, 0, 0], bool), np.zeros(4, bool))
    assert starts.tolist() == [0, 2] and terminal.tolist() == [True, False]


def test_values_are_discounted_rewards_after_each_step():
    v = discounted_values(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0, 3]), 0.5)
    assert np.allclose(v, [2.0 + 0.5 * 3.0, 3.0, 0.0, 5.0, 0.0])


def test_termination_penalty_replaces_terminal_reward():
    labeled = label_trajectories(_arrays(), discount=0.5, termination_penalty=-100.0)
    assert labeled.rewards.tolist() == [1.0, 2.0, -100.0, 4.0, 5.0]
    assert np.allclose(labeled.values[:3], [2.0 - 50.0, -100.0, 0.0])
    assert labeled.episode_terminal.tolist() == [True, False]


def test_nan_reward_is_rejected_with_key_and_row():
    arrays = _arrays()
    arrays["rewards"][3] = np.nan
    with pytest.raises(DataError, match=r"d\.hdf5: key 'rewards'.*row 3"):
        label_trajectories(arrays, discount=0.9, termination_penalty=None, source="d.hdf5")


def test_quantile_bins_have_equal_mass_and_mean_representatives():
    x = np.arange(100, dtype=float)
    bins = fit_quantile(x, 4)
    tokens = bins.encode(x, "x")
    assert np.bincount(tokens).tolist() == [25, 25, 25, 25]
    assert np.allclose(bins.values, [12.0, 37.0, 62.0, 87.0])


def test_quantile_ties_merge_bins():
    bins = fit_quantile(np.array([0.0] * 90 + [1.0] * 10), 10)
    assert bins.num_bins == 2 and bins.values.tolist() == [0.0, 1.0]


def test_categorical_round_trip_is_exact_and_unknown_values_fail():
    data = np.array([[2.0, -1.0], [5.0, 20.0], [2.0, -4.0]])
    disc = Discretizer.fit(data, ["categorical", "categorical"], ["a", "b"], n_bins=2)
    tokens = disc.encode(data)
    assert np.array_equal(disc.decode(tokens), data)
    assert disc.vocab_size == 3
    with pytest.raises(DataError, match="column 'b'"):
        disc.encode(np.array([[2.0, 7.0]]))


def test_declared_categories_cover_unvisited_states():
    labeled = label_trajectories(_arrays(), discount=0.9, termination_penalty=None)
    data = tokenize(labeled, DISC, obs_cardinalities=[6], num_actions=3)
    assert data.discretizer.columns[0].num_bins == 6 and data.discretizer.columns[1].num_bins == 3
    assert data.tokens[:, 0].tolist() == [0, 1, 2, 0, 1]


def test_token_and_label_files_round_trip(tmp_path):
    labeled = label_trajectories(_arrays(), discount=0.9, termination_penalty=None)
    save_labeled(tmp_path / "l.npz", labeled)
    again = load_labeled(tmp_path / "l.npz")
    assert np.array_equal(again.values, labeled.values)
    data = tokenize(again, DISC)
    save_tokens(tmp_path / "t.npz", data)
    loaded = load_tokens(tmp_path / "t.npz")
    assert np.array_equal(loaded.tokens, data.tokens)
    assert np.array_equal(loaded.discretizer.decode(loaded.tokens), data.discretizer.decode(data.tokens))
    assert (loaded.obs_dim, loaded.act_dim) == (1, 1)


def test_corrupt_token_file_names_the_file(tmp_path):
    bad = tmp_path / "t.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="t.npz"):
        load_tokens(bad)
    with pytest.raises(DataError, match="not found"):
        load_tokens(tmp_path / "missing.npz")


def test_a_heavy_atom_gets_its_own_bin():
    x = np.concatenate([np.zeros(900), np.linspace(0.5, 1.0, 100)])
    bins = fit_quantile(x, 10)
    tokens = bins.encode(x, "x")
    assert set(tokens[:900]) == {0} and 0 not in set(tokens[900:])
    assert bins.values[0] == 0.0 and bins.num_bins <= 10


def test_a_rare_extreme_atom_gets_its_own_bin_at_either_end():
    """Hopper's fall penalty: 0.1% of the rewards, all exactly -100, far below the rest."""
    rng = np.random.default_rng(0)
    rewards = np.concatenate([rng.normal(3.0, 1.0, 20_000), np.full(25, -100.0)])
    bins = fit_quantile(rewards, 100)
    assert bins.num_bins == 100
    assert bins.values[0] == -100.0  # alone: the bin's mean is the penalty itself
    assert (np.searchsorted(bins.edges, rewards, side="right") == 0).sum() == 25
    # The other 99 bins still hold equal mass of the remaining values.
    counts = np.bincount(np.searchsorted(bins.edges, rewards, side="right"), minlength=100)[1:]
    assert counts.max() - counts.min() <= 1
    clipped = np.concatenate([rng.uniform(-1, 1, 5000), np.full(10, 1.0)])
    top = fit_quantile(clipped, 50)
    assert top.num_bins == 50 and top.values[-1] == 1.0
    assert (np.searchsorted(top.edges, clipped, side="right") == 49).sum() == 10


def test_a_single_extreme_value_is_not_an_atom():
    x = np.concatenate([np.linspace(0.0, 1.0, 999), [-100.0]])
    bins = fit_quantile(x, 10)
    assert bins.values[0] > -100.0  # one draw of a continuous value: pooled with its neighbours
