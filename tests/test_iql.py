"""IQL's critic (trifle.models.iql, iql_training): losses and targets by hand, the trained Q against the exact
fixed point of a chain MDP, transitions from labeled episodes, deterministic training and bit-identical
resume, checkpoint and config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trifle.config import compose
from trifle.data.labels import LabeledTrajectories, discounted_values
from trifle.errors import CheckpointError, ConfigError
from trifle.models.iql import CriticConfig, IQLCritic, expectile_loss, q_target
from trifle.models.iql_training import load_critic, resolve_config, train_critic, transition_rows

GAMMA = 0.9


# ------------------------------------------------------------------------------------------- by hand
def test_expectile_loss_by_hand():
    diff = torch.tensor([-2.0, 0.5, 0.0, 3.0])
    # |tau - 1(u < 0)| u^2 with tau = 0.7: 0.3 * 4, 0.7 * 0.25, 0, 0.7 * 9
    assert torch.allclose(expectile_loss(diff, 0.7), torch.tensor([1.2, 0.175, 0.0, 6.3]))
    # tau = 0.5 is half the squared error
    assert torch.allclose(expectile_loss(diff, 0.5), 0.5 * diff**2)


def test_q_target_by_hand():
    rewards, dones, next_v = (
        torch.tensor([1.0, -1.0, 2.0]),
        torch.tensor([0.0, 1.0, 0.0]),
        torch.tensor([10.0, 10.0, -4.0]),
    )
    assert q_target(rewards, dones, next_v, GAMMA).tolist() == pytest.approx([10.0, -1.0, -1.6])


def _constant(net: torch.nn.Sequential, value: float) -> None:
    """Make an MLP output ``value`` everywhere (zero weights, last bias = value)."""
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        net[-1].bias.fill_(value)


def test_losses_use_the_target_min_for_v_and_the_online_v_of_the_next_state_for_q():
    critic = IQLCritic(CriticConfig(obs_dim=1, act_dim=1, hidden_dim=4, n_hidden=1))
    critic.value_scale.fill_(2.0)
    _constant(critic.q.q1, 0.5)
    _constant(critic.q.q2, -0.25)
    _constant(critic.v, 0.2)
    _constant(critic.target_q.q1, 1.0)
    _constant(critic.target_q.q2, 0.1)
    obs, act = torch.zeros(2, 1), torch.zeros(2, 1)
    rewards, dones = torch.tensor([1.0, 4.0]), torch.tensor([0.0, 1.0])
    q_loss, v_loss = critic.losses((obs, act, rewards, obs, dones), discount=GAMMA, expectile=0.8)
    # scaled units: y = r / 2 + 0.9 (1 - d) 0.2 = [0.68, 2.0]
    y = np.array([0.5 + 0.9 * 0.2, 2.0])
    assert q_loss.item() == pytest.approx(np.mean((0.5 - y) ** 2 + (-0.25 - y) ** 2))
    # u = min(1.0, 0.1) - 0.2 = -0.1 < 0: weight 1 - 0.8
    assert v_loss.item() == pytest.approx(0.2 * 0.01)
    # environment units: min of the *target* pair times the scale
    assert critic.q_value(obs, act).tolist() == pytest.approx([0.2, 0.2])
    assert critic.state_value(obs).tolist() == pytest.approx([0.4, 0.4])


def test_polyak_update():
    critic = IQLCritic(CriticConfig(obs_dim=1, act_dim=1, hidden_dim=4, n_hidden=1))
    _constant(critic.q.q1, 1.0)
    _constant(critic.target_q.q1, 0.0)
    critic.update_target(0.25)
    assert float(critic.target_q.q1[-1].bias) == pytest.approx(0.25)
    critic.update_target(0.25)
    assert float(critic.target_q.q1[-1].bias) == pytest.approx(0.25 + 0.25 * 0.75)
    assert not any(p.requires_grad for p in critic.target_q.parameters())
    assert critic.num_params() == sum(p.numel() for p in [*critic.q.parameters(), *critic.v.parameters()])


def test_discrete_critic_one_hots_every_dimension_and_reads_the_taken_action():
    critic = IQLCritic(CriticConfig(obs_dim=2, act_dim=1, obs_cardinalities=(3, 2), num_actions=4))
    features = critic.features(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert features.tolist() == [[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]]
    with torch.no_grad():
        for net in (critic.target_q.q1, critic.target_q.q2):
            _constant(net, 0.0)
            net[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert critic.q_value(torch.zeros(2, 2), torch.tensor([[3.0], [1.0]])).tolist() == [3.0, 1.0]
    with pytest.raises(ConfigError, match="act_dim = 1"):
        CriticConfig(obs_dim=2, act_dim=2, obs_cardinalities=(3, 2), num_actions=4)


# ------------------------------------------------------------------------------------ the chain MDP
# States 0, 1, 2 on a line. "right" (1) from s moves to s + 1 with reward 0, from 2 it reaches the goal:
# reward 1, terminal. "quit" (0) earns 0.3 and ends the episode. Episodes as (s, a, r) rows and how they
# end: "terminal", or "timeout" (the last row has no next state in the data and must be left out).
CHAIN_EPISODES = [
    ([(0, 0, 0.3)], "terminal"),
    ([(0, 1, 0.0), (1, 0, 0.3)], "terminal"),
    ([(0, 1, 0.0), (1, 1, 0.0), (2, 0, 0.3)], "terminal"),
    ([(0, 1, 0.0), (1, 1, 0.0), (2, 1, 1.0)], "terminal"),
    # Cut by a timeout after (1, right): were that row kept as a terminal one, Q(1, right) would fall.
    ([(0, 1, 0.0), (1, 1, 0.0)], "timeout"),
]
COPIES = 8  # every episode type 8 times, so a held-out episode does not remove a type


def chain_labeled() -> tuple[LabeledTrajectories, list[int]]:
    """The chain data as labeled trajectories, and each episode's type."""
    obs, act, rew, starts, terminal, kinds = [], [], [], [], [], []
    for _ in range(COPIES):
        for kind, (rows, end) in enumerate(CHAIN_EPISODES):
            starts.append(len(rew))
            for s, a, r in rows:
                obs.append([s])
                act.append([a])
                rew.append(r)
            terminal.append(end == "terminal")
            kinds.append(kind)
    rewards = np.asarray(rew, np.float32)
    starts_arr = np.asarray(starts, np.int64)
    labeled = LabeledTrajectories(
        observations=np.asarray(obs, np.float32),
        actions=np.asarray(act, np.float32),
        rewards=rewards,
        values=discounted_values(rewards, starts_arr, GAMMA),
        episode_starts=starts_arr,
        episode_terminal=np.asarray(terminal, bool),
        attrs={"obs_cardinalities": [3], "num_actions": 2},
    )
    return labeled, kinds


def chain_transitions(kinds: list[int]) -> list[tuple[int, int, float, int | None]]:
    """The (s, a, r, s' or None for terminal) transitions of these episodes, written out by hand."""
    out = []
    for kind in kinds:
        rows, end = CHAIN_EPISODES[kind]
        for i, (s, a, r) in enumerate(rows):
            if i + 1 < len(rows):
                out.append((s, a, r, rows[i + 1][0]))
            elif end == "terminal":
                out.append((s, a, r, None))
    return out


def expectile_of(values: np.ndarray, weights: np.ndarray, tau: float) -> float:
    """The tau-expectile of a discrete distribution: the root of its first-order condition (bisection)."""
    lo, hi = float(values.min()), float(values.max())
    for _ in range(60):
        m = 0.5 * (lo + hi)
        above, below = np.maximum(values - m, 0), np.maximum(m - values, 0)
        lo, hi = (m, hi) if tau * weights @ above > (1 - tau) * weights @ below else (lo, m)
    return 0.5 * (lo + hi)


def exact_iql(transitions, tau: float, num_states: int = 3) -> dict[tuple[int, int], float]:
    """IQL's fixed point on the empirical MDP: Q(s, a) = mean over the data of r + gamma V(s'), V(s) = the
    tau-expectile of Q(s, .) under the data's action counts. Exact dynamic programming (to 1e-12)."""
    pairs = sorted({(s, a) for s, a, _, _ in transitions})
    pair_of = np.array([pairs.index((s, a)) for s, a, _, _ in transitions])
    rewards = np.array([r for _, _, r, _ in transitions])
    nxt = np.array([0 if n is None else n for *_, n in transitions])
    alive = np.array([n is not None for *_, n in transitions], float)
    counts = np.bincount(pair_of, minlength=len(pairs)).astype(float)
    v = np.zeros(num_states)
    for _ in range(1000):
        q = np.bincount(pair_of, rewards + GAMMA * alive * v[nxt], len(pairs)) / counts
        new = v.copy()
        for s in range(num_states):
            own = [i for i, p in enumerate(pairs) if p[0] == s]
            new[s] = expectile_of(q[own], counts[own], tau)
        done, v = np.abs(new - v).max() < 1e-12, new
        if done:
            break
    return {p: float(q[i]) for i, p in enumerate(pairs)}


def test_exact_fixed_point_spans_sarsa_to_the_in_support_max():
    labeled, kinds = chain_labeled()
    transitions = chain_transitions(kinds)
    sarsa, high = exact_iql(transitions, 0.5), exact_iql(transitions, 0.999)
    # The in-support max by hand: V(2) = 1, V(1) = 0.9, V(0) = 0.81.
    assert high[(2, 1)] == pytest.approx(1.0) and high[(1, 1)] == pytest.approx(0.9, abs=2e-3)
    assert high[(0, 1)] == pytest.approx(0.81, abs=3e-3)
    # SARSA by hand from the counts: state 2 right:quit = 8:8, state 1 16:8 (the timed-out episode's
    # (1, right) has no next state and does not count).
    v2 = (8 * 1.0 + 8 * 0.3) / 16
    v1 = (16 * GAMMA * v2 + 8 * 0.3) / 24
    assert sarsa[(1, 1)] == pytest.approx(GAMMA * v2) and sarsa[(0, 1)] == pytest.approx(GAMMA * v1)


@pytest.fixture(scope="module")
def chain_critic(tmp_path_factory):
    labeled, kinds = chain_labeled()
    out = tmp_path_factory.mktemp("chain") / "critic.pt"
    cfg = {
        "hidden_dim": 32,
        "expectile": 0.9,
        "batch_size": 64,
        "learning_rate": 3e-3,
        "steps": 1000,  # max error 0.002 against the exact values (0.0003 after 4000 steps)
        "target_update": 0.05,
        "valid_fraction": 0.1,
        "eval_every": 0,
        "checkpoint_every": 0,
    }
    metrics = train_critic(cfg, labeled=labeled, discount=GAMMA, seed=0, out_path=out, progress=False)
    critic, ckpt = load_critic(out)
    return critic, ckpt, metrics, labeled, kinds


def test_trained_q_reaches_the_exact_expectile_fixed_point_of_the_chain(chain_critic):
    critic, ckpt, metrics, _, kinds = chain_critic
    train_kinds = [kinds[e] for e in ckpt["data"]["train_episodes"]]
    exact = exact_iql(chain_transitions(train_kinds), 0.9)
    sarsa = exact_iql(chain_transitions(train_kinds), 0.5)
    pairs = sorted(exact)
    got = critic.q_value(
        torch.tensor([[float(s)] for s, _ in pairs]), torch.tensor([[float(a)] for _, a in pairs])
    ).tolist()
    for (s, a), value in zip(pairs, got, strict=True):
        assert value == pytest.approx(exact[(s, a)], abs=0.02), (s, a, value, exact[(s, a)])
    # The expectile matters here: SARSA's values are far from tau = 0.9's.
    assert max(abs(exact[p] - sarsa[p]) for p in pairs) > 0.1
    assert metrics["completed"] and metrics["discrete"] and metrics["num_train_transitions"] > 0


def test_a_timed_out_episode_loses_its_last_row_and_a_terminal_one_keeps_it():
    labeled, _ = chain_labeled()
    rows, nxt, done = transition_rows(labeled, np.array([3, 4]))  # goal episode, then the timed-out one
    assert rows.tolist() == [6, 7, 8, 9] and nxt.tolist() == [7, 8, 8, 10]
    assert done.tolist() == [False, False, True, False]


# --------------------------------------------------------------------- determinism, resume, checks
SMALL = {
    "hidden_dim": 16,
    "batch_size": 16,
    "steps": 12,
    "learning_rate": 1e-3,
    "valid_fraction": 0.1,
    "eval_every": 4,
    "checkpoint_every": 4,
}


def _continuous_labeled() -> LabeledTrajectories:
    rng = np.random.default_rng(0)
    n = 60
    rewards = rng.normal(size=n).astype(np.float32)
    starts = np.arange(0, n, 10)
    return LabeledTrajectories(
        observations=rng.normal(size=(n, 3)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        rewards=rewards,
        values=discounted_values(rewards, starts, GAMMA),
        episode_starts=starts,
        episode_terminal=np.array([True, False, True, False, True, False]),
    )


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_training_is_deterministic_and_resume_is_bit_identical(tmp_path):
    labeled = _continuous_labeled()
    kwargs = dict(labeled=labeled, discount=GAMMA, seed=3, progress=False)
    full = train_critic(SMALL, out_path=tmp_path / "a.pt", **kwargs)
    again = train_critic(SMALL, out_path=tmp_path / "b.pt", **kwargs)
    stopped = train_critic(SMALL, out_path=tmp_path / "c.pt", stop_after=5, **kwargs)
    assert not stopped["completed"] and (tmp_path / "c.pt.partial.pt").is_file()
    resumed = train_critic(SMALL, out_path=tmp_path / "c.pt", **kwargs)
    a, b, c = (_state(tmp_path / f"{n}.pt") for n in "abc")
    assert set(a) == set(c) and any(k.startswith("target_q.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    strip = ("seconds",)
    assert {k: v for k, v in full.items() if k not in strip} == {
        k: v for k, v in again.items() if k not in strip
    }
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    assert not (tmp_path / "c.pt.partial.pt").exists()
    other = train_critic(SMALL, out_path=tmp_path / "d.pt", **{**kwargs, "seed": 4})
    assert not torch.equal(_state(tmp_path / "d.pt")["v.0.weight"], a["v.0.weight"]) and other["completed"]


def test_a_partial_checkpoint_of_another_setting_is_refused(tmp_path):
    labeled = _continuous_labeled()
    kwargs = dict(labeled=labeled, seed=3, progress=False, out_path=tmp_path / "a.pt")
    train_critic(SMALL, discount=GAMMA, stop_after=4, **kwargs)
    with pytest.raises(CheckpointError, match="expectile"):
        train_critic({**SMALL, "expectile": 0.9}, discount=GAMMA, **kwargs)
    with pytest.raises(CheckpointError, match="discount"):
        train_critic(SMALL, discount=0.5, **kwargs)


def test_load_critic_checks_what_the_caller_relies_on(tmp_path):
    train_critic(
        SMALL,
        labeled=_continuous_labeled(),
        discount=GAMMA,
        seed=0,
        out_path=tmp_path / "c.pt",
        progress=False,
    )
    critic, ckpt = load_critic(tmp_path / "c.pt", expect={"obs_dim": 3, "act_dim": 2, "discount": GAMMA})
    assert critic.cfg.obs_dim == 3 and not critic.cfg.discrete and ckpt["discount"] == GAMMA
    assert critic.q_value(torch.zeros(4, 3), torch.zeros(4, 2)).shape == (4,)
    with pytest.raises(CheckpointError, match="obs_dim expected 11, found 3"):
        load_critic(tmp_path / "c.pt", expect={"obs_dim": 11})
    with pytest.raises(CheckpointError, match="discount"):
        load_critic(tmp_path / "c.pt", expect={"discount": 0.99})
    with pytest.raises(CheckpointError, match="not found"):
        load_critic(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"expectile": 1.0}, "critic.expectile"),
        ({"expectile": 0.0}, "critic.expectile"),
        ({"target_update": 0.0}, "critic.target_update"),
        ({"steps": 0}, "critic.steps"),
        ({"betas": [0.9]}, "critic.betas"),
        ({"policy_lr": 1e-3}, "critic.policy_lr"),
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(override)


def test_the_config_groups_compose_and_are_validated():
    cfg = compose(["task=taxi-stochastic"])
    assert resolve_config(cfg["critic"])["expectile"] == 0.7
    assert compose(["critic=paper"])["critic"]["steps"] == 1_000_000
    assert cfg["paths"]["critic"] == "results/checkpoints/taxi-stochastic/critic/seed0.pt"
    with pytest.raises(ConfigError, match=r"critic\.expectile"):
        compose(["critic.expectile=1.5"])
