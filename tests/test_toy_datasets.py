"""Generated Taxi / FrozenLake datasets: determinism, episode structure, consistency with the MDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trifle.data.d4rl_format import load_dataset, save_dataset
from trifle.data.toy_datasets import episode_returns, generate_frozenlake_dataset, generate_taxi_dataset
from trifle.envs import (
    TabularMDP,
    evaluate_policy,
    greedy_policy,
    make_frozenlake,
    make_taxi,
    value_iteration,
)
from trifle.errors import ConfigError


@pytest.fixture(scope="module")
def taxi_data() -> tuple[dict, dict]:
    return generate_taxi_dataset(num_episodes=20, seed=5, progress=False)


def check_episode_structure(arrays: dict[str, np.ndarray], max_steps: int) -> np.ndarray:
    """Every episode ends with exactly one flag, flags appear nowhere else, and states chain within episodes."""
    ends = arrays["terminals"] | arrays["timeouts"]
    assert not np.any(arrays["terminals"] & arrays["timeouts"])
    assert ends[-1]
    lengths = np.diff(np.concatenate([[-1], np.flatnonzero(ends)]))
    assert lengths.min() >= 1 and lengths.max() <= max_steps
    assert np.all(lengths[arrays["timeouts"][ends]] == max_steps)  # timeouts only at the step limit
    within = ~ends[:-1]
    np.testing.assert_array_equal(
        arrays["next_observations"][:-1][within], arrays["observations"][1:][within]
    )
    return lengths


def check_steps_possible(mdp: TabularMDP, arrays: dict[str, np.ndarray]) -> None:
    """Each recorded (s, a, r, s', terminal) must be a positive-probability outcome of the MDP."""
    s = arrays["infos/state"]
    a = arrays["actions"][:, 0].astype(np.int64)
    nxt = mdp.encode(arrays["next_observations"].astype(np.int64))
    np.testing.assert_array_equal(mdp.decode(s), arrays["observations"])
    match = (
        (mdp.prob[s, a] > 0)
        & (mdp.next_state[s, a] == nxt[:, None])
        & (mdp.reward[s, a] == arrays["rewards"][:, None])
        & (mdp.terminal[s, a] == arrays["terminals"][:, None])
    )
    assert match.any(-1).all()


def test_taxi_dataset_structure(taxi_data: tuple[dict, dict]) -> None:
    arrays, attrs = taxi_data
    lengths = check_episode_structure(arrays, max_steps=300)
    check_steps_possible(make_taxi(), arrays)
    assert lengths.size == 20 and arrays["terminals"].sum() == 20 and not arrays["timeouts"].any()
    assert arrays["infos/success"][arrays["terminals"]].all()  # only delivering episodes are kept
    assert np.all(arrays["rewards"][arrays["terminals"]] == 20.0)
    assert attrs["success_rate"] == 1.0 and attrs["num_episodes"] == 20
    assert attrs["mean_return"] == pytest.approx(episode_returns(arrays).mean())
    assert attrs["generator"]["q_learning_episodes"] >= 20
    assert attrs["obs_cardinalities"] == [5, 5, 5, 4] and attrs["num_actions"] == 6


def test_taxi_dataset_is_deterministic(taxi_data: tuple[dict, dict], tmp_path: Path) -> None:
    again, attrs = generate_taxi_dataset(num_episodes=20, seed=5, progress=False)
    other, _ = generate_taxi_dataset(num_episodes=20, seed=6, progress=False)
    for key, value in taxi_data[0].items():
        np.testing.assert_array_equal(again[key], value)
    assert not np.array_equal(other["rewards"][:50], again["rewards"][:50])
    for i, (arrays, at) in enumerate((taxi_data, (again, attrs))):
        save_dataset(tmp_path / f"taxi{i}.hdf5", arrays, at)
    assert (tmp_path / "taxi0.hdf5").read_bytes() == (tmp_path / "taxi1.hdf5").read_bytes()


def test_frozenlake_dataset_structure_and_round_trip(tmp_path: Path) -> None:
    arrays, attrs = generate_frozenlake_dataset(epsilon=0.0, num_episodes=300, seed=1, progress=False)
    check_episode_structure(arrays, max_steps=100)
    check_steps_possible(make_frozenlake(), arrays)
    assert arrays["timeouts"].any()  # the cautious optimal policy times out ~10% of the time
    assert attrs["num_episodes"] == 300 and attrs["task"] == "frozenlake-eps0.0"
    assert attrs["generator"]["behaviour_expected_return"] == pytest.approx(0.7402, abs=1e-4)
    save_dataset(tmp_path / "fl.hdf5", arrays, attrs)
    ds = load_dataset(tmp_path / "fl.hdf5")
    assert ds.is_discrete and ds.num_episodes == 300 and ds.attrs == attrs


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0])
def test_frozenlake_behaviour_matches_exact_return(epsilon: float) -> None:
    arrays, attrs = generate_frozenlake_dataset(epsilon=epsilon, num_episodes=3000, seed=2, progress=False)
    mdp = make_frozenlake()
    q, _ = value_iteration(mdp, 0.99)
    exact = evaluate_policy(mdp, (1 - epsilon) * greedy_policy(q) + epsilon / 4).expected_return
    assert attrs["generator"]["behaviour_expected_return"] == pytest.approx(exact)
    assert abs(attrs["mean_return"] - exact) < 4 * np.sqrt(exact * (1 - exact) / 3000) + 1e-9
    assert attrs["success_rate"] == pytest.approx(attrs["mean_return"])  # reward 1 exactly on success


def test_frozenlake_dataset_is_deterministic() -> None:
    a, _ = generate_frozenlake_dataset(epsilon=0.3, num_episodes=50, seed=9, progress=False)
    b, _ = generate_frozenlake_dataset(epsilon=0.3, num_episodes=50, seed=9, progress=False)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: generate_frozenlake_dataset(epsilon=1.5, progress=False), "epsilon"),
        (lambda: generate_frozenlake_dataset(epsilon=-0.1, progress=False), "epsilon"),
        (lambda: generate_frozenlake_dataset(epsilon=0.3, num_episodes=0, progress=False), "num_episodes"),
        (lambda: generate_taxi_dataset(epsilon=2.0, progress=False), "epsilon"),
        (lambda: generate_taxi_dataset(num_episodes=0, progress=False), "num_episodes"),
        (lambda: generate_taxi_dataset(learning_rate=-1.0, progress=False), "learning_rate"),
    ],
)
def test_invalid_options(call, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        call()
