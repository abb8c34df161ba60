"""Q_taxi (trifle.models.tabular_q) and the Taxi ablation's three TT variants: the table against a hand
computation and against the sweeps of the on-data update it solves, its pessimistic fill, the Q filter
and the tabular terminal value inside the beam search, and the checks that run before any rollout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_planning_beam import STUB_SPEC, _stub
from test_tt_q import GAMMA, _stub_value

from trifle.config import compose
from trifle.data.labels import LabeledTrajectories
from trifle.errors import ConfigError, DataError
from trifle.models.tabular_q import TabularQ
from trifle.planning.beam import BeamSettings, beam_search
from trifle.planning.methods import method
from trifle.planning.planners import QFilter, validate_config

DISCRETE = {"obs_cardinalities": [3], "num_actions": 3}


def _labeled(episodes: list[list[tuple[int, int, float]]], terminal: list[bool]) -> LabeledTrajectories:
    """Episodes of (state, action, reward) rows; values are not read by the table."""
    rows = [row for ep in episodes for row in ep]
    starts = np.cumsum([0] + [len(ep) for ep in episodes[:-1]]).astype(np.int64)
    return LabeledTrajectories(
        observations=np.array([[s] for s, _, _ in rows], np.float32),
        actions=np.array([[a] for _, a, _ in rows], np.float32),
        rewards=np.array([r for _, _, r in rows], np.float32),
        values=np.zeros(len(rows), np.float32),
        episode_starts=starts,
        episode_terminal=np.array(terminal, bool),
        attrs=dict(DISCRETE),
    )


def test_table_by_hand():
    """s0 --a0, r=1--> s1; then a1 (r=2, end) in one episode and a0 (r=0, end) in the other:
    Q(s1, a1) = 2, Q(s1, a0) = 0, Q(s0, a0) = 1 + γ (2 + 0) / 2. Unvisited pairs get the lowest, 0."""
    data = _labeled([[(0, 0, 1.0), (1, 1, 2.0)], [(0, 0, 1.0), (1, 0, 0.0)]], [True, True])
    table = TabularQ.fit(data, 0.9)
    assert table.states[:, 0].tolist() == [0.0, 1.0]
    assert table.q[1, 1] == pytest.approx(2.0) and table.q[1, 0] == pytest.approx(0.0)
    assert table.q[0, 0] == pytest.approx(1.0 + 0.9 * 1.0)
    assert table.unseen == pytest.approx(0.0) and table.q[0, 2] == pytest.approx(0.0)
    assert table.visits.tolist() == [[2, 0, 0], [1, 1, 0]]


def _random_data(seed: int, episodes: int = 60) -> LabeledTrajectories:
    rng = np.random.default_rng(seed)
    eps, term = [], []
    for _ in range(episodes):
        s, ep = 0, []
        for _ in range(int(rng.integers(2, 8))):
            a = int(rng.integers(0, 3))
            ep.append((s, a, float(rng.normal(a - s, 1.0))))
            s = int((s + a + rng.integers(0, 2)) % 3)
        eps.append(ep)
        term.append(bool(rng.random() < 0.7))  # the others time out: their last row has no successor
    return _labeled(eps, term)


def _sweeps(data: LabeledTrajectories, discount: float, sweeps: int = 4000) -> np.ndarray:
    """The on-data update Q(s,a) += α [r + γ (1-d) Q(s',a') - Q(s,a)] as averaged synchronous sweeps
    (every visited pair moves to the mean of its targets), unvisited pairs held at the current lowest."""
    from trifle.models.iql_training import transition_rows

    rows, nxt, done = transition_rows(data, np.arange(len(data.episode_starts)))
    s, a = data.observations[:, 0].astype(int), data.actions[:, 0].astype(int)
    q = np.zeros((3, 3))
    visited = np.zeros((3, 3), bool)
    visited[s[rows], a[rows]] = True
    for _ in range(sweeps):
        q[~visited] = q[visited].min()
        target = data.rewards[rows] + discount * (~done) * q[s[nxt], a[nxt]]
        total, count = np.zeros((3, 3)), np.zeros((3, 3))
        np.add.at(total, (s[rows], a[rows]), target)
        np.add.at(count, (s[rows], a[rows]), 1.0)
        q = np.where(visited, total / np.maximum(count, 1), q)
    q[~visited] = q[visited].min()
    return q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_table_is_the_fixed_point_of_the_on_data_update(seed):
    data = _random_data(seed)
    table = TabularQ.fit(data, 0.8)
    np.testing.assert_allclose(table.q, _sweeps(data, 0.8), atol=1e-8)


def test_lookup_of_unseen_observations_and_actions():
    data = _labeled([[(0, 0, 1.0), (1, 1, 2.0)], [(0, 0, 1.0), (1, 0, -3.0)]], [True, True])
    table = TabularQ.fit(data, 0.9)
    obs = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    values = table.action_values(obs)
    assert values[0].tolist() == pytest.approx([-3.0, 2.0, -3.0])
    assert values[1].tolist() == pytest.approx([-3.0] * 3)  # state 2 never seen
    got = table.q_value(obs, torch.tensor([[1.0], [1.0], [0.0]]))
    assert got.tolist() == pytest.approx([2.0, -3.0, 1.0 + 0.9 * (-0.5)])


def test_a_continuous_dataset_is_refused_with_its_name():
    import dataclasses

    data = dataclasses.replace(_labeled([[(0, 0, 1.0)]], [True]), attrs={})
    with pytest.raises(DataError, match="labeled/x.npz: a tabular Q needs a discrete dataset"):
        TabularQ.fit(data, 0.9, source="labeled/x.npz")


# ------------------------------------------------------------------------------------------ in planning
def _table(q_row: list[float]) -> TabularQ:
    """The same action values in each of the stub GPT's three states."""
    q = np.tile(np.asarray(q_row, np.float64), (3, 1))
    return TabularQ(states=np.arange(3.0)[:, None], q=q, visits=np.ones((3, 3), np.int64), unseen=min(q_row))


def _filter(table: TabularQ, obs_tokens: torch.Tensor) -> QFilter:
    values = _stub_value(table)
    return QFilter(table, obs_tokens, values.obs_values, values.act_values)


def test_q_filter_adds_q_to_the_gpt_log_probs():
    f = _filter(_table([0.0, 1.5, -2.0]), torch.tensor([[0], [2]]))
    f.begin(torch.tensor([0, 0, 1]))
    logp = torch.log(torch.tensor([[0.2, 0.3, 0.5]] * 3, dtype=torch.float64))
    torch.testing.assert_close(f.logits(0, logp), logp + torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64))


@pytest.mark.parametrize("preferred", [0, 1])
def test_a_strong_q_filter_decides_the_first_action_and_a_flat_one_changes_nothing(preferred):
    """One planning step of the stub GPT (uniform actions; TT's value picks action 2). exp Q with a margin of
    50 leaves only the preferred action to sample; a flat Q is TT itself, draw for draw."""
    cfg = BeamSettings(36, 1, 1, 1, None, None, discount=GAMMA)
    prefix = torch.zeros(4, 1, dtype=torch.long)
    tt = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0))
    strong = _filter(_table([50.0 if a == preferred else 0.0 for a in range(3)]), prefix)
    got = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0), proposal=strong)
    assert got[:, 0].tolist() == [preferred] * 4
    flat = _filter(_table([3.0, 3.0, 3.0]), prefix)
    same = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0), proposal=flat)
    assert same.tolist() == tt.tolist()


def test_a_tabular_terminal_value_is_the_critic_value_with_the_table():
    """tt-qtaxi-value's plan value is tt-q's with Q_taxi as the critic: a preferred action wins."""
    cfg = BeamSettings(36, 1, 1, 1, None, None, discount=GAMMA)
    prefix = torch.zeros(4, 1, dtype=torch.long)
    hook = _stub_value(_table([0.0, 50.0, 0.0]))
    got = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0), value_fn=hook)
    assert got[:, 0].tolist() == [1] * 4


@pytest.mark.parametrize(
    ("name", "q_filter", "terminal"),
    [
        ("tt-qtaxi-filter", True, "gpt"),
        ("tt-qtaxi-value", False, "tabular_q"),
        ("tt-qtaxi-full", True, "tabular_q"),
    ],
)
def test_the_three_registry_methods(name, q_filter, terminal):
    entry = method(name)
    assert entry.needs == ("tokens", "labeled", "gpt") and "mujoco" not in entry.tables
    settings = validate_config(compose(["task=taxi-stochastic", f"planner={name}"])["planner"])
    assert (settings.method, settings.q_filter, settings.terminal_value) == ("tt", q_filter, terminal)
    assert settings.needs_tabular_q


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["planner=trifle-s", "+planner.q_filter=true"], "planner.q_filter=true"),
        (["planner=trifle-m", "+planner.terminal_value=tabular_q"], "planner.terminal_value=tabular_q"),
        (["planner=tt-qtaxi-filter", "planner.q_filter=maybe"], "planner.q_filter"),
    ],
)
def test_bad_q_taxi_settings_fail_at_composition(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        compose(["task=taxi-stochastic", *overrides])


def test_a_q_taxi_method_needs_the_labelled_data_and_one_action_column():
    from trifle.planning.planners import beam_policies

    cfg = compose(["task=taxi-stochastic", "planner=tt-qtaxi-value"])
    cfg["paths"] = {"tokens": "missing.npz", "gpt": "missing.pt"}
    with pytest.raises(ConfigError, match="paths.labeled"):
        beam_policies(cfg, "cpu")
