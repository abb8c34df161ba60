"""TT(+Q) (`tt-q`, `trifle-s-q`): the critic's plan value by hand, the planner following the critic, the
registry entries, and the checks that run before any rollout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_planning_beam import ACT, OBS, STUB_SPEC, K, _cfg, _rollout, _stub, _tokens, _toy_discretizer

from trifle.config import compose
from trifle.errors import CheckpointError, ConfigError
from trifle.models.iql import CriticConfig, IQLCritic
from trifle.models.iql_training import CHECKPOINT_FORMAT
from trifle.planning.beam import BeamSettings, beam_search
from trifle.planning.methods import method, methods_in
from trifle.planning.planners import CriticValue, beam_policies, build_planner, make_planner, validate_config

GAMMA = 0.9


class StubCritic:
    """Q(s, a) = 10 s + a (decoded environment values) for one-dimensional s and a, or a table."""

    def __init__(self, table: dict[int, float] | None = None):
        self.table, self.calls = table, []

    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        self.calls.append((obs.clone(), actions.clone()))
        if self.table is not None:
            return torch.tensor([self.table[int(a)] for a in actions[:, 0]], dtype=torch.float64)
        return 10.0 * obs[:, 0].double() + actions[:, 0].double()


def _stub_value(critic) -> CriticValue:
    """A CriticValue on the stub GPT's layout (1 obs, 1 action, 3 bins each decoding to 0, 1, 2)."""
    from test_planning_beam import _cat

    from trifle.data.discretize import Discretizer

    columns = [_cat([0, 1, 2]), _cat([0, 1, 2]), _cat([0, 1, 10]), _cat([0, 5, 20])]
    disc = Discretizer(columns, ["obs", "act", "reward", "value"])
    return CriticValue(critic, disc, obs_dim=1, act_dim=1, vocab_size=3, discount=GAMMA)


def test_critic_value_replaces_the_last_transitions_gpt_return_by_q():
    value = _stub_value(StubCritic())
    rewards = torch.tensor([[1.0, 6.0, 7.0, 100.0], [0.5, 2.0, 0.0, 0.0]], dtype=torch.float64)
    actions = torch.tensor([[[2], [1], [0]], [[0], [2], [1]]])
    # Step 2: Σ_{h<2} γ^h r_h + γ^2 Q(s_2, a_2); row 0: s_2 = token 1 -> Q = 10 + 0 = 10;
    # row 1: s_2 = stop (token 3): the episode ended before step 2, Q counts 0. r_2 and V_2 are not used.
    got = value(2, torch.zeros(2, dtype=torch.long), actions, rewards, state=torch.tensor([[1], [3]]))
    assert got.tolist() == pytest.approx([1.0 + GAMMA * 6.0 + GAMMA**2 * 10.0, 0.5 + GAMMA * 2.0])
    # Step 0: Q(s_0, a_0) alone.
    got = value(0, torch.zeros(2, dtype=torch.long), actions[:, :1], rewards, state=torch.tensor([[2], [0]]))
    assert got.tolist() == pytest.approx([22.0, 0.0])


class Recording:
    """Wraps a value hook and records (step, plan actions, value) of every candidate."""

    uses_state = True

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, step, env_of_row, actions, rewards, state):
        out = self.inner(step, env_of_row, actions, rewards, state=state)
        self.seen.append((step, actions.clone(), state.clone(), out.clone()))
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_scores_plans_with_the_critic_exactly(use_cache):
    """The stub GPT: next state = the action, E[r(0, a)] = 1, 0, 6 (a = 0, 1, 2). With Q(s, a) = 10 s + a the
    two-step plan (a_0, a_1) is worth E[r(0, a_0)] + γ (10 a_0 + a_1): (2, 2) is best, 6 + 0.9 * 22."""
    hook = Recording(_stub_value(StubCritic()))
    cfg = BeamSettings(36, 2, 1, 1, None, None, discount=GAMMA, use_cache=use_cache)
    got = beam_search(
        _stub(0), torch.zeros(3, 1, dtype=torch.long), STUB_SPEC, cfg, torch.Generator(), value_fn=hook
    )
    assert got[:, 0].tolist() == [2, 2, 2]
    first_reward = {0: 1.0, 1: 0.0, 2: 6.0}
    for step, actions, state, values in hook.seen:
        a = actions[:, :, 0]
        if step == 0:
            assert (state[:, 0] == 0).all()
            expected = [10.0 * 0 + a0 for a0 in a[:, 0].tolist()]
        else:
            assert state[:, 0].tolist() == a[:, 0].tolist()  # s_1 is the GPT's next state = a_0
            expected = [first_reward[a0] + GAMMA * (10 * a0 + a1) for a0, a1 in a.tolist()]
        # exact up to E[r] = 0.6 * 10, which the GPT's float32 log-probabilities round (3e-7)
        np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-6)
    assert {s for s, *_ in hook.seen} == {0, 1}


@pytest.mark.parametrize("preferred", [0, 1])
def test_a_critic_that_prefers_an_action_makes_the_planner_choose_it(preferred):
    """One planning step: TT's value r + γV picks action 2 (E[r] = 6); the critic's Q overrides it."""
    cfg = BeamSettings(36, 1, 1, 1, None, None, discount=GAMMA)
    prefix = torch.zeros(4, 1, dtype=torch.long)
    tt = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0))
    assert tt[:, 0].tolist() == [2] * 4
    table = {a: (50.0 if a == preferred else 0.0) for a in range(3)}
    hook = _stub_value(StubCritic(table))
    got = beam_search(_stub(0), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0), value_fn=hook)
    assert got[:, 0].tolist() == [preferred] * 4


# ------------------------------------------------------------------------------------- real planners
def _planner(models, method_name: str, critic=None, **overrides):
    gpt, circuit = models
    return make_planner(
        _cfg(method_name, **overrides),
        model=gpt,
        discretizer=_toy_discretizer(),
        obs_dim=OBS,
        act_dim=ACT,
        discount=GAMMA,
        circuit=circuit,
        circuit_window=K,
        critic=critic,
    )


def _build(paths, cfg: dict, critic_path: str | None):
    gpt_path, pc_path = paths
    return build_planner(
        cfg,
        gpt_path=str(gpt_path),
        circuit_path=str(pc_path),
        tokens=_tokens(),
        circuit_window=K,
        discount=GAMMA,
        critic_path=critic_path,
    )


def _critic(obs_dim=OBS, act_dim=ACT, seed=0) -> IQLCritic:
    torch.manual_seed(seed)
    return IQLCritic(CriticConfig(obs_dim=obs_dim, act_dim=act_dim, hidden_dim=8, n_hidden=1)).eval()


@pytest.mark.parametrize("method_name", ["tt", "trifle-s"])
def test_critic_planners_plan_deterministically_and_differ_from_gpt_valued_ones(models, method_name):
    critic = _critic()
    q = _planner(models, method_name, terminal_value="critic", critic=critic)
    first, again = _rollout(q, seed=5), _rollout(q, seed=5)
    np.testing.assert_array_equal(first, again)
    uncached = _rollout(
        _planner(models, method_name, terminal_value="critic", critic=critic, use_cache=False), 5
    )
    np.testing.assert_array_equal(first, uncached)
    # terminal_value: gpt (explicit) is TT's value: the same actions as without the key
    np.testing.assert_array_equal(
        _rollout(_planner(models, method_name, terminal_value="gpt"), seed=5),
        _rollout(_planner(models, method_name), seed=5),
    )


@pytest.fixture(scope="module")
def models():
    from test_planning_beam import _circuit, _tiny_gpt

    return _tiny_gpt(), _circuit()


def _save_critic(path, critic: IQLCritic, discount: float = GAMMA) -> str:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": critic.cfg.to_dict(),
            "discount": discount,
            "state_dict": critic.state_dict(),
        },
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, models):
    from test_planning_beam import CHECKPOINT_FORMAT as GPT_FORMAT

    from trifle.models.circuits import save_circuit

    root = tmp_path_factory.mktemp("ttq")
    gpt, circuit = models
    gpt_path, pc_path = root / "gpt.pt", root / "pc.jpc"
    torch.save({"format": GPT_FORMAT, "config": gpt.cfg.to_dict(), "state_dict": gpt.state_dict()}, gpt_path)
    save_circuit(circuit, pc_path)
    critics = {
        "good": _save_critic(root / "critic.pt", _critic()),
        "wide": _save_critic(root / "wide.pt", _critic(obs_dim=3)),
        "discount": _save_critic(root / "discount.pt", _critic(), discount=0.5),
    }
    return gpt_path, pc_path, critics


def test_build_planner_loads_the_critic_and_plans(files):
    gpt_path, pc_path, critics = files
    for name in ("tt", "trifle-s"):
        planner = _build(
            (gpt_path, pc_path), _cfg(name, terminal_value="critic"), critic_path=critics["good"]
        )
        planner.reset(2, seed=0)
        assert planner.act(np.array([0, 1]), np.array([[0.0], [2.0]])).shape == (2, ACT)
        assert planner.critic_value is not None


@pytest.mark.parametrize(
    ("cfg", "critic", "error", "names"),
    [
        (_cfg("tt", terminal_value="critic"), None, ConfigError, "paths.critic"),
        (_cfg("tt", terminal_value="q"), "good", ConfigError, "planner.terminal_value"),
        (_cfg("trifle-m", terminal_value="critic"), "good", ConfigError, "planner.terminal_value"),
        (_cfg("tt", terminal_value="critic"), "wide", CheckpointError, "obs_dim"),
        (_cfg("tt", terminal_value="critic"), "discount", CheckpointError, "discount"),
    ],
)
def test_invalid_critic_settings_fail_before_any_rollout(files, cfg, critic, error, names):
    gpt_path, pc_path, critics = files
    with pytest.raises(error, match=names.replace(".", r"\.")):
        _build((gpt_path, pc_path), cfg, critic_path=critics.get(critic))


def test_an_in_memory_critic_of_another_dataset_is_refused(models):
    with pytest.raises(CheckpointError, match="another dataset"):
        _planner(models, "tt", terminal_value="critic", critic=_critic(obs_dim=2))
    discrete = IQLCritic(CriticConfig(obs_dim=1, act_dim=1, obs_cardinalities=(2,), num_actions=3))
    with pytest.raises(CheckpointError, match="another dataset"):  # act_dim 1 against the tokens' 2
        _planner(models, "tt", terminal_value="critic", critic=discrete)
    with pytest.raises(ConfigError, match=r"paths\.critic"):
        _planner(models, "tt", terminal_value="critic")


def test_a_critic_method_without_paths_critic_fails_before_reading_any_file():
    cfg = compose(
        ["task=taxi-stochastic", "planner=tt-q", "paths.critic=null", "paths.tokens=/nonexistent.npz"]
    )
    with pytest.raises(ConfigError, match=r"paths\.critic"):
        beam_policies(cfg, "cpu")


# ------------------------------------------------------------------------------------------- registry
def test_registry_entries_and_composed_configs():
    tq, sq = method("tt-q"), method("trifle-s-q")
    assert tq.needs == ("tokens", "gpt", "critic") and tq.label == "TT(+Q)" and tq.order == 25
    assert not tq.reference and tq.algorithm == "tt" and tq.policy == method("tt").policy
    assert sq.needs == ("tokens", "gpt", "pc", "critic") and sq.label == "s-Trifle(+Q)" and sq.order == 35
    assert not sq.reference and sq.algorithm == "trifle-s" and sq.tables == method("trifle-s").tables
    order = methods_in("summary")
    assert order.index("tt") < order.index("tt-q") < order.index("trifle-s") < order.index("trifle-s-q")
    assert order.index("trifle-s-q") < order.index("trifle-m") and "tt-q" in methods_in("mujoco")
    for name, expected in (
        ("tt", "gpt"),
        ("trifle-s", "gpt"),
        ("trifle-m", "gpt"),
        ("tt-q", "critic"),
        ("trifle-s-q", "critic"),
    ):
        planner = compose(["task=taxi-stochastic", f"planner={name}"])["planner"]
        settings = validate_config(planner)
        assert settings.terminal_value == expected and settings.name == name
    trifle_s = compose(["task=taxi-stochastic", "planner=trifle-s"])["planner"]
    trifle_s_q = compose(["task=taxi-stochastic", "planner=trifle-s-q"])["planner"]
    differing = {k for k in trifle_s if trifle_s[k] != trifle_s_q[k]}
    assert differing == {"name", "terminal_value", "registry"}
