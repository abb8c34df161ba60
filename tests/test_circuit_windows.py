"""Circuit training windows on a hand-built two-episode token matrix."""

import numpy as np
import pytest

from trifle.data.circuit_windows import circuit_windows
from trifle.errors import ConfigError

TOKENS = np.arange(10).reshape(5, 2)  # rows 0-2: terminal episode, rows 3-4: timed-out episode
STARTS, TERMINAL = np.array([0, 3]), np.array([True, False])


def test_single_step_windows_are_the_rows():
    out = circuit_windows(TOKENS, STARTS, TERMINAL, window=1, episode_ids=np.array([0, 1]), pad_token=99)
    assert np.array_equal(out, TOKENS)


def test_terminal_episodes_pad_and_timeouts_drop():
    out = circuit_windows(TOKENS, STARTS, TERMINAL, window=2, episode_ids=np.array([0, 1]), pad_token=99)
    expected = [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 99, 99], [6, 7, 8, 9]]
    assert out.tolist() == expected


def test_window_longer_than_every_episode_is_an_error():
    with pytest.raises(ConfigError, match="pc_window"):
        circuit_windows(TOKENS, STARTS, TERMINAL, window=5, episode_ids=np.array([1]), pad_token=99)
