"""The inference-time optimality score of executed trajectories (docs/evaluation.md#optimality-score).

For an executed step (s_t, a_t), two return models of the offline data
(:mod:`trifle.models.aux_training`) give p^s(G | s_t), the data's distribution of the return
G_t = r_t + gamma V_t in the state, and p^a(G | s_t, a_t), its distribution after the action taken. The
step's score is where the action's expected return R_t = E_{p^a}[G] falls in the state's distribution:

    S_t = F^s(R_t),   F^s(g_k) = P^s(G < g_k) + 1/2 P^s(G = g_k) at each decoded return g_k of p^s,

F^s linear between consecutive g_k, 0 below the lowest and 1 above the highest; a trajectory's score is
the mean of S_t over its steps. A score near 1 says the method picked actions as good as the best the data
shows in those states; near 0, the worst.

Why the mid-distribution function rather than P(G <= R): p^s is a distribution over a few decoded
returns, so the plain distribution function jumps by a whole bin's mass at each of them. The mid value
is centred: for R drawn from p^s itself, E[P(G < R) + 1/2 P(G = R)] is exactly 1/2 (by symmetry), whereas
E[P(G <= R)] = 1/2 + 1/2 sum_k p_k^2 leans upwards by the mass of the distribution's atoms.

Why linear between the g_k: R is an expectation, so it is rarely a bin's value, and a learned p^a is never
a point mass, so R sits just inside the range of the returns it mixes. The step function P(G < R) would
then give the worst action of a sparse-reward state (R a hair above the common return 0) the whole mass
of that atom, as much as an action with a real chance of reward: in a state where p^s puts 0.9 on G = 0
and 0.1 on G = 0.9, every R in (0, 0.9) would score 0.9. Interpolating keeps the mid-distribution value
at every g_k and moves continuously between them (0.45 at R = 0, 0.62 at R = 0.3 in that state).

The math (:func:`expected_returns`, :func:`mid_cdf`, :func:`step_scores`, :func:`trajectory_means`)
works on plain arrays; :func:`score_steps` applies it to a run's executed steps with the two models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trifle.errors import DataError
from trifle.evaluation.steps import ExecutedSteps
from trifle.models.aux_training import ReturnModel


def _check(probs: np.ndarray, values: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    probs, values = np.asarray(probs, np.float64), np.asarray(values, np.float64)
    if probs.ndim != 2 or values.ndim != 1 or probs.shape[1] != values.size:
        raise DataError(f"{name}: probabilities {probs.shape} do not match {values.size} bin values")
    if np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-6):
        raise DataError(f"{name}: every row must be a probability distribution (non-negative, sum 1)")
    return probs, values


def expected_returns(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[N]`` expectations of distributions ``probs [N, K]`` over the bin values ``values [K]``."""
    probs, values = _check(probs, values, "expected_returns")
    return probs @ values


def mid_cdf(probs: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The interpolated mid-distribution function of each row of ``probs [N, K]`` at ``x [N]``.

    At a bin value ``values[k]`` it is ``P(G < values[k]) + 1/2 P(G = values[k])``; linear between bin
    values, 0 below the lowest and 1 above the highest (the module docstring says why). ``values`` must
    increase strictly, as decoded quantile bins do.
    """
    probs, values = _check(probs, values, "mid_cdf")
    x = np.asarray(x, np.float64)
    if x.shape != (len(probs),):
        raise DataError(f"mid_cdf: {x.shape} points for {len(probs)} distributions")
    if np.any(np.diff(values) <= 0):
        raise DataError("mid_cdf: the bin values must increase strictly")
    knots = np.cumsum(probs, axis=1) - 0.5 * probs  # P(G < g_k) + 1/2 P(G = g_k)
    if values.size == 1:
        return np.where(x < values[0], 0.0, np.where(x > values[0], 1.0, knots[:, 0]))
    k = np.clip(np.searchsorted(values, x, side="right") - 1, 0, values.size - 2)
    weight = np.clip((x - values[k]) / (values[k + 1] - values[k]), 0.0, 1.0)
    rows = np.arange(len(x))
    inside = (1.0 - weight) * knots[rows, k] + weight * knots[rows, k + 1]
    return np.where(x < values[0], 0.0, np.where(x > values[-1], 1.0, inside))


def step_scores(
    state_probs: np.ndarray, state_values: np.ndarray, action_probs: np.ndarray, action_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(S, R)``: each step's score and its action's expected return (the module docstring).

    The two models may have their own bins: R is a number in the data's units either way.
    """
    expected = expected_returns(action_probs, action_values)
    return mid_cdf(state_probs, state_values, expected), expected


def trajectory_means(scores: np.ndarray, episode: np.ndarray, num_episodes: int) -> np.ndarray:
    """Mean of ``scores`` per episode ``0..num_episodes-1``; every episode must have a step."""
    episode = np.asarray(episode, np.int64)
    counts = np.bincount(episode, minlength=num_episodes)
    if len(counts) != num_episodes or np.any(counts == 0):
        raise DataError(f"trajectory_means: expected steps of each of episodes 0..{num_episodes - 1}")
    return np.bincount(episode, weights=np.asarray(scores, np.float64), minlength=num_episodes) / counts


@dataclass(frozen=True)
class StepScores:
    """A run's per-step scores and expected returns, and the per-trajectory means."""

    scores: np.ndarray  # [n] S_t
    expected: np.ndarray  # [n] R_t
    trajectory: np.ndarray  # [E] mean S_t per episode


def score_steps(steps: ExecutedSteps, state_model: ReturnModel, action_model: ReturnModel) -> StepScores:
    """Score every executed step with the state model p^s and the action model p^a of one task.

    The two must be of their kinds and trained on the same data and discount (else DataError naming
    their files), since the score compares one model's expectation with the other's distribution.
    """
    if state_model.kind != "state" or action_model.kind != "action":
        raise DataError(
            f"{state_model.path}, {action_model.path}: expected a state and an action model, got "
            f"{state_model.kind!r} and {action_model.kind!r}"
        )
    if state_model.data_sha256 != action_model.data_sha256 or state_model.discount != action_model.discount:
        raise DataError(
            f"{state_model.path}, {action_model.path}: the return models were trained on different data or "
            "discounts"
        )
    p_state = state_model.distribution(steps.obs)
    p_action = action_model.distribution(steps.obs, steps.action)
    scores, expected = step_scores(p_state, state_model.returns.values, p_action, action_model.returns.values)
    return StepScores(scores, expected, trajectory_means(scores, steps.episode, steps.num_episodes))
