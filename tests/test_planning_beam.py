"""Planners: sampling filters, token history, beam search by hand, cache equivalence, config checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trifle.data.discretize import ColumnBins, Discretizer
from trifle.data.tokens import TokenData
from trifle.errors import CheckpointError, ConfigError
from trifle.models.circuits import TorchCircuit, build_hclt, em_step, save_circuit
from trifle.models.gpt import GPTConfig, KVCache, TrajectoryGPT
from trifle.models.gpt_training import CHECKPOINT_FORMAT
from trifle.planning.beam import BeamSettings, TokenSpec, beam_search
from trifle.planning.context import TokenHistory
from trifle.planning.planners import build_planner, check_context, make_planner, validate_config
from trifle.planning.sampling import bin_values, column_masks, filter_cdf, top_k

CONF = Path(__file__).resolve().parents[1] / "trifle" / "conf"
INF = math.inf


def _cat(values) -> ColumnBins:
    return ColumnBins("categorical", np.zeros(0), np.asarray(values, np.float64))


# ----------------------------------------------------------------------------- sampling helpers
def test_column_masks_exclude_unused_bins_and_never_allow_stop_for_actions():
    masks = column_masks([3, 3, 2, 3, 4], vocab_size=4, obs_dim=1, act_dim=2)
    assert masks.tolist() == [
        [True, True, True, False, True],  # obs: its 3 bins + stop
        [True, True, True, False, False],  # action 0: 3 bins, no stop
        [True, True, False, False, False],  # action 1: 2 bins, no stop
        [True, True, True, False, True],  # reward
        [True, True, True, True, True],  # value
    ]


def test_filter_cdf_by_hand():
    logits = torch.tensor([[0.125, 0.125, 0.25, 0.5], [0.5, 0.5, 1e-30, 1e-30]]).log()
    kept = torch.isfinite(filter_cdf(logits, 0.3))
    assert kept.tolist() == [[False, False, True, True], [True, True, False, False]]
    # Cumulative 0.125, 0.25, 0.5 < 0.6: only the mode survives; a flat row keeps its maxima.
    assert torch.isfinite(filter_cdf(logits, 0.6))[0].tolist() == [False, False, False, True]
    flat = torch.tensor([[0.0, 0.0, -INF]])
    assert torch.isfinite(filter_cdf(flat, 0.6)).tolist() == [[True, True, False]]


def test_top_k_keeps_ties_and_masked_tokens_stay_out():
    out = top_k(torch.tensor([[1.0, 3.0, 2.0, -INF], [1.0, 1.0, 0.0, -INF]]), 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True, True, False, False]]


# ----------------------------------------------------------------------------- token history
def _toy_discretizer() -> Discretizer:
    columns = [
        _cat([0, 1, 2]),
        _cat([0, 1, 2]),
        _cat([0, 1]),
        _cat([-1, 0, 5]),
        ColumnBins("quantile", np.array([-2.0, 0.0, 2.0]), np.array([-3.0, -1.0, 1.0, 3.0])),
    ]
    return Discretizer(columns, ["obs", "act0", "act1", "reward", "value"])


def test_history_keeps_the_last_transitions_with_the_value_placeholder():
    h = TokenHistory(_toy_discretizer(), obs_dim=1, act_dim=2, max_context_transitions=2)
    h.reset(3)
    for step, (obs, act, rew) in enumerate([(2, (1, 0), -1.0), (0, (2, 1), 7.0), (1, (0, 1), 0.0)]):
        ids = np.array([0]) if step else np.array([0, 2])
        h.observe(ids, np.full((len(ids), 1), obs))
        h.record(ids, np.tile(act, (len(ids), 1)), np.full(len(ids), rew))
    h.observe(np.array([0, 1, 2]), np.array([[1], [2], [0]]))
    groups = {len(p[0]): p for p in (g[1] for g in h.prefix_groups(np.array([2, 0, 1])))}
    # env 0: the last two of its three transitions (reward 7 -> nearest category 5 -> token 2; value = top bin 3)
    assert groups[11].tolist() == [[0, 2, 1, 2, 3, 1, 0, 1, 1, 3, 1]]
    assert groups[6].tolist() == [[2, 1, 0, 0, 3, 0]]  # env 2: one transition
    assert groups[1].tolist() == [[2]]  # env 1: nothing recorded yet
    positions = sorted(int(where[0]) for where, _, _ in h.prefix_groups(np.array([2, 0, 1])))
    assert positions == [0, 1, 2]


# ----------------------------------------------------------------------------- beam search by hand
REWARD_VALUES, VALUE_VALUES, STOP = [0.0, 1.0, 10.0], [0.0, 5.0, 20.0], 3


class StubGPT(torch.nn.Module):
    """A transparent 'GPT' over (s, a, r, V) with 3 bins per column: uniform actions, next state = action,
    and reward / value token distributions read off tables. Its 'cache' stores the tokens seen, so the
    cached and uncached paths see exactly the same information."""

    def __init__(self, reward_probs: torch.Tensor, value_probs: torch.Tensor):
        super().__init__()
        self.cfg = GPTConfig(obs_dim=1, act_dim=1, vocab_size=3, block_size=64, n_layer=1, n_head=1, n_embd=4)
        self.reward_logp, self.value_logp = reward_probs.log(), value_probs.log()

    def _next(self, seq: torch.Tensor) -> torch.Tensor:
        column = seq.size(1) % 4  # column of the token to predict
        if column == 1:
            return torch.tensor([0.0, 0.0, 0.0, -INF]).expand(seq.size(0), 4)
        if column == 2:
            return self.reward_logp[seq[:, -2], seq[:, -1]]
        if column == 3:
            return self.value_logp[seq[:, -3], seq[:, -2]]
        return torch.nn.functional.one_hot(seq[:, -3], 4).float().log()

    def forward(self, idx, cache=None, start=None):
        past = cache.keys[0][:, 0, :, 0].long() if cache is not None and cache.keys else idx[:, :0]
        full = torch.cat([past, idx], dim=1)
        logits = torch.stack([self._next(full[:, : p + 1]) for p in range(past.size(1), full.size(1))], dim=1)
        store = full[:, None, :, None].float()
        return logits, (KVCache([store], [store]) if cache is not None else None)

    def log_prob_next(self, idx, cache=None, start=None):
        logits, cache = self(idx, cache)
        return torch.log_softmax(logits[:, -1], dim=-1), cache


def _stub(v01: int) -> StubGPT:
    """Rewards: (0,0)->1, (0,1)->0, (0,2)->10 w.p. 0.6 else stop (E = 6), (1,.)->10, (2,.)->1.
    Values: 0 everywhere except V(0,1), a token given by ``v01``."""
    reward = torch.zeros(3, 3, 4)
    reward[0, 0, 1] = reward[0, 1, 0] = 1.0
    reward[0, 2, 2], reward[0, 2, STOP] = 0.6, 0.4
    reward[1, :, 2] = reward[2, :, 1] = 1.0
    value = torch.zeros(3, 3, 4)
    value[:, :, 0] = 1.0
    value[0, 1] = torch.nn.functional.one_hot(torch.tensor(v01), 4).float()
    return StubGPT(reward, value).eval()


STUB_SPEC = TokenSpec(
    obs_dim=1,
    act_dim=1,
    masks=column_masks([3, 3, 3, 3], 3, 1, 1),
    reward_values=bin_values(np.array(REWARD_VALUES), 4),
    value_values=bin_values(np.array(VALUE_VALUES), 4),
)


@pytest.mark.parametrize(
    ("v01", "beam_width", "expansion", "horizon", "expected"),
    [
        # Plan values (γ = 0.9): (1,·) = 0 + 0.9·10 = 9, (2,·) = 6 + 0.9·1 = 6.9, (0,2) = 1 + 0.9·6 = 6.4,
        # and with V(0,1) = 20: (0,1) = 1 + 0.9·0 + 0.81·20 = 17.2.
        # 36 beams, no expansion: nothing is pruned, the best of all sampled plans wins. Stop counts 0:
        # were E[r(0,2)] renormalised to 10, (2,·) = 10.9 would win.
        (0, 36, 1, 2, 1),
        (2, 36, 1, 2, 0),  # the last step's γ^2·V counts
        # 2 beams of 12 copies: step-0 values r + γV = 1, 0, 6 fill both beams with copies of action 2.
        (0, 2, 12, 2, 2),
        (2, 2, 12, 1, 1),  # one step, V(0,1) = 20: 0.9·20 = 18 > 6
        (1, 2, 12, 1, 2),  # one step, V(0,1) = 5: 0.9·5 = 4.5 < 6
    ],
)
def test_beam_search_values_and_selection_by_hand(v01, beam_width, expansion, horizon, expected):
    for use_cache in (True, False):
        cfg = BeamSettings(beam_width, horizon, expansion, 1, None, None, discount=0.9, use_cache=use_cache)
        prefix = torch.zeros(5, 1, dtype=torch.long)  # 5 environments in state 0
        got = beam_search(_stub(v01), prefix, STUB_SPEC, cfg, torch.Generator().manual_seed(0))
        assert got[:, 0].tolist() == [expected] * 5


class ForceFirstAction:
    """A proposal hook that only allows action ``token`` and records how it was called."""

    def __init__(self, token: int):
        self.token, self.calls = token, []

    def begin(self, env_of_row):
        self.calls.append(("begin", env_of_row.tolist()))

    def logits(self, dim, logp):
        self.calls.append(("logits", dim, tuple(logp.shape)))
        out = torch.full_like(logp, -INF)
        out[:, self.token] = 0.0
        return out

    def chosen(self, dim, tokens):
        assert set(tokens.tolist()) == {self.token}
        self.calls.append(("chosen", dim))


def test_proposal_hook_shapes_only_the_first_step():
    cfg = BeamSettings(3, 2, 4, k_obs=1, k_act=None, cdf_act=None, discount=0.9)
    hook = ForceFirstAction(0)
    got = beam_search(
        _stub(0), torch.zeros(2, 1, dtype=torch.long), STUB_SPEC, cfg, torch.Generator(), proposal=hook
    )
    assert got[:, 0].tolist() == [0, 0]  # forced, although action 1 would be better
    assert hook.calls == [("begin", [0] * 12 + [1] * 12), ("logits", 0, (24, 3)), ("chosen", 0)]


# ----------------------------------------------------------------------------- real planners
OBS, ACT = 1, 2
D = OBS + ACT + 2
K = 3


def _tiny_gpt() -> TrajectoryGPT:
    torch.manual_seed(0)
    model = TrajectoryGPT(
        GPTConfig(obs_dim=OBS, act_dim=ACT, vocab_size=4, block_size=5 * D, n_layer=1, n_head=2, n_embd=16)
    )
    with torch.no_grad():  # heads of the columns before each action favour the stop / unused tokens
        model.head_bias[0, 3:] = 8.0
        model.head_bias[1, 2:] = 8.0
    return model.eval()


def _circuit() -> TorchCircuit:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (300, K * D), generator=g)
    x[:, 4] = torch.where(x[:, 1] == 0, 3, x[:, 4])  # the top value bin exactly when a0 == 0
    x[80:, D:] = torch.where(torch.rand(220, 1, generator=g) < 0.3, 4, x[80:, D:])  # some windows end
    c = TorchCircuit.from_nodes(build_hclt(x, num_cats=5, num_latents=3, seed=0))
    for _ in range(3):
        em_step(c, [x], pseudocount=0.1)
    return c


@pytest.fixture(scope="module")
def models():
    return _tiny_gpt(), _circuit()


def _cfg(method: str, **overrides) -> dict:
    cfg = dict(
        name=method,
        method=method,
        beam_width=3,
        horizon=3,
        expansion_factor=2,
        k_obs=1,
        k_act=None,
        cdf_act=None,
        act_support=None,
        max_context_transitions=2,
        use_cache=True,
        constrained=False,
    )
    if method != "tt":
        cfg["top_ratio"] = 0.2
        cfg["value_threshold"] = "strict"
        cfg["correction_target"] = "value"
    if method == "trifle-m":
        cfg["multistep_value"] = "survival"
    return {**cfg, **overrides}


def _rollout(planner, seed: int, steps: int = 4) -> np.ndarray:
    """Six environments; odd steps act in three of them only, so history lengths differ."""
    rng = np.random.default_rng(1)
    planner.reset(6, seed=seed)
    out = []
    for step in range(steps):
        ids = np.arange(6) if step % 2 == 0 else np.array([0, 2, 5])
        actions = planner.act(ids, rng.integers(0, 3, (len(ids), 1)).astype(float))
        out.append(actions)
        planner.record(ids, actions, rng.choice([-1.0, 0.0, 5.0], len(ids)))
    return np.concatenate(out)


def _planner(models, method: str, constraint=None, **overrides):
    gpt, circuit = models
    return make_planner(
        _cfg(method, **overrides),
        constraint=constraint,
        model=gpt,
        discretizer=_toy_discretizer(),
        obs_dim=OBS,
        act_dim=ACT,
        discount=0.9,
        circuit=circuit,
        circuit_window=K,
    )


@pytest.mark.parametrize("method", ["tt", "trifle-s", "trifle-m"])
def test_cached_and_uncached_planners_choose_the_same_actions(models, method):
    cached = _rollout(_planner(models, method), seed=3)
    uncached = _rollout(_planner(models, method, use_cache=False), seed=3)
    np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize("method", ["tt", "trifle-s", "trifle-m"])
def test_actions_are_valid_and_deterministic(models, method):
    planner = _planner(models, method, expansion_factor=3, cdf_act=0.5)
    first, again = _rollout(planner, seed=5), _rollout(planner, seed=5)
    np.testing.assert_array_equal(first, again)
    assert set(first[:, 0]) <= {0.0, 1.0, 2.0} and set(first[:, 1]) <= {0.0, 1.0}
    # With one beam and no expansion a plan is a single sample, so the seed shows.
    sampler = _planner(models, method, beam_width=1, expansion_factor=1)
    assert any(not np.array_equal(_rollout(sampler, seed=5), _rollout(sampler, seed=s)) for s in (6, 7, 8))


def test_trifle_correction_changes_the_first_action(models):
    """With one beam and no expansion the plan is the proposal's sample: the circuit favours a0 = 0."""
    counts = {}
    for method in ("tt", "trifle-s"):
        planner = _planner(models, method, beam_width=1, expansion_factor=1, horizon=1)
        planner.reset(200, seed=0)
        obs = np.zeros((200, 1))
        counts[method] = int((planner.act(np.arange(200), obs)[:, 0] == 0).sum())
    assert counts["trifle-s"] > counts["tt"] + 20, counts


@pytest.mark.parametrize("method", ["tt", "trifle-s", "trifle-m"])
def test_constrained_planners_never_execute_a_disallowed_action(models, method):
    """act0 decodes to 0, 1, 2; the constraint act0 <= 1 forbids bin 2, which the unconstrained
    planner does choose, at every planning step and in every environment."""
    constraint = [{"dim": 0, "high": 1.0}]
    free = _rollout(_planner(models, method, constraint, beam_width=1, expansion_factor=1), seed=2, steps=8)
    assert (free[:, 0] == 2).any()
    for use_cache in (True, False):
        planner = _planner(
            models,
            method,
            constraint,
            constrained=True,
            beam_width=1,
            expansion_factor=1,
            use_cache=use_cache,
        )
        safe = _rollout(planner, seed=2, steps=8)
        assert set(safe[:, 0]) <= {0.0, 1.0}


def test_the_constraint_lookahead_setting_reaches_the_proposal(models):
    """trifle-s-safe's proposal scores without the circuit's p(C | s, a^{<=i}) unless asked for it
    (tests/test_constraint_queries.py checks both scores against enumeration)."""
    constraint = [{"dim": 1, "high": 0.0}]
    obs = torch.zeros(2, OBS, dtype=torch.long)
    for lookahead in (False, True):
        planner = _planner(models, "trifle-s", constraint, constrained=True, constraint_lookahead=lookahead)
        proposal, _ = planner._hooks(obs)
        assert proposal.soft is not None and proposal.constraint_lookahead is lookahead
    assert _planner(models, "trifle-s", constraint, constrained=True).settings.constraint_lookahead is False


def test_a_constraint_no_bin_can_satisfy_fails_before_planning(models):
    with pytest.raises(ConfigError, match="no bin of action dimension 1"):
        _planner(models, "tt", [{"dim": 1, "low": 1.5}], constrained=True)


# ----------------------------------------------------------------------------- configuration checks
@pytest.fixture(scope="module")
def files(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("planner")
    gpt, circuit = models
    gpt_path, pc_path = root / "gpt.pt", root / "pc.jpc"
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": gpt.cfg.to_dict(), "state_dict": gpt.state_dict()}, gpt_path
    )
    save_circuit(circuit, pc_path)
    return gpt_path, pc_path


def _tokens(discretizer: Discretizer | None = None) -> TokenData:
    disc = discretizer or _toy_discretizer()
    return TokenData(np.zeros((4, D), np.int64), np.array([0]), np.array([True]), OBS, ACT, disc)


def _build(files, cfg: dict, *, circuit=True, window=K, tokens=None):
    gpt_path, pc_path = files
    return build_planner(
        cfg,
        gpt_path=str(gpt_path),
        circuit_path=str(pc_path) if circuit else None,
        tokens=tokens or _tokens(),
        circuit_window=window,
        discount=0.9,
    )


def test_a_fixed_threshold_planner_asks_for_its_levels_once(files):
    """The fixed threshold's kept levels depend on the circuit only: computed at the first step, reused by
    every later step and rollout, with the same actions as planning them afresh."""
    planner = _build(files, _cfg("trifle-s", fixed_threshold=0.5))
    first = _rollout(planner, seed=3)
    keep = planner.fixed_keep
    assert keep is not None and keep.shape[0] == 1
    np.testing.assert_array_equal(_rollout(planner, seed=3), first)
    assert planner.fixed_keep is keep
    np.testing.assert_array_equal(
        _rollout(_build(files, _cfg("trifle-s", fixed_threshold=0.5)), seed=3), first
    )


def test_build_planner_from_checkpoints_plans(files):
    planner = _build(files, _cfg("trifle-m"))
    planner.reset(2, seed=0)
    assert planner.act(np.array([0, 1]), np.array([[0.0], [2.0]])).shape == (2, ACT)


@pytest.mark.parametrize(
    ("cfg", "kwargs", "error", "names"),
    [
        ({**_cfg("tt"), "method": "ppo"}, {}, ConfigError, "planner.method"),
        (_cfg("tt", beam_size=4), {}, ConfigError, "planner.beam_size"),
        ({k: v for k, v in _cfg("tt").items() if k != "horizon"}, {}, ConfigError, "planner.horizon"),
        (_cfg("tt", top_ratio=0.2), {}, ConfigError, "planner.top_ratio"),
        (_cfg("trifle-s", top_ratio=0.0), {}, ConfigError, "planner.top_ratio"),
        (_cfg("trifle-s", top_ratio=1.5), {}, ConfigError, "planner.top_ratio"),
        (_cfg("trifle-s", fixed_threshold=1.0), {}, ConfigError, "planner.fixed_threshold"),
        (_cfg("trifle-s", fixed_threshold="high"), {}, ConfigError, "planner.fixed_threshold"),
        (_cfg("tt", fixed_threshold=0.9), {}, ConfigError, "planner.fixed_threshold"),
        (_cfg("tt", beam_width=0), {}, ConfigError, "planner.beam_width"),
        (_cfg("tt", expansion_factor=0), {}, ConfigError, "planner.expansion_factor"),
        (_cfg("tt", cdf_act=1.0), {}, ConfigError, "planner.cdf_act"),
        (_cfg("tt", use_cache="yes"), {}, ConfigError, "planner.use_cache"),
        # A plan may outgrow the block (TT crops it), but the prefix must fit: 5 * 5 + 1 + 1 > 25 tokens.
        (_cfg("tt", max_context_transitions=5), {}, ConfigError, "block_size"),
        (_cfg("tt", constrained=True), {}, ConfigError, "task.action_constraint"),
        (_cfg("trifle-s", constraint_lookahead=True), {}, ConfigError, "planner.constraint_lookahead"),
        (_cfg("trifle-s", constraint_lookahead="yes"), {}, ConfigError, "planner.constraint_lookahead"),
        (_cfg("tt", constraint_lookahead=False), {}, ConfigError, "planner.constraint_lookahead"),
        (_cfg("tt", name=""), {}, ConfigError, "planner.name"),
        (_cfg("trifle-m", horizon=3), {"window": 2}, ConfigError, "task.pc_window"),
        (_cfg("trifle-s"), {"circuit": False}, ConfigError, "circuit"),
        (_cfg("trifle-s"), {"window": 2}, CheckpointError, "num_vars"),
        (_cfg("tt"), {"tokens": "wide"}, CheckpointError, "vocab_size"),
    ],
)
def test_invalid_settings_fail_before_any_rollout(files, cfg, kwargs, error, names):
    if kwargs.get("tokens") == "wide":
        disc = _toy_discretizer()
        disc.columns[-1] = ColumnBins("quantile", np.arange(4.0), np.arange(5.0))  # 5 value bins
        kwargs = {"tokens": _tokens(disc)}
    with pytest.raises(error, match=names.replace(".", r"\.")):
        _build(files, cfg, **kwargs)


@pytest.mark.parametrize("method", ["tt", "trifle-s", "trifle-m", "tt-safe", "trifle-s-safe"])
def test_shipped_configs_are_valid_and_fit_the_small_gpt_on_taxi(method):
    from trifle.config import compose

    cfg = compose(["task=taxi-stochastic", f"planner={method}"])
    settings = validate_config(cfg["planner"])
    assert settings.name == method and settings.constrained == method.endswith("-safe")
    assert settings.method == method.removesuffix("-safe")
    assert settings.beam_width == 8 and settings.horizon == 3  # the task's planning settings
    taxi_dim = 4 + 1 + 2
    block = cfg["gpt"]["seq_transitions"] * taxi_dim
    check_context(settings, block_size=block, transition_dim=taxi_dim, obs_dim=4)
    assert settings.horizon <= cfg["task"]["pc_window"]


@pytest.mark.parametrize("task", ["hopper-medium-v2", "walker2d-medium-replay-v2"])
def test_mujoco_tasks_carry_the_released_codes_planning_settings(task):
    from trifle.config import compose

    settings = validate_config(compose([f"task={task}", "planner=trifle-s"])["planner"])
    assert (settings.beam_width, settings.expansion_factor, settings.max_context_transitions) == (32, 2, 5)
    if task.startswith("walker2d-medium-replay"):
        assert (settings.horizon, settings.k_act, settings.cdf_act) == (20, 40, None)
    else:
        assert (settings.horizon, settings.k_act, settings.cdf_act) == (5, None, 0.6)


def test_support_filter_keeps_actions_near_the_mode():
    """discrete BCQ's rule: p(a) >= ratio * max p; the mode always survives."""
    from trifle.planning.sampling import filter_support

    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.25, 0.25, 0.25, 0.25]])
    kept = torch.isfinite(filter_support(probs.log(), 0.3))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.isfinite(filter_support(probs.log(), 1.0)).sum(dim=1).tolist() == [1, 4]


def test_support_filter_applies_to_the_gpt_before_the_circuit_correction():
    """A proposal hook that favours a rare action cannot bring it back past the support filter."""
    from trifle.planning.beam import BeamSettings, TokenSpec, _sample_actions

    class Stream:
        logp = torch.log(torch.tensor([[0.9, 0.05, 0.05, 1e-12]])).repeat(64, 1)

        def feed(self, token):
            pass

    class FavourRare:
        def logits(self, dim, logp):
            return logp + torch.tensor([0.0, 20.0, 0.0])

        def chosen(self, dim, tokens):
            pass

    masks = torch.ones(4, 4, dtype=torch.bool)
    masks[1, 3] = False  # the action column: bins 0..2, never the stop token
    spec = TokenSpec(
        obs_dim=1,
        act_dim=1,
        masks=masks,
        reward_values=torch.zeros(4),
        value_values=torch.zeros(4),
        action_bins=(3,),
    )
    gen = torch.Generator().manual_seed(0)
    with_support = BeamSettings(1, 1, 1, None, None, None, 0.9, act_support=0.3)
    tokens = _sample_actions(Stream(), spec, with_support, gen, FavourRare())
    assert set(tokens[:, 0].tolist()) == {0}
    without = BeamSettings(1, 1, 1, None, None, None, 0.9)
    tokens = _sample_actions(Stream(), spec, without, gen, FavourRare())
    assert 1 in set(tokens[:, 0].tolist())
