"""Common random numbers in the tabular envs and the summary's paired comparison against TT."""

import csv
import math

import numpy as np
import pytest

from trifle.envs import VectorTabularEnv, make_mdp
from trifle.envs.frozenlake import make_frozenlake
from trifle.errors import ConfigError, DataError
from trifle.evaluation.rollout import evaluate_policy
from trifle.evaluation.summary import SUMMARY_COLUMNS, summarize
from trifle.io import write_json
from trifle.stages import summary as summary_stage

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
# Toward the goal of SFFF/FHFH/FFFH/HFFG; on the slippery lake every move goes sideways w.p. 2/3.
PATH = {(0, 0): RIGHT, (0, 1): RIGHT, (0, 2): DOWN, (1, 2): DOWN, (2, 2): DOWN, (3, 2): RIGHT}


# ------------------------------------------------------------------------------ environments


def _trajectories(env: VectorTabularEnv, actions: np.ndarray, reset_at: tuple[int, int] | None = None):
    """States ``[T + 1, E]`` of a rollout with a fixed action schedule ``[T, E]`` (frozen when done);
    ``reset_at = (t, slot)`` resets that slot again before step t."""
    env.reset()
    states = [env.states.copy()]
    for t, a in enumerate(actions):
        if reset_at is not None and t == reset_at[0]:
            env.reset(np.array([reset_at[1]]))
        env.step(a)
        states.append(env.states.copy())
    return np.stack(states)


def test_a_slot_sees_the_same_randomness_whatever_the_other_slots_do():
    """Slot i of two Taxi envs with the same seed: same initial state, and the same outcomes while its
    actions agree, although every other slot acts differently (and one is reset mid-episode)."""
    mdp = make_mdp("taxi-stochastic")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(40, 5))
    b = a.copy()
    b[:, 1:] = rng.integers(0, 6, size=(40, 4))  # slots 1-4 act differently in B
    first = _trajectories(VectorTabularEnv(mdp, 5, seed=7), a)
    # an extra reset of slot 3 in B draws from that slot's stream only
    second = _trajectories(VectorTabularEnv(mdp, 5, seed=7), b, reset_at=(10, 3))
    np.testing.assert_array_equal(first[:, 0], second[:, 0])
    np.testing.assert_array_equal(first[0], second[0])  # every slot: the same initial state
    assert not np.array_equal(first[:, 1:], second[:, 1:])
    # The earlier layout (one generator for all slots, drawing for the running ones in order) does not
    # give this: the extra reset shifts every later draw, and slot 0 diverges.
    shared_a = _trajectories(VectorTabularEnv(mdp, 5, seed=7, rng="shared"), a)
    shared_b = _trajectories(VectorTabularEnv(mdp, 5, seed=7, rng="shared"), b, reset_at=(10, 3))
    assert not np.array_equal(shared_a[:, 0], shared_b[:, 0])


def test_slot_streams_do_not_depend_on_the_block_or_the_number_of_envs():
    mdp = make_mdp("taxi-stochastic")
    actions = np.random.default_rng(1).integers(0, 6, size=(30, 7))
    ref = _trajectories(VectorTabularEnv(mdp, 7, seed=3), actions)
    np.testing.assert_array_equal(ref, _trajectories(VectorTabularEnv(mdp, 7, seed=3, block=1), actions))
    np.testing.assert_array_equal(ref, _trajectories(VectorTabularEnv(mdp, 7, seed=3, block=4), actions))
    np.testing.assert_array_equal(ref[:, :3], _trajectories(VectorTabularEnv(mdp, 3, seed=3), actions[:, :3]))
    assert not np.array_equal(ref, _trajectories(VectorTabularEnv(mdp, 7, seed=4), actions))
    assert len(np.unique(ref[0])) > 1  # slots start in different states


def test_shared_layout_is_the_earlier_single_generator():
    """The toy datasets use rng="shared": one Generator, the running slots' draws in order."""
    mdp = make_frozenlake()
    env = VectorTabularEnv(mdp, 4, seed=11, rng="shared")
    env.reset()
    rng = np.random.default_rng(11)
    np.testing.assert_array_equal(env.states, rng.choice(mdp.num_states, size=4, p=mdp.initial))
    env.step(np.full(4, DOWN))
    u = rng.random(4)
    cdf = np.cumsum(mdp.prob[0, DOWN])
    k = (u[:, None] * cdf[-1] >= cdf).sum(-1)
    np.testing.assert_array_equal(env.states, mdp.next_state[0, DOWN, k])
    with pytest.raises(ConfigError, match="rng"):
        VectorTabularEnv(mdp, 2, seed=0, rng="global")


def test_initial_states_follow_the_initial_distribution():
    mdp = make_mdp("taxi-stochastic")
    env = VectorTabularEnv(mdp, 20000, seed=0)
    env.reset()
    assert mdp.initial[env.states].min() > 0  # never a zero-probability state
    freq = np.bincount(env.states, minlength=mdp.num_states) / 20000
    support = mdp.initial > 0
    assert np.abs(freq[support] - mdp.initial[support]).max() < 5 * math.sqrt(mdp.initial.max() / 20000)


class LoggingPolicy:
    """PATH on FrozenLake, except that slot ``odd_slot`` always goes LEFT; logs each slot's observations."""

    def __init__(self, odd_slot: int | None = None) -> None:
        self.odd_slot = odd_slot
        self.log: list[dict[int, list[tuple[int, ...]]]] = []

    def reset(self, num_envs: int, seed: int) -> None:
        self.log.append({i: [] for i in range(num_envs)})

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        out = []
        for i, o in zip(env_ids.tolist(), obs, strict=True):
            key = tuple(int(v) for v in o)
            self.log[-1][i].append(key)
            out.append(LEFT if i == self.odd_slot else PATH.get(key, LEFT))
        return np.array(out, float)[:, None]

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        pass

    def episodes(self) -> list[list[tuple[int, ...]]]:
        return [batch[i] for batch in self.log for i in sorted(batch)]


def test_two_methods_share_every_episode_they_act_alike_in():
    """Slippery FrozenLake through evaluate_policy: the method that acts differently in one episode of
    each batch changes only those episodes; every other episode is identical, step for step."""
    mdp = make_frozenlake()
    a, b = LoggingPolicy(), LoggingPolicy(odd_slot=0)
    kwargs = dict(episodes=12, batch_episodes=5, seed=3, progress=False)
    ra, rb = evaluate_policy(a, mdp, **kwargs), evaluate_policy(b, mdp, **kwargs)
    odd = {0, 5, 10}  # slot 0 of each batch
    ea, eb = a.episodes(), b.episodes()
    for i in range(12):
        assert ea[i][0] == eb[i][0]  # the same initial state (FrozenLake: always the start)
        if i not in odd:
            assert ea[i] == eb[i] and ra.returns[i] == rb.returns[i] and ra.steps[i] == rb.steps[i]
    assert any(ra.steps[i] != rb.steps[i] for i in odd)  # the odd episodes did differ in length


def test_same_episode_index_same_initial_state_across_methods():
    """Taxi has ~300 initial states: two different policies start episode i in the same one."""
    mdp = make_mdp("taxi-stochastic")

    class Constant(LoggingPolicy):
        def __init__(self, action: int) -> None:
            super().__init__()
            self.action = action

        def act(self, env_ids, obs):
            for i, o in zip(env_ids.tolist(), obs, strict=True):
                self.log[-1][i].append(tuple(int(v) for v in o))
            return np.full((len(env_ids), 1), float(self.action))

    p, q = Constant(0), Constant(4)
    kwargs = dict(episodes=9, batch_episodes=4, seed=1, progress=False)
    evaluate_policy(p, mdp, **kwargs)
    evaluate_policy(q, mdp, **kwargs)
    starts_p = [e[0] for e in p.episodes()]
    assert starts_p == [e[0] for e in q.episodes()] and len(set(starts_p)) > 3


# ----------------------------------------------------------------------------------- summary


def _record(method, seed, returns, task="t", batch_episodes=None, **extra):
    record = {
        "task": task,
        "method": method,
        "seed": seed,
        "episodes": {
            "returns": returns,
            "successes": [False] * len(returns),
            "penalties": [0] * len(returns),
        },
        "plan_seconds": 1.0,
        "env_steps": 10,
        **extra,
    }
    if batch_episodes is not None:
        record["eval"] = {"episodes": len(returns), "batch_episodes": batch_episodes}
    return record


def test_paired_difference_and_standard_error_by_hand():
    rows = summarize(
        [
            _record("tt", 0, [1.0, 2.0, 3.0, 4.0]),
            _record("trifle-s", 0, [2.0, 2.0, 5.0, 4.0]),
        ]
    )
    tt, ts = (next(r for r in rows if r["method"] == m) for m in ("tt", "trifle-s"))
    # differences 1, 0, 2, 0: mean 0.75, squared deviations 0.0625 + 0.5625 + 1.5625 + 0.5625 = 2.75
    assert ts["diff_vs_tt"] == pytest.approx(0.75)
    assert ts["diff_vs_tt_sem"] == pytest.approx(math.sqrt(2.75 / 3) / 2)
    assert tt["diff_vs_tt"] == "" and tt["diff_vs_tt_sem"] == ""
    # The paired error is smaller than the unpaired one: the two methods' returns are correlated.
    assert ts["diff_vs_tt_sem"] < math.hypot(ts["return_sem"], tt["return_sem"])


def test_pairs_need_the_same_seed_index_and_batching():
    rows = summarize(
        [
            _record("tt", 0, [0.0, 10.0, 4.0], batch_episodes=3),
            _record("tt", 1, [1.0, 1.0], batch_episodes=2),
            _record("tt", 2, [5.0, 5.0], batch_episodes=2),
            # seed 0: only the first two episodes pair (the common prefix)
            _record("dt", 0, [1.0, 12.0], batch_episodes=3, target_return=-300),
            # seed 1: other batching; only index 0 is (batch 0, slot 0) in both files
            _record("dt", 1, [9.0, 9.0], batch_episodes=1, target_return=-300),
            # seed 2: batching unknown in one file: no pairs
            _record("dt", 2, [3.0, 3.0], target_return=-300),
            # seed 3: no tt file
            _record("dt", 3, [7.0, 7.0], batch_episodes=2, target_return=-250),
            # another task without tt
            _record("dt", 0, [1.0, 2.0], task="u", target_return=-100),
        ]
    )
    dt = next(r for r in rows if (r["task"], r["method"]) == ("t", "dt"))
    # seed 0 pairs indices 0 and 1, seed 1 index 0; seeds 2 and 3 have none. Two seeds with pairs: the
    # mean and standard error over their per-seed mean differences (the tables' one convention).
    seed_means = [np.mean([1.0 - 0.0, 12.0 - 10.0]), 9.0 - 1.0]
    assert dt["diff_vs_tt"] == pytest.approx(np.mean(seed_means))
    assert dt["diff_vs_tt_sem"] == pytest.approx(np.std(seed_means, ddof=1) / math.sqrt(2))
    assert dt["n_episodes"] == 8 and dt["dt_target"] == "-300 x3, -250 x1"
    other = next(r for r in rows if r["task"] == "u")
    assert other["diff_vs_tt"] == "" and other["diff_vs_tt_sem"] == "" and other["dt_target"] == "-100"
    assert next(r for r in rows if r["method"] == "tt")["dt_target"] == ""


def test_a_single_pair_has_no_standard_error_and_no_pairs_leave_the_cells_empty():
    rows = summarize([_record("tt", 0, [1.0]), _record("tt-safe", 0, [3.0]), _record("trifle-m", 5, [3.0])])
    by = {r["method"]: r for r in rows}
    assert by["tt-safe"]["diff_vs_tt"] == 2.0 and math.isnan(by["tt-safe"]["diff_vs_tt_sem"])
    assert by["trifle-m"]["diff_vs_tt"] == ""


def test_two_files_for_one_seed_are_rejected():
    with pytest.raises(DataError, match="seed 0"):
        summarize([_record("tt", 0, [1.0]), _record("tt", 0, [2.0])])


def test_summary_stage_writes_the_new_columns(tmp_path):
    files = []
    for method, returns, extra in [
        ("dt", [0.0, 1.0, 1.0], {"target_return": 1.0}),
        ("tt", [0.0, 0.0, 1.0], {}),
        ("trifle-s", [1.0, 0.0, 1.0], {}),
    ]:
        files.append(tmp_path / f"{method}.json")
        write_json(files[-1], _record(method, 0, returns, task="frozenlake-eps0.5", **extra))
    cfg = {
        "paths": {
            "eval_files": [str(f) for f in files],
            "summary_table": str(tmp_path / "summary.csv"),
            "returns_figure": str(tmp_path / "returns.png"),
        }
    }
    summary_stage.run(cfg)
    with open(tmp_path / "summary.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert tuple(next(iter(rows.values()))) == SUMMARY_COLUMNS
    assert rows["dt"]["dt_target"] == "1" and rows["tt"]["dt_target"] == ""
    assert rows["dt"]["diff_vs_tt"] == "0.3333" and rows["dt"]["diff_vs_tt_sem"] == "0.3333"
    assert rows["tt"]["diff_vs_tt"] == "" and rows["trifle-s"]["diff_vs_tt"] == "0.3333"
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].startswith("| task | method | dt_target |") and "| diff_vs_tt | diff_vs_tt_sem |" in md[0]
    assert md[2] == (
        "| frozenlake-eps0.5 | dt | 1 | 1 | 3 | 0.6667 | 0.3333 | episodes | 0.3333 | 0.3333 | 1.0000 | 0.0000"
        " | 0.1000 |"
    )
    assert rows["dt"]["sem_over"] == "episodes"
    # The note under the table states the convention and what each row used.
    assert md[5] == "" and "over episodes where it has one" in md[6]
    assert "rows over seeds: 0, over episodes: 3" in md[6]
