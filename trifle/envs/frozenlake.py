"""Slippery FrozenLake (Trifle §6.2, following the DoC paper) as an explicit tabular MDP.

The 4x4 map, action order (left, down, right, up), slip model (intended direction and each
perpendicular direction with probability 1/3 each, listed in gymnasium's order), rewards and
termination match gymnasium's ``FrozenLake-v1`` with ``is_slippery=True``; the tests compare the
transition tables entry by entry. Observations are ``(row, col)`` instead of gymnasium's flat index.
"""

from __future__ import annotations

import numpy as np

from trifle.envs.tabular import TabularMDP

FROZENLAKE_MAP = ("SFFF", "FHFH", "FFFH", "HFFG")
ACTION_NAMES = ("left", "down", "right", "up")
MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))


def make_frozenlake(
    desc: tuple[str, ...] = FROZENLAKE_MAP, success_rate: float = 1.0 / 3.0, max_episode_steps: int = 100
) -> TabularMDP:
    """Build the MDP; states are ``row * ncol + col`` like gymnasium's, the start tile is 'S'."""
    nrow, ncol = len(desc), len(desc[0])
    num_states = nrow * ncol
    shape = (num_states, 4, 3)
    prob, reward = np.zeros(shape), np.zeros(shape)
    next_state = np.zeros(shape, dtype=np.int64)
    terminal, success = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    side = (1.0 - success_rate) / 2.0
    for s in range(num_states):
        row, col = divmod(s, ncol)
        for a in range(4):
            if desc[row][col] in "GH":  # absorbing; never stepped because the episode has ended
                prob[s, a] = (1.0, 0.0, 0.0)
                next_state[s, a] = s
                terminal[s, a] = True
                continue
            for k, direction in enumerate(((a - 1) % 4, a, (a + 1) % 4)):
                r = min(max(row + MOVES[direction][0], 0), nrow - 1)
                c = min(max(col + MOVES[direction][1], 0), ncol - 1)
                prob[s, a, k] = success_rate if direction == a else side
                next_state[s, a, k] = r * ncol + c
                terminal[s, a, k] = desc[r][c] in "GH"
                success[s, a, k] = reward[s, a, k] = desc[r][c] == "G"
    initial = np.array([float(ch == "S") for line in desc for ch in line])
    state_obs = np.array([divmod(s, ncol) for s in range(num_states)], dtype=np.int64)
    return TabularMDP(
        name="frozenlake",
        prob=prob,
        next_state=next_state,
        reward=reward,
        terminal=terminal,
        illegal=np.zeros(shape, dtype=bool),
        success=success,
        initial=initial / initial.sum(),
        state_obs=state_obs,
        obs_cardinalities=(nrow, ncol),
        max_episode_steps=max_episode_steps,
    )
