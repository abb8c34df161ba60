"""Exact checks of the tabular MDPs, their solvers and simulators against closed forms and gymnasium."""

from __future__ import annotations

import dataclasses

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from trifle.envs import (
    TabularGymEnv,
    TabularMDP,
    VectorTabularEnv,
    evaluate_policy,
    greedy_policy,
    make_frozenlake,
    make_mdp,
    make_taxi,
    register_envs,
    value_iteration,
)
from trifle.envs.taxi import encode_state
from trifle.errors import ConfigError, TrifleError


def small_mdp(p_end: float = 0.25, max_steps: int = 50) -> TabularMDP:
    """State 0: 'stay' earns 1 forever, 'go' earns 0 and moves to 1. State 1: earns 5 and ends w.p. p_end."""
    prob = np.array([[[1.0, 0.0], [1.0, 0.0]], [[p_end, 1 - p_end], [p_end, 1 - p_end]]])
    next_state = np.array([[[0, 0], [1, 1]], [[1, 1], [1, 1]]])
    reward = np.array([[[1.0, 0.0], [0.0, 0.0]], [[5.0, 0.0], [5.0, 0.0]]])
    terminal = np.zeros((2, 2, 2), dtype=bool)
    terminal[1, :, 0] = True
    return TabularMDP(
        name="small",
        prob=prob,
        next_state=next_state,
        reward=reward,
        terminal=terminal,
        illegal=np.zeros_like(terminal),
        success=terminal.copy(),
        initial=np.array([1.0, 0.0]),
        state_obs=np.array([[0], [1]]),
        obs_cardinalities=(2,),
        max_episode_steps=max_steps,
    )


def test_value_iteration_matches_closed_form() -> None:
    gamma, p = 0.9, 0.25
    q, v = value_iteration(small_mdp(p), gamma, tol=1e-12)
    v1 = 5 * p / (1 - gamma * (1 - p))  # V1 = 5p + gamma (1-p) V1
    assert v[1] == pytest.approx(v1, abs=1e-9)
    assert q[0, 0] == pytest.approx(1 / (1 - gamma), abs=1e-9)
    assert q[0, 1] == pytest.approx(gamma * v1, abs=1e-9)
    assert v[0] == pytest.approx(max(1 / (1 - gamma), gamma * v1), abs=1e-9)


def test_evaluate_policy_matches_geometric_closed_form() -> None:
    p, horizon = 0.25, 7
    mdp = small_mdp(p, max_steps=horizon)
    go = np.array([[0.0, 1.0], [1.0, 0.0]])
    result = evaluate_policy(mdp, go)
    # One step to reach state 1, then each of the remaining steps ends the episode w.p. p.
    alive_at_end = (1 - p) ** (horizon - 1)
    assert result.success_probability == pytest.approx(1 - alive_at_end)
    assert result.expected_return == pytest.approx(5 * (1 - alive_at_end))
    assert result.timeout_probability == pytest.approx(alive_at_end)
    assert result.expected_length == pytest.approx(1 + (1 - alive_at_end) / p)
    stay = evaluate_policy(mdp, np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert stay.expected_return == pytest.approx(horizon)
    assert stay.timeout_probability == pytest.approx(1.0)


def test_mdp_validation_rejects_bad_tables() -> None:
    mdp = small_mdp()
    with pytest.raises(ConfigError, match="prob"):
        dataclasses.replace(mdp, prob=mdp.prob * 0.5)
    with pytest.raises(ConfigError, match="next_state"):
        dataclasses.replace(mdp, next_state=mdp.next_state + 5)
    with pytest.raises(ConfigError, match="gamma"):
        value_iteration(mdp, 1.5)


def test_taxi_probabilities_and_slip_distribution() -> None:
    taxi = make_taxi()
    assert taxi.prob.shape == (500, 6, 4)
    np.testing.assert_allclose(taxi.prob.sum(-1), 1.0)
    expected = np.full((4, 4), 0.1) + np.eye(4) * 0.6  # row: intended action, col: realized direction
    for s in range(taxi.num_states):
        np.testing.assert_allclose(taxi.prob[s, :4], expected)
    np.testing.assert_array_equal(taxi.prob[:, 4:, 0], 1.0)


def taxi_outcome(taxi: TabularMDP, state: tuple[int, int, int, int], action: int, k: int) -> tuple:
    s = encode_state(*state)
    nxt = tuple(taxi.decode(taxi.next_state[s, action, k]).tolist())
    flags = (
        bool(taxi.terminal[s, action, k]),
        bool(taxi.illegal[s, action, k]),
        bool(taxi.success[s, action, k]),
    )
    return nxt, float(taxi.reward[s, action, k]), *flags


def test_taxi_hand_picked_transitions() -> None:
    taxi = make_taxi()
    south, north, east, west, pickup, dropoff = range(6)
    # From (0,1) going east hits the internal wall between columns 1 and 2.
    assert taxi_outcome(taxi, (0, 1, 2, 3), east, east) == ((0, 1, 2, 3), -4.0, False, False, False)
    # The slip outcomes of the same action: west and south succeed (-1), north hits the boundary (-5).
    assert taxi_outcome(taxi, (0, 1, 2, 3), east, west) == ((0, 0, 2, 3), -1.0, False, False, False)
    assert taxi_outcome(taxi, (0, 1, 2, 3), east, north) == ((0, 1, 2, 3), -5.0, False, False, False)
    assert taxi_outcome(taxi, (0, 1, 2, 3), east, south) == ((1, 1, 2, 3), -1.0, False, False, False)
    assert taxi_outcome(taxi, (3, 0, 2, 3), east, east) == ((3, 0, 2, 3), -4.0, False, False, False)
    assert taxi_outcome(taxi, (4, 4, 2, 3), south, south) == ((4, 4, 2, 3), -5.0, False, False, False)
    # Pickup where the passenger is not: illegal; at Y (4,0) with the passenger there: legal.
    assert taxi_outcome(taxi, (2, 2, 2, 3), pickup, 0) == ((2, 2, 2, 3), -10.0, False, True, False)
    assert taxi_outcome(taxi, (4, 0, 2, 3), pickup, 0) == ((4, 0, 4, 3), -1.0, False, False, False)
    # Delivery at B (4,3) ends the episode; dropoff without a passenger is illegal.
    assert taxi_outcome(taxi, (4, 3, 4, 3), dropoff, 0) == ((4, 3, 3, 3), 20.0, True, False, True)
    assert taxi_outcome(taxi, (4, 3, 1, 3), dropoff, 0) == ((4, 3, 1, 3), -10.0, False, True, False)
    # Dropping the passenger at a landmark other than the destination is legal, as in gymnasium.
    assert taxi_outcome(taxi, (0, 4, 4, 3), dropoff, 0) == ((0, 4, 1, 3), -1.0, False, False, False)


def test_deterministic_taxi_equals_gymnasium_taxi() -> None:
    ours = make_taxi(slip_prob=0.0, wall_penalty=-1.0, boundary_penalty=-1.0)
    gym_taxi = gymnasium.make("Taxi-v4").unwrapped
    for s in range(500):
        for a in range(6):
            (p, nxt, rew, done) = gym_taxi.P[s][a][0]
            k = a if a < 4 else 0
            got = (ours.prob[s, a, k], ours.next_state[s, a, k], ours.reward[s, a, k], ours.terminal[s, a, k])
            assert got == (p, nxt, rew, done), (s, a)
    np.testing.assert_allclose(ours.initial, gym_taxi.initial_state_distrib)


def test_encode_decode_round_trip() -> None:
    taxi = make_taxi()
    states = np.arange(taxi.num_states)
    np.testing.assert_array_equal(taxi.encode(taxi.decode(states)), states)
    assert taxi.decode(encode_state(3, 1, 4, 2)).tolist() == [3, 1, 4, 2]
    with pytest.raises(TrifleError, match="outside"):
        taxi.encode(np.array([5, 0, 0, 0]))


def test_frozenlake_equals_gymnasium_and_optimal_value() -> None:
    ours = make_frozenlake()
    table = gymnasium.make("FrozenLake-v1", is_slippery=True).unwrapped.P
    for s in range(16):
        for a in range(4):
            for k, (p, nxt, rew, done) in enumerate(table[s][a]):
                assert (ours.prob[s, a, k], ours.next_state[s, a, k], ours.reward[s, a, k]) == (p, nxt, rew)
                assert ours.terminal[s, a, k] == done
    # Independent value iteration straight on gymnasium's transition lists.
    v = np.zeros(16)
    for _ in range(3000):
        v = np.array(
            [
                max(sum(p * (r + 0.99 * v[n] * (not d)) for p, n, r, d in table[s][a]) for a in range(4))
                for s in range(16)
            ]
        )
    q, v_ours = value_iteration(ours, 0.99)
    np.testing.assert_allclose(v_ours, v, atol=1e-8)
    assert q.argmax(-1)[0] == 0  # from the start, "left" is optimal: it can never slip into a hole


def test_vector_env_matches_exact_evaluation() -> None:
    lake = make_frozenlake()
    q, _ = value_iteration(lake, 0.99)
    greedy = q.argmax(-1)
    env = VectorTabularEnv(lake, num_envs=4000, seed=3)
    env.reset()
    total = np.zeros(4000)
    while not env.done.all():
        _, reward, *_ = env.step(greedy[env.states])
        total += reward
    exact = evaluate_policy(lake, greedy_policy(q)).expected_return
    assert exact == pytest.approx(0.7402, abs=1e-4)
    assert abs(total.mean() - exact) < 4 * np.sqrt(exact * (1 - exact) / 4000)


def test_vector_env_flags_freezing_and_determinism() -> None:
    mdp = small_mdp(p_end=0.0, max_steps=3)
    env = VectorTabularEnv(mdp, num_envs=2, seed=0)
    env.reset()
    for t in range(3):
        obs, reward, terminated, truncated, info = env.step(np.array([0, 0]))
        assert reward.tolist() == [1.0, 1.0] and not terminated.any()
        assert truncated.tolist() == [t == 2, t == 2]
    _, reward, terminated, truncated, info = env.step(np.array([0, 0]))  # finished: frozen
    assert reward.tolist() == [0.0, 0.0] and not info["stepped"].any() and not truncated.any()
    env.reset(np.array([1]))
    assert env.step(np.array([0, 0]))[4]["stepped"].tolist() == [False, True]
    runs = []
    for _ in range(2):
        taxi_env = VectorTabularEnv(make_taxi(), num_envs=8, seed=11)
        obs = [taxi_env.reset()] + [taxi_env.step(np.full(8, t % 4))[0] for t in range(20)]
        runs.append(np.stack(obs))
    np.testing.assert_array_equal(runs[0], runs[1])
    with pytest.raises(TrifleError, match="actions"):
        taxi_env.step(np.full(8, 6))


def test_gym_wrapper_and_registry() -> None:
    env = TabularGymEnv(make_taxi())
    check_env(env, skip_render_check=True)
    register_envs()
    register_envs()  # idempotent
    lake = gymnasium.make("trifle/FrozenLakeSlippery-v0")
    obs, info = lake.reset(seed=0)
    assert obs.tolist() == [0, 0] and info["state"] == 0
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = lake.step(1)
        steps += 1
        if terminated or truncated:
            break
    assert steps <= 100 and (terminated != truncated)


def test_make_mdp_names_and_errors() -> None:
    assert make_mdp("taxi-stochastic").num_states == 500
    assert make_mdp("frozenlake", success_rate=1.0).prob[0, 1, 1] == 1.0
    with pytest.raises(ConfigError, match="frozenlake, taxi-stochastic"):
        make_mdp("cartpole")
    with pytest.raises(ConfigError, match="bad parameters"):
        make_mdp("taxi-stochastic", slipperiness=0.2)
