"""Training windows: padding after terminal vs timeout ends, masks, target shift, episode split."""

import numpy as np
import pytest

from trifle.data.windows import TransitionWindows, split_episodes
from trifle.errors import ConfigError, DataError

STOP = 50


@pytest.fixture
def two_episodes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """D = 4 (1 obs, 1 act, reward, value). Episode 0: rows 0-2, terminal. Episode 1: rows 3-4, timeout.

    Row r holds tokens 10r .. 10r+3, so every token tells which row and column it came from.
    """
    tokens = np.array([[10 * r + c for c in range(4)] for r in range(5)], dtype=np.int64)
    return tokens, np.array([0, 3]), np.array([True, False])


def test_window_inside_episode_is_shifted_copy(two_episodes):
    tokens, starts, terminal = two_episodes
    windows = TransitionWindows(tokens, starts, terminal, length=2, stop_token=STOP)
    assert len(windows) == 5
    x, y, mask = windows.get([0])  # rows 0, 1; the target after row 1 is row 2's first token
    assert x.tolist() == [[0, 1, 2, 3, 10, 11, 12, 13]]
    assert y.tolist() == [[1, 2, 3, 10, 11, 12, 13, 20]]
    assert mask.tolist() == [[1.0] * 8]
    assert str(x.dtype) == str(y.dtype) == "torch.int64" and str(mask.dtype) == "torch.float32"


def test_terminal_end_pads_with_stop_tokens_that_count(two_episodes):
    tokens, starts, terminal = two_episodes
    windows = TransitionWindows(tokens, starts, terminal, length=3, stop_token=STOP)
    x, y, mask = windows.get([1])  # rows 1, 2, then past the terminal end
    assert x.tolist() == [[10, 11, 12, 13, 20, 21, 22, 23] + [STOP] * 4]
    assert y.tolist() == [[11, 12, 13, 20, 21, 22, 23] + [STOP] * 5]
    # Predicting the stop token right after the terminal transition is how the model learns termination.
    assert mask.tolist() == [[1.0] * 12]


def test_timeout_end_masks_everything_past_it(two_episodes):
    tokens, starts, terminal = two_episodes
    windows = TransitionWindows(tokens, starts, terminal, length=2, stop_token=STOP)
    x, y, mask = windows.get([4])  # row 4 is the last row of the timed-out episode
    assert x.tolist() == [[40, 41, 42, 43] + [STOP] * 4]
    assert y.tolist() == [[41, 42, 43] + [STOP] * 5]
    assert mask.tolist() == [[1.0, 1.0, 1.0] + [0.0] * 5]


def test_windows_never_cross_into_the_next_episode(two_episodes):
    tokens, starts, terminal = two_episodes
    windows = TransitionWindows(tokens, starts, terminal, length=2, stop_token=STOP)
    x, y, _ = windows.get([2])  # row 2 ends episode 0; row 3 (episode 1) must not appear
    assert 30 not in x.tolist()[0] and 30 not in y.tolist()[0]
    assert x.tolist()[0][4:] == [STOP] * 4


def test_episode_ids_select_windows_and_batches_stack(two_episodes):
    tokens, starts, terminal = two_episodes
    only_second = TransitionWindows(tokens, starts, terminal, length=1, stop_token=STOP, episode_ids=[1])
    assert len(only_second) == 2
    x, y, mask = only_second.get([0, 1])
    assert x.tolist() == [[30, 31, 32, 33], [40, 41, 42, 43]]
    assert y.tolist() == [[31, 32, 33, 40], [41, 42, 43, STOP]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    batches = list(only_second.iter_batches(np.arange(2), batch_size=1))
    assert [b[0].tolist() for b in batches] == [[x.tolist()[0]], [x.tolist()[1]]]


def test_bad_inputs_raise_data_errors(two_episodes):
    tokens, starts, terminal = two_episodes
    with pytest.raises(DataError, match="tokens"):
        TransitionWindows(tokens + STOP, starts, terminal, length=2, stop_token=STOP)
    with pytest.raises(DataError, match="episode_starts"):
        TransitionWindows(tokens, np.array([1, 3]), terminal, length=2, stop_token=STOP)
    with pytest.raises(DataError, match="episode_starts"):
        TransitionWindows(tokens, np.array([0, 3, 3]), np.ones(3, bool), length=2, stop_token=STOP)
    with pytest.raises(DataError, match="episode_terminal"):
        TransitionWindows(tokens, starts, np.array([True]), length=2, stop_token=STOP)
    with pytest.raises(ConfigError, match="seq_transitions"):
        TransitionWindows(tokens, starts, terminal, length=0, stop_token=STOP)


def test_split_is_by_whole_episode_deterministic_and_nonempty():
    starts = np.arange(0, 200, 10)
    train, valid = split_episodes(starts, 200, 0.25, seed=3)
    assert len(valid) == 5 and len(train) == 15
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(20))
    again = split_episodes(starts, 200, 0.25, seed=3)
    assert train.tolist() == again[0].tolist() and valid.tolist() == again[1].tolist()
    assert valid.tolist() != split_episodes(starts, 200, 0.25, seed=4)[1].tolist()
    # Tiny fractions and tiny datasets still leave one episode on each side.
    assert [len(a) for a in split_episodes(np.array([0, 5]), 9, 0.01, seed=0)] == [1, 1]
    assert [len(a) for a in split_episodes(np.array([0, 5, 7]), 9, 0.99, seed=0)] == [1, 2]


def test_split_rejects_single_episode_and_bad_fraction():
    with pytest.raises(ConfigError, match="at least 2 episodes"):
        split_episodes(np.array([0]), 10, 0.1, seed=0)
    with pytest.raises(ConfigError, match="valid_fraction"):
        split_episodes(np.array([0, 5]), 10, 1.0, seed=0)
    with pytest.raises(DataError, match="episode_starts"):
        split_episodes(np.array([0, 12]), 10, 0.5, seed=0)
