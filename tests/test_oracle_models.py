"""Exact "oracle" models (trifle.models.oracle) against direct counting, and the planners run on them.

* ``TabularGPT``: next-token distributions equal the counts of a small hand-made token dataset (with
  back-off for unseen contexts), the token cache agrees with full passes, and beam search runs on it.
* ``EmpiricalCircuit``: conditionals with missing variables and soft evidence equal brute-force
  enumeration of the data windows; the zero-evidence modes do what they say.
* m-Trifle's plan value with the oracle circuit equals the exact expected discounted return computed by
  brute force from the data's empirical transition model, on a small stochastic MDP whose dataset holds
  every trajectory in exact proportion.
* Stochastic Taxi: tt, trifle-s and trifle-m on oracle models of the project's own dataset all beat the
  data's mean return, and Trifle's proposal keeps the action that completes the task.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from trifle.config import compose
from trifle.data.circuit_windows import circuit_windows
from trifle.data.discretize import ColumnBins, Discretizer
from trifle.data.labels import label_trajectories
from trifle.data.tokens import TokenData, tokenize
from trifle.data.toy_datasets import toy_task_tokens
from trifle.envs import make_mdp
from trifle.evaluation.rollout import evaluate_policy
from trifle.models.gpt import KVCache
from trifle.models.oracle import EmpiricalCircuit, TabularGPT, TokenCache
from trifle.planning.beam import BeamSettings, TokenSpec, beam_search
from trifle.planning.circuit_queries import (
    CorrectionTarget,
    WindowLayout,
    candidate_scores,
    expected_multistep_value,
    kept_bins,
)
from trifle.planning.planners import make_planner
from trifle.planning.sampling import bin_values, column_masks

# ------------------------------------------------------------------------ a small hand-made dataset
OBS, ACT, VOCAB = 2, 1, 3
D = OBS + ACT + 2
STOP = VOCAB


def _cat(values) -> ColumnBins:
    return ColumnBins("categorical", np.zeros(0), np.asarray(values, np.float64))


def _small_data() -> TokenData:
    """40 short episodes (about 70 % terminal, the rest timed out) of correlated tokens."""
    rng = np.random.default_rng(0)
    rows, starts, terminal = [], [], []
    for _ in range(40):
        starts.append(len(rows))
        s = rng.integers(0, 3, 2)
        for _ in range(int(rng.integers(1, 6))):
            a = int(rng.integers(0, 2))
            r = (int(s[0]) + a) % 3 if rng.random() < 0.8 else int(rng.integers(0, 3))
            v = int(rng.integers(0, 3))
            rows.append([int(s[0]), int(s[1]), a, r, v])
            s = (
                np.array([(s[0] + a) % 3, rng.integers(0, 3)])
                if rng.random() < 0.7
                else rng.integers(0, 3, 2)
            )
        terminal.append(bool(rng.random() < 0.7))
    names = ["obs0", "obs1", "act0", "reward", "value"]
    columns = [_cat([0, 1, 2]), _cat([0, 1, 2]), _cat([0, 1]), _cat([-1, 0, 2]), _cat([-1, 0.5, 3])]
    return TokenData(
        tokens=np.asarray(rows, np.int64),
        episode_starts=np.asarray(starts, np.int64),
        episode_terminal=np.asarray(terminal),
        obs_dim=OBS,
        act_dim=ACT,
        discretizer=Discretizer(columns, names),
    )


@pytest.fixture(scope="module")
def small() -> TokenData:
    return _small_data()


def _stream_pairs(data: TokenData) -> list[tuple[tuple | None, tuple]]:
    """(previous transition or None, transition) over the GPT's training stream: each episode's rows,
    and after a terminal episode a stop transition followed by another."""
    stop = (STOP,) * D
    ends = np.append(data.episode_starts[1:], len(data.tokens))
    pairs = []
    for e, (s, t) in enumerate(zip(data.episode_starts, ends, strict=True)):
        prev = None
        for row in data.tokens[s:t]:
            pairs.append((prev, tuple(int(v) for v in row)))
            prev = pairs[-1][1]
        if data.episode_terminal[e]:
            pairs += [(prev, stop), (stop, stop)]
    return pairs


def _counted(pairs, column: int, cur: tuple, prev: tuple | None, use_prev: bool) -> np.ndarray:
    """Empirical p(token of ``column`` | current tokens ``cur`` [and the previous transition's first
    ``len(prev)`` tokens ``prev``]); ``cur`` may be shorter than ``column`` (a backed-off context)."""
    counts = np.zeros(VOCAB + 1)
    for p, c in pairs:
        if c[: len(cur)] == cur and (not use_prev or (p is not None and p[: len(prev)] == prev)):
            counts[c[column]] += 1
    return counts / counts.sum() if counts.sum() else counts


# ------------------------------------------------------------------------------------------- GPT
def _gpt_probs(gpt: TabularGPT, seq: list[int]) -> np.ndarray:
    logp, _ = gpt.log_prob_next(torch.tensor([seq]), KVCache())
    return logp[0].double().exp().numpy()


def test_gpt_next_token_distributions_equal_counts(small):
    gpt = TabularGPT.from_tokens(small, smoothing=0.0)
    pairs = _stream_pairs(small)
    checked = 0
    for prev, cur in pairs:
        for column in range(1, D):
            # Action, reward and value tokens: the current transition only (a previous one is ignored).
            if column >= OBS:
                want = _counted(pairs, column, cur[:column], None, use_prev=False)
                np.testing.assert_allclose(_gpt_probs(gpt, list(cur[:column])), want, atol=1e-6)
                if prev is not None:
                    seq = list(prev) + list(cur[:column])
                    np.testing.assert_allclose(_gpt_probs(gpt, seq), want, atol=1e-6)
            else:  # a later observation token without a previous transition: the current tokens only
                want = _counted(pairs, column, cur[:column], None, use_prev=False)
                np.testing.assert_allclose(_gpt_probs(gpt, list(cur[:column])), want, atol=1e-6)
            checked += 1
        if prev is not None:  # observation tokens given the previous transition
            for column in range(OBS):
                want = _counted(pairs, column, cur[:column], prev, use_prev=True)
                np.testing.assert_allclose(_gpt_probs(gpt, list(prev) + list(cur[:column])), want, atol=1e-6)
                checked += 1
    assert checked > 500


def test_gpt_terminal_transition_is_followed_by_stop_tokens(small):
    gpt = TabularGPT.from_tokens(small, smoothing=0.0)
    ends = np.append(small.episode_starts[1:], len(small.tokens))
    last = small.tokens[ends[small.episode_terminal] - 1]
    for row in last:
        probs = _gpt_probs(gpt, row.tolist())
        stop_after_terminal = _counted(_stream_pairs(small), 0, (), tuple(row), use_prev=True)
        np.testing.assert_allclose(probs, stop_after_terminal, atol=1e-6)
    # After a transition of stop tokens everything is stop, whatever the column.
    for column in range(D):
        probs = _gpt_probs(gpt, [STOP] * (D + column))
        assert probs[STOP] == pytest.approx(1.0)


def test_gpt_backs_off_to_the_longest_seen_context(small):
    gpt = TabularGPT.from_tokens(small, smoothing=0.0)
    pairs = _stream_pairs(small)
    seen = {p for p, _ in pairs if p is not None}
    # A previous transition (s, a, r, V) the data never contains, whose (s, a, r) it does.
    prev = next(
        (*p[:-1], v) for p in sorted(seen) for v in range(VOCAB) if (*p[:-1], v) not in seen and p[0] != STOP
    )
    want = _counted(pairs, 0, (), prev[:-1], use_prev=True)
    assert want.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(_gpt_probs(gpt, list(prev)), want, atol=1e-6)
    # An action after an observation the data never shows: the column's marginal over the shorter context.
    unseen_obs = next(
        o
        for o in itertools.product(range(VOCAB + 1), repeat=OBS)
        if not _counted(pairs, 2, o, None, False).sum()
    )
    want = _counted(pairs, 2, unseen_obs[:1], None, use_prev=False)
    if not want.sum():
        want = _counted(pairs, 2, (), None, use_prev=False)
    np.testing.assert_allclose(_gpt_probs(gpt, list(unseen_obs)), want, atol=1e-6)


def test_gpt_smoothing_keeps_every_token_possible_and_counts_nearly_exact(small):
    exact = TabularGPT.from_tokens(small, smoothing=0.0)
    smooth = TabularGPT.from_tokens(small)
    seqs = torch.tensor([[0, 1], [STOP, STOP], [2, 2]])  # [STOP, STOP]: an action after a predicted stop
    logp, _ = smooth.log_prob_next(seqs, None)
    assert bool(torch.isfinite(logp).all())
    np.testing.assert_allclose(
        logp[[0, 2]].double().exp().numpy(),
        exact.log_prob_next(seqs, None)[0][[0, 2]].double().exp().numpy(),
        atol=1e-5,
    )
    assert float(logp[1, :2].exp().sum()) > 0  # the action row is not all -inf


def test_gpt_token_cache_agrees_with_full_passes(small):
    gpt = TabularGPT.from_tokens(small)
    seq = torch.as_tensor(small.tokens[:4]).reshape(1, -1).repeat(3, 1)
    seq[1, 7] = STOP
    full, none = gpt(seq)
    assert none is None and full.shape == (3, seq.size(1), VOCAB + 1)
    logp, cache = gpt.log_prob_next(seq[:, :1], KVCache())
    for p in range(1, seq.size(1)):
        logp, cache = gpt.log_prob_next(seq[:, p : p + 1], cache)
        torch.testing.assert_close(logp, full[:, p])
        assert isinstance(cache, TokenCache) and cache.length == p + 1
        assert cache.tokens.size(1) < 2 * D  # only the previous and current transitions are kept
    # A whole prefix at once, and the cache's beam operations.
    logp_all, cache_all = gpt.log_prob_next(seq[:, :13], KVCache())
    torch.testing.assert_close(logp_all, full[:, 12])
    picked = cache_all.select(torch.tensor([2, 0])).repeat_interleave(2)
    logp2, _ = gpt.log_prob_next(seq[[2, 2, 0, 0], 13:14], picked)
    torch.testing.assert_close(logp2, full[[2, 2, 0, 0], 13])


def _two_action_data() -> TokenData:
    """One state; action 1 pays 2, action 0 pays -1, both end the episode (action 0 twice as common)."""
    rows = [[0, 0, 0, 0]] * 6 + [[0, 1, 1, 0]] * 3
    columns = [_cat([0]), _cat([0, 1]), _cat([-1, 2]), _cat([0])]
    return TokenData(
        tokens=np.asarray(rows, np.int64),
        episode_starts=np.arange(len(rows), dtype=np.int64),
        episode_terminal=np.ones(len(rows), bool),
        obs_dim=1,
        act_dim=1,
        discretizer=Discretizer(columns, ["obs", "act", "reward", "value"]),
    )


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_with_the_oracle_gpt_picks_the_better_action(use_cache):
    data = _two_action_data()
    gpt = TabularGPT.from_tokens(data)
    disc, vocab = data.discretizer, data.vocab_size
    spec = TokenSpec(
        obs_dim=1,
        act_dim=1,
        masks=column_masks(disc.num_bins, vocab, 1, 1),
        reward_values=bin_values(disc.columns[-2].values, vocab + 1),
        value_values=bin_values(disc.columns[-1].values, vocab + 1),
    )
    cfg = BeamSettings(4, 2, 2, k_obs=1, k_act=None, cdf_act=None, discount=0.9, use_cache=use_cache)
    first = beam_search(gpt, torch.zeros(5, 1, dtype=torch.long), spec, cfg, torch.Generator().manual_seed(0))
    assert first.tolist() == [[1]] * 5
    # The same through the planner API (the planner calls model.eval() / .to() and reads model.cfg).
    planner_cfg = {
        **compose(["task=frozenlake-eps0.5", "planner=tt"])["planner"],
        "use_cache": use_cache,
        "cdf_act": None,  # the better action is the rarer one here; no action filter
    }
    policy = make_planner(planner_cfg, model=gpt, discretizer=disc, obs_dim=1, act_dim=1, discount=0.9)
    policy.reset(3, seed=1)
    assert policy.act(np.arange(3), np.zeros((3, 1))).tolist() == [[1.0]] * 3


# --------------------------------------------------------------------------------------- circuit
def _weights(windows: torch.Tensor, x, missing, soft) -> torch.Tensor:
    """Brute force: weight of every window for one query row (hard evidence must match, soft multiplies)."""
    var = torch.arange(windows.size(1))
    w = torch.ones(len(windows), dtype=torch.float64)
    for v in var.tolist():
        if missing[v]:
            if soft is not None:
                w = w * soft[v, windows[:, v]].double()
        else:
            w = w * (windows[:, v] == x[v]).double()
    return w


def _brute_conditional(windows, x, missing, targets, soft, num_cats):
    out = []
    for b in range(len(x)):
        miss = missing[b].clone()
        miss[targets] = True
        w = _weights(windows, x[b], miss, None if soft is None else soft[b])
        rows = [torch.zeros(num_cats, dtype=torch.float64).index_add_(0, windows[:, t], w) for t in targets]
        out.append(
            torch.stack(rows) / w.sum() if w.sum() > 0 else torch.full((len(targets), num_cats), torch.nan)
        )
    return torch.stack(out)


def test_circuit_p_reward_given_state_and_action_equals_counts(small):
    circuit = EmpiricalCircuit.from_tokens(small, window=1)
    assert (circuit.num_vars, circuit.num_cats) == (D, VOCAB)
    keys = sorted({tuple(r[:3]) for r in small.tokens.tolist()})
    x = torch.zeros(len(keys), D, dtype=torch.long)
    x[:, :3] = torch.tensor(keys)
    missing = torch.ones(len(keys), D, dtype=torch.bool)
    missing[:, :3] = False
    got = circuit.conditional(x, missing, [3])[:, 0]
    for i, key in enumerate(keys):
        rewards = Counter(r[3] for r in small.tokens.tolist() if tuple(r[:3]) == key)
        want = torch.tensor([rewards[c] for c in range(VOCAB)], dtype=torch.float64) / sum(rewards.values())
        torch.testing.assert_close(got[i], want)


@pytest.mark.parametrize("soft_kind", ["none", "per_row", "shared"])
def test_circuit_conditionals_equal_enumeration_of_the_windows(small, soft_kind):
    k = 2
    windows = torch.from_numpy(
        circuit_windows(
            small.tokens,
            small.episode_starts,
            small.episode_terminal,
            window=k,
            episode_ids=np.arange(len(small.episode_starts)),
            pad_token=VOCAB,
        )
    )
    circuit = EmpiricalCircuit.from_tokens(small, window=k, zero_evidence="zeros")
    assert (circuit.num_vars, circuit.num_cats, circuit.pad) == (k * D, VOCAB + 1, VOCAB)
    g = torch.Generator().manual_seed(3)
    b, nv, nc = 300, k * D, VOCAB + 1
    # Evidence copied from real windows (so that most queries have support), partly hidden.
    x = windows[torch.randint(0, len(windows), (b,), generator=g)].clone()
    x[::7] = torch.randint(0, nc, (len(x[::7]), nv), generator=g)  # some rows with unseen evidence
    missing = torch.rand(b, nv, generator=g) < 0.5
    missing[: b // 2, :OBS] = False  # half the rows use the state index, the others scan every window
    soft = None
    if soft_kind == "per_row":
        soft = torch.rand(b, nv, nc, generator=g) * (torch.rand(b, nv, nc, generator=g) < 0.8)
    elif soft_kind == "shared":
        soft = torch.rand(nv, nc, generator=g)
    targets = [3, 4, 6, 8]
    got = circuit.conditional(x, missing, targets, soft)
    full_soft = soft if soft is None or soft.dim() == 3 else soft.expand(b, -1, -1)
    want = _brute_conditional(windows, x, missing, targets, full_soft, nc)
    supported = ~torch.isnan(want[:, 0, 0])
    assert int(supported.sum()) > 100 and int((~supported).sum()) > 10
    torch.testing.assert_close(got[supported], want[supported])
    assert bool((got[~supported] == 0).all())  # zero_evidence="zeros": an all-zero row, never NaN


def test_circuit_zero_evidence_fallbacks(small):
    k = 2
    uniform = EmpiricalCircuit.from_tokens(small, window=k, zero_evidence="uniform")
    backoff = EmpiricalCircuit.from_tokens(small, window=k)
    smoothed = EmpiricalCircuit.from_tokens(small, window=k, pseudocount=0.5, zero_evidence="zeros")
    layout = WindowLayout(OBS, ACT, k, VOCAB + 1)
    # s_0 and a_0 from a window whose episode continues, with a planned a_1 the data never takes there.
    windows = backoff.windows

    def untaken(w):  # the actions never taken at step 1 after (s_0, a_0) of window w, episode going on
        same = (windows[:, :OBS] == w[:OBS]).all(1) & (windows[:, OBS] == w[OBS]) & (windows[:, D] != STOP)
        return [a for a in range(2) if not (windows[same, D + OBS] == a).any()]

    row = next(w for w in windows if int(w[D]) != STOP and untaken(w))
    s0, a0, never = row[:OBS], int(row[OBS]), untaken(row)[0]
    x, missing = layout.evidence(s0[None])
    x[0, layout.act_var(0, 0)], missing[0, layout.act_var(0, 0)] = a0, False
    x[0, layout.act_var(1, 0)], missing[0, layout.act_var(1, 0)] = never, False
    targets = [layout.reward_var(1), layout.value_var(1)]
    # "uniform": uniform over the categories each target takes in the data.
    seen = torch.zeros(2, VOCAB + 1, dtype=torch.float64)
    for i, t in enumerate(targets):
        seen[i, windows[:, t].unique()] = 1.0
    torch.testing.assert_close(uniform.conditional(x, missing, targets)[0], seen / seen.sum(-1, keepdim=True))
    # "backoff": a_1 becomes "the data's own action" (not pad), as m-Trifle's survival form does.
    relaxed = missing.clone()
    relaxed[0, layout.act_var(1, 0)] = True
    soft = torch.ones(1, k * D, VOCAB + 1)
    soft[0, layout.act_var(1, 0), STOP] = 0.0
    want = _brute_conditional(windows, x, relaxed, targets, soft, VOCAB + 1)
    torch.testing.assert_close(backoff.conditional(x, missing, targets), want)
    assert backoff.backoffs == 1
    # Pseudocount: (counts + alpha * uniform over seen) / (total + alpha); zero evidence gives the fallback.
    torch.testing.assert_close(
        smoothed.conditional(x, missing, targets)[0], seen / seen.sum(-1, keepdim=True)
    )
    x2, m2 = layout.evidence(s0[None])
    counts = _brute_conditional(windows, x2, m2, targets, None, VOCAB + 1)[0]
    total = float(((windows[:, :OBS] == s0).all(1)).sum())
    want = (counts * total + 0.5 * seen / seen.sum(-1, keepdim=True)) / (total + 0.5)
    torch.testing.assert_close(smoothed.conditional(x2, m2, targets)[0], want)


# ------------------------------------------------------------- m-Trifle on an exact small MDP dataset
GAMMA = 0.9


def _chain_episodes() -> list[tuple[list[tuple[int, int, float]], float]]:
    """Every trajectory from state 0 with its probability, under a uniform behaviour policy.

    States 0, 1, 2. In 0 and 1, action 0 (safe) moves on with reward -1; action 1 (risky) moves on with
    reward +2 or, with probability 1/2, falls (reward -4, episode over). In 2 every action ends the
    episode: action 0 pays +3, action 1 pays +6 or -4 with probability 1/2 each.
    """
    out = []

    def walk(s, steps, prob):
        for a in (0, 1):
            if s < 2:
                outcomes = [(-1.0, s + 1, 1.0)] if a == 0 else [(2.0, s + 1, 0.5), (-4.0, None, 0.5)]
            else:
                outcomes = [(3.0, None, 1.0)] if a == 0 else [(6.0, None, 0.5), (-4.0, None, 0.5)]
            for r, nxt, p in outcomes:
                path = [*steps, (s, a, r)]
                if nxt is None:
                    out.append((path, prob * 0.5 * p))
                else:
                    walk(nxt, path, prob * 0.5 * p)

    walk(0, [], 1.0)
    return out


@pytest.fixture(scope="module")
def chain() -> TokenData:
    """The chain's dataset: each trajectory repeated in exact proportion to its probability (x 64)."""
    obs, act, rew, term = [], [], [], []
    for path, prob in _chain_episodes():
        copies = prob * 64
        assert copies == int(copies)
        for _ in range(int(copies)):
            for i, (s, a, r) in enumerate(path):
                obs.append([s]), act.append([a]), rew.append(r), term.append(i == len(path) - 1)
    arrays = {
        "observations": np.asarray(obs, np.float32),
        "actions": np.asarray(act, np.float32),
        "rewards": np.asarray(rew, np.float32),
        "terminals": np.asarray(term),
        "timeouts": np.zeros(len(term), bool),
    }
    labeled = label_trajectories(arrays, discount=GAMMA, termination_penalty=None)
    kinds = {"observations": "categorical", "actions": "categorical", "rewards": "categorical"}
    return tokenize(
        labeled, {**kinds, "values": "categorical", "n_bins": 100}, obs_cardinalities=[3], num_actions=2
    )


def _empirical_model(data: TokenData):
    """From the tokens: P(reward, next state or end | s, a) and E[V label | s, a] (decoded values)."""
    decoded = data.discretizer.decode(data.tokens)
    ends = set((np.append(data.episode_starts[1:], len(data.tokens)) - 1).tolist())
    outcomes: dict[tuple[int, int], Counter] = {}
    values: dict[tuple[int, int], list[float]] = {}
    for i, row in enumerate(data.tokens):
        key = (int(row[0]), int(row[1]))
        nxt = None if i in ends else int(data.tokens[i + 1, 0])
        outcomes.setdefault(key, Counter())[(float(decoded[i, 2]), nxt)] += 1
        values.setdefault(key, []).append(float(decoded[i, 3]))
    model = {k: [(n / sum(c.values()), r, s) for (r, s), n in c.items()] for k, c in outcomes.items()}
    return model, {k: float(np.mean(v)) for k, v in values.items()}


def _brute_plan_value(model, values, s: int, plan: tuple[int, ...]) -> float:
    """E[Σ_{h<H} γ^h r_h + γ^H V_{H-1}] of the open-loop plan from s under the empirical model (an
    episode that ended contributes nothing more)."""
    horizon = len(plan)

    def rec(state, h):
        a = plan[h]
        total = sum(p * GAMMA**h * r for p, r, _ in model[(state, a)])
        if h == horizon - 1:
            return total + GAMMA**horizon * values[(state, a)]
        return total + sum(p * rec(nxt, h + 1) for p, _, nxt in model[(state, a)] if nxt is not None)

    return rec(s, 0)


def _all_plans():
    return [(s, plan) for h in (1, 2, 3) for s in (0, 1, 2) for plan in itertools.product((0, 1), repeat=h)]


def _multistep(circuit, data, plans, form):
    by_len = {}
    for s, plan in plans:
        by_len.setdefault(len(plan), []).append((s, plan))
    out = {}
    for group in by_len.values():
        obs = torch.tensor([[s] for s, _ in group])
        actions = torch.tensor([list(p) for _, p in group])[:, :, None]
        got = expected_multistep_value(
            circuit, obs, actions, window=3, discount=GAMMA, discretizer=data.discretizer, form=form
        )
        out.update({key: float(v) for key, v in zip(group, got, strict=True)})
    return out


def test_chain_dataset_is_the_designed_mdp(chain):
    model, values = _empirical_model(chain)
    assert sorted(model[(0, 1)]) == [(0.5, -4.0, None), (0.5, 2.0, 1)]
    assert sorted(model[(2, 1)]) == [(0.5, -4.0, None), (0.5, 6.0, None)]
    assert values[(2, 0)] == 0.0 and values[(1, 0)] != 0.0


def test_m_trifle_value_equals_the_exact_expected_return(chain):
    """The survival form with the oracle circuit is the plan's exact expected discounted return."""
    circuit = EmpiricalCircuit.from_tokens(chain, window=3, zero_evidence="zeros")
    model, values = _empirical_model(chain)
    got = _multistep(circuit, chain, _all_plans(), "survival")
    for (s, plan), value in got.items():
        assert value == pytest.approx(_brute_plan_value(model, values, s, plan), abs=1e-9), (s, plan)
    # The oracle's default zero-evidence back-off answers the same (every queried history has support).
    again = _multistep(EmpiricalCircuit.from_tokens(chain, window=3), chain, _all_plans(), "survival")
    assert again == pytest.approx(got, abs=1e-12)


def test_soft_pad_form_is_exact_only_when_the_episode_cannot_end_at_random_inside_the_plan(chain):
    """The former single-query form agrees when termination inside the plan is deterministic and not
    otherwise, which shows the test above can tell the two forms apart."""
    circuit = EmpiricalCircuit.from_tokens(chain, window=3)
    model, values = _empirical_model(chain)
    got = _multistep(circuit, chain, _all_plans(), "soft_pad")
    safe = {(s, p) for s, p in got if all(a == 0 for a in p[:-1]) or s == 2}
    for key in safe:
        assert got[key] == pytest.approx(_brute_plan_value(model, values, *key), abs=1e-9), key
    errors = [abs(got[key] - _brute_plan_value(model, values, *key)) for key in got if key not in safe]
    assert max(errors) > 0.1


# ------------------------------------------------------------------------------------------- Taxi
TAXI = "taxi-stochastic"
DELIVERY_STATE = [0, 4, 4, 1]  # taxi at G with the passenger on board, destination G
DROPOFF = 5


@pytest.fixture(scope="module")
def taxi():
    """The project's Taxi dataset (task config: 1000 episodes, seed 0) -> labels -> tokens, and oracles."""
    task = compose([f"task={TAXI}"])["task"]
    data, data_mean = toy_task_tokens(task)
    gpt = TabularGPT.from_tokens(data)
    circuit = EmpiricalCircuit.from_tokens(data, window=task["pc_window"])
    return task, data, data_mean, gpt, circuit


@pytest.mark.slow  # 30 Taxi episodes per planner
@pytest.mark.parametrize("method", ["tt", "trifle-s", "trifle-m"])
def test_taxi_planners_on_oracle_models_beat_the_data(taxi, method):
    """The task's own planner settings (composed config) on exact models of its dataset."""
    task, data, data_mean, gpt, circuit = taxi
    cfg = compose([f"task={TAXI}", f"planner={method}"])
    policy = make_planner(
        cfg["planner"],
        model=gpt,
        discretizer=data.discretizer,
        obs_dim=data.obs_dim,
        act_dim=data.act_dim,
        discount=task["labels"]["discount"],
        circuit=circuit,
        circuit_window=task["pc_window"],
    )
    results = evaluate_policy(policy, make_mdp(TAXI), episodes=30, batch_episodes=30, seed=0, progress=False)
    # Measured with value_threshold strict and act_support 0.3 (30 episodes, evaluation seeds 0-3):
    # tt -6.9..-12.0, trifle-s -5.1..-13.3, trifle-m -7.1..-19.7, success rate 1.0 throughout; no
    # ordering between the methods is stable across seeds. Data mean -127, optimum -7.2.
    assert np.mean(results.returns) > data_mean
    assert np.mean(results.successes) >= 0.8


@pytest.mark.parametrize("rule", ["mass", "cdf", "strict"])
def test_trifle_proposal_at_the_delivery_state(taxi, rule):
    """At the destination with the passenger on board, the drop-off (reward +20, the data's choice there
    90% of the time) is the best action.

    With the return-to-go target its G = 20.19 is the top level and holds 90% of p(G | s): the mass rule
    (the default) scores it highest and the cdf rule positively; the strict rule keeps only the levels
    above the atom, which no action reaches, and scores every action 0. With V_t alone (the return
    *after* r_t: 0 after the delivery) even the drop-off's mass sits below other actions' values and
    the strict rule scores it 0: s-Trifle would never deliver.
    """
    task, data, _, gpt, circuit = taxi
    layout = WindowLayout(data.obs_dim, data.act_dim, task["pc_window"], circuit.num_cats)
    x, missing = layout.evidence(torch.tensor([DELIVERY_STATE]))
    gpt_probs = gpt.log_prob_next(torch.tensor([DELIVERY_STATE]), None)[0][0, :6].exp()
    assert int(gpt_probs.argmax()) == DROPOFF
    ratio = task["planning"]["top_ratio"]
    var = layout.act_var(0, 0)
    rtg = CorrectionTarget.return_to_go(layout, data.discretizer, task["labels"]["discount"])
    keep = kept_bins(rtg.distribution(circuit, x, missing), ratio, rule)
    scores, _ = candidate_scores(circuit, x, missing, var, 6, rtg, keep)
    if rule == "strict":
        assert float(scores.max()) == 0.0
    else:
        assert float(scores[0, DROPOFF]) > 0.0 and int(scores[0].argmax()) == DROPOFF
    if rule == "strict":
        value_only = CorrectionTarget.value(layout.value_var(0), int(data.discretizer.num_bins[-1]))
        keep = kept_bins(value_only.distribution(circuit, x, missing), ratio, rule)
        scores, _ = candidate_scores(circuit, x, missing, var, 6, value_only, keep)
        assert float(scores[0, DROPOFF]) == 0.0 and float(scores.max()) > 0.0


def test_return_to_go_distribution_equals_counting(taxi):
    """p(r_t + gamma V_t | s, a) from the circuit's joint (one query per reward bin) equals the data's
    histogram of r + gamma V over the rows with that state and action (every Taxi episode ends in a
    delivery, so every row starts a window of the empirical circuit)."""
    task, data, _, _, circuit = taxi
    gamma = task["labels"]["discount"]
    layout = WindowLayout(data.obs_dim, data.act_dim, task["pc_window"], circuit.num_cats)
    rtg = CorrectionTarget.return_to_go(layout, data.discretizer, gamma)
    r_vals, v_vals = data.discretizer.columns[-2].values, data.discretizer.columns[-1].values
    levels = np.unique(r_vals[:, None] + gamma * v_vals[None, :])
    rows = data.tokens
    for state, action in [
        (DELIVERY_STATE, DROPOFF),
        (DELIVERY_STATE, 0),
        (list(rows[5, :4]), int(rows[5, 4])),
    ]:
        x, missing = layout.evidence(torch.tensor([state]))
        x[:, layout.act_var(0, 0)], missing[:, layout.act_var(0, 0)] = action, False
        got = rtg.distribution(circuit, x, missing)[0].numpy()
        match = (rows[:, :4] == np.asarray(state)).all(axis=1) & (rows[:, 4] == action)
        g = r_vals[rows[match, -2]] + gamma * v_vals[rows[match, -1]]
        want = np.bincount(np.searchsorted(levels, g), minlength=len(levels)) / match.sum()
        np.testing.assert_allclose(got, want, atol=1e-12)
