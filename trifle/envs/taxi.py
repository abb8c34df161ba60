"""The paper's stochastic Taxi (Trifle §6.2 / Appx E.2), built as an explicit tabular MDP.

Map, state encoding, action order, pickup/dropoff semantics and initial states follow gymnasium's
Taxi (Dietterich 2000), so ``make_taxi(slip_prob=0, wall_penalty=-1, boundary_penalty=-1)`` is
exactly gymnasium's deterministic Taxi except for the 300-step limit. The paper's changes:

* a navigation action goes the intended way with probability ``1 - slip_prob`` (0.7) and otherwise
  in one of the three other directions, chosen uniformly (0.1 each);
* a realized move that is blocked by an internal wall earns ``wall_penalty`` (-4) and by the grid
  boundary ``boundary_penalty`` (-5); the taxi stays put.

Penalties *replace* the -1 step cost rather than add to it. The paper lists "-1 per action; +20 for a
successful delivery; -4 for hitting walls; -5 for hitting boundaries; -10 for an unlawful
Pick-up/Drop-off" as one list, and in gymnasium's Taxi the +20 and -10 of that list are the whole
reward of the step (not added to -1), so we read -4 and -5 the same way.
"""

from __future__ import annotations

import numpy as np

from trifle.envs.tabular import TabularMDP

TAXI_MAP = (
    "+---------+",
    "|R: | : :G|",
    "| : | : : |",
    "| : : : : |",
    "| | : | : |",
    "|Y| : |B: |",
    "+---------+",
)
LOCATIONS = ((0, 0), (0, 4), (4, 0), (4, 3))  # R, G, Y, B
ACTION_NAMES = ("south", "north", "east", "west", "pickup", "dropoff")
MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1))  # row/col deltas of actions 0-3
IN_TAXI = 4
SIZE = 5
NUM_STATES = SIZE * SIZE * 5 * 4


def encode_state(row: int, col: int, passenger: int, destination: int) -> int:
    """gymnasium's Taxi state index."""
    return ((row * SIZE + col) * 5 + passenger) * 4 + destination


def _blocked(row: int, col: int, direction: int) -> str | None:
    """Why a move from (row, col) in ``direction`` fails: "boundary", "wall", or None if it succeeds."""
    dr, dc = MOVES[direction]
    r, c = row + dr, col + dc
    if not (0 <= r < SIZE and 0 <= c < SIZE):
        return "boundary"
    if dc != 0 and TAXI_MAP[1 + row][2 * min(col, c) + 2] == "|":
        return "wall"
    return None


def _navigation_outcomes(
    row: int, col: int, action: int, slip_prob: float
) -> list[tuple[float, int, int, str | None]]:
    """(probability, row, col, blocked-reason) for each realized direction of a navigation action."""
    out = []
    for direction in range(4):
        p = 1.0 - slip_prob if direction == action else slip_prob / 3.0
        reason = _blocked(row, col, direction)
        r, c = (row, col) if reason else (row + MOVES[direction][0], col + MOVES[direction][1])
        out.append((p, r, c, reason))
    return out


def make_taxi(
    slip_prob: float = 0.3,
    wall_penalty: float = -4.0,
    boundary_penalty: float = -5.0,
    max_episode_steps: int = 300,
) -> TabularMDP:
    """Build the stochastic Taxi MDP (500 states, 6 actions, 4 outcomes per state-action pair)."""
    shape = (NUM_STATES, 6, 4)
    prob, reward = np.zeros(shape), np.zeros(shape)
    next_state = np.zeros(shape, dtype=np.int64)
    terminal, illegal, success = (np.zeros(shape, dtype=bool) for _ in range(3))
    state_obs = np.zeros((NUM_STATES, 4), dtype=np.int64)
    penalty = {None: -1.0, "wall": wall_penalty, "boundary": boundary_penalty}
    for row in range(SIZE):
        for col in range(SIZE):
            for pas in range(5):
                for dest in range(4):
                    s = encode_state(row, col, pas, dest)
                    state_obs[s] = (row, col, pas, dest)
                    for a in range(4):
                        for k, (p, r, c, why) in enumerate(_navigation_outcomes(row, col, a, slip_prob)):
                            prob[s, a, k], reward[s, a, k] = p, penalty[why]
                            next_state[s, a, k] = encode_state(r, c, pas, dest)
                    for a in (4, 5):
                        new_pas, rew, done = (
                            _pickup(row, col, pas) if a == 4 else _dropoff(row, col, pas, dest)
                        )
                        prob[s, a, 0], reward[s, a, 0] = 1.0, rew
                        next_state[s, a, 0] = encode_state(row, col, new_pas, dest)
                        terminal[s, a, 0] = success[s, a, 0] = done
                        illegal[s, a, 0] = rew == -10.0
    initial = np.zeros(NUM_STATES)
    for s, (_, _, pas, dest) in enumerate(state_obs):
        initial[s] = float(pas < IN_TAXI and pas != dest)
    return TabularMDP(
        name="taxi-stochastic",
        prob=prob,
        next_state=next_state,
        reward=reward,
        terminal=terminal,
        illegal=illegal,
        success=success,
        initial=initial / initial.sum(),
        state_obs=state_obs,
        obs_cardinalities=(SIZE, SIZE, 5, 4),
        max_episode_steps=max_episode_steps,
    )


def _pickup(row: int, col: int, pas: int) -> tuple[int, float, bool]:
    """New passenger location, reward, terminated: legal only at the waiting passenger's location."""
    if pas < IN_TAXI and (row, col) == LOCATIONS[pas]:
        return IN_TAXI, -1.0, False
    return pas, -10.0, False


def _dropoff(row: int, col: int, pas: int, dest: int) -> tuple[int, float, bool]:
    """Delivery at the destination ends the episode; dropping at another landmark is legal (as in gymnasium)."""
    if pas == IN_TAXI and (row, col) == LOCATIONS[dest]:
        return dest, 20.0, True
    if pas == IN_TAXI and (row, col) in LOCATIONS:
        return LOCATIONS.index((row, col)), -1.0, False
    return pas, -10.0, False
