"""The inference-time optimality score: its math on hand-built distributions, return models against the
counts of a tiny dataset, the executed steps the rollouts record, and the stages end to end on Taxi.

* ``mid_cdf``: P(G < g) + 1/2 P(G = g) at every bin value, linear between bin values, 0 / 1 outside;
  centred (mean 1/2 for a point drawn from the distribution itself); ``step_scores`` and
  ``trajectory_means`` on numbers worked out by hand.
* A return model trained on a fixed two-state, two-action dataset gives p^s and p^a within 0.05 of the
  training rows' frequencies, and the score of each action follows from those frequencies.
* Rollouts record every executed step: rewards sum to the returns, step 0's states are the environments'
  reset states, the actions are the policy's.
* Stages: data -> labels -> tokens -> train_dt, train_aux (both kinds) -> evaluate (DT, two targets: the
  steps are the reported target's, the record is as before) -> optimality -> optimality_table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trifle.__main__ import main
from trifle.data.labels import LabeledTrajectories
from trifle.data.tokens import tokenize
from trifle.envs import make_mdp
from trifle.envs.tabular import VectorTabularEnv
from trifle.errors import DataError
from trifle.evaluation.optimality import (
    expected_returns,
    mid_cdf,
    score_steps,
    step_scores,
    trajectory_means,
)
from trifle.evaluation.optimality_table import optimality_rows, pearson
from trifle.evaluation.rollout import evaluate_policy
from trifle.evaluation.steps import EpisodeSteps, ExecutedSteps, load_steps, save_steps
from trifle.io import read_json
from trifle.models.aux_training import load_aux, train_aux

# ------------------------------------------------------------------------------------------- the math

VALUES = np.array([0.0, 1.0, 2.0])
P_STATE = np.array([[0.2, 0.5, 0.3]])  # knots: 0.1, 0.45, 0.85


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, 0.2 / 2),  # at a bin value: P(G < 0) + 1/2 P(G = 0)
        (1.0, 0.2 + 0.5 / 2),
        (2.0, 0.7 + 0.3 / 2),
        (0.5, (0.1 + 0.45) / 2),  # halfway between two bin values: halfway between their values
        (1.25, 0.45 + 0.25 * (0.85 - 0.45)),
        (-0.1, 0.0),  # below every return of the distribution
        (2.5, 1.0),  # above every return
    ],
)
def test_mid_cdf_by_hand(x, expected):
    assert mid_cdf(P_STATE, VALUES, np.array([x]))[0] == pytest.approx(expected, abs=1e-12)


def test_mid_cdf_is_centred_and_rows_are_independent():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=3)
    values = np.array([-3.0, -1.0, 0.0, 2.5, 7.0])
    for p in probs:
        # R drawn from the distribution itself: the mean score is 1/2 exactly.
        at_bins = mid_cdf(np.repeat(p[None], 5, axis=0), values, values)
        assert float(p @ at_bins) == pytest.approx(0.5, abs=1e-12)
    x = np.array([0.0, 0.0, 0.0])
    assert np.allclose(mid_cdf(probs, values, x), [mid_cdf(p[None], values, x[:1])[0] for p in probs])


def test_step_scores_and_trajectory_means_by_hand():
    p_action = np.array(
        [
            [0.0, 1.0, 0.0],  # R = 1: the mid value 0.45
            [0.5, 0.0, 0.5],  # R = 1 again, from another mixture
            [0.0, 0.5, 0.5],  # R = 1.5: halfway between 0.45 and 0.85
            [1.0, 0.0, 0.0],  # R = 0: 0.1
        ]
    )
    p_state = np.repeat(P_STATE, 4, axis=0)
    scores, expected = step_scores(p_state, VALUES, p_action, VALUES)
    assert np.allclose(expected, [1.0, 1.0, 1.5, 0.0]) and np.allclose(
        expected_returns(p_action, VALUES), expected
    )
    assert np.allclose(scores, [0.45, 0.45, 0.65, 0.1])
    assert np.allclose(trajectory_means(scores, np.array([0, 0, 1, 1]), 2), [0.45, 0.375])
    with pytest.raises(DataError, match="episodes 0..2"):
        trajectory_means(scores, np.array([0, 0, 1, 1]), 3)
    with pytest.raises(DataError, match="probability distribution"):
        mid_cdf(np.array([[0.5, 0.4, 0.0]]), VALUES, np.array([0.0]))


def test_table_rows_follow_the_standard_error_convention_and_correlate_scores_with_returns():
    def record(seed: int, scores: list[float], returns: list[float], name: str = "tt") -> dict:
        return {"task": "t", "method": name, "seed": seed, "episodes": {"scores": scores, "returns": returns}}

    rows = optimality_rows(
        [
            record(0, [0.2, 0.4], [1.0, 2.0]),
            record(1, [0.6, 0.8], [4.0, 3.0]),
            record(0, [0.5, 0.7, 0.9], [1.0, 2.0, 3.0], "dt"),
        ]
    )
    assert [r["method"] for r in rows] == ["dt", "tt"]  # the registry's order
    dt, tt = rows
    assert dt["label"] == "DT" and dt["sem_over"] == "episodes" and dt["corr_return"] == pytest.approx(1.0)
    assert dt["score_sem"] == pytest.approx(0.2 / np.sqrt(3))
    # Two seeds: the mean of the seed means (0.3, 0.7) and their std / sqrt(2).
    assert tt["seeds"] == 2 and tt["episodes"] == 4 and tt["sem_over"] == "seeds"
    assert tt["score_mean"] == pytest.approx(0.5) and tt["score_sem"] == pytest.approx(0.2)
    assert tt["return_mean"] == pytest.approx(2.5)
    assert tt["corr_return"] == pytest.approx(
        pearson(np.array([0.2, 0.4, 0.6, 0.8]), np.array([1, 2, 4, 3.0]))
    )
    assert pearson(np.array([0.5, 0.5]), np.array([1.0, 2.0])) is None
    with pytest.raises(DataError, match="two optimality files"):
        optimality_rows([record(0, [0.1], [1.0]), record(0, [0.2], [2.0])])


# ---------------------------------------------------------------- return models against the counts

# (state, action, reward, rows): in state 0 action 0 returns 0, action 1 returns 1; in state 1 action 0
# returns 2 and action 1 returns 0 or 2 equally often. One-step episodes, so G = r.
DESIGN = [(0, 0, 0.0, 60), (0, 1, 1.0, 20), (1, 0, 2.0, 40), (1, 1, 0.0, 20), (1, 1, 2.0, 20)]


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict:
    rows = np.array([(s, a, r) for s, a, r, n in DESIGN for _ in range(n)])
    rows = rows[np.random.default_rng(0).permutation(len(rows))]
    n = len(rows)
    labeled = LabeledTrajectories(
        observations=rows[:, :1].astype(np.float32),
        actions=rows[:, 1:2].astype(np.float32),
        rewards=rows[:, 2].astype(np.float32),
        values=np.zeros(n, np.float32),
        episode_starts=np.arange(n, dtype=np.int64),
        episode_terminal=np.ones(n, bool),
    )
    kinds = {"observations": "categorical", "actions": "categorical", "rewards": "categorical"}
    tokens = tokenize(labeled, {**kinds, "values": "quantile", "n_bins": 10})
    cfg = {
        "n_layer": 1,
        "n_head": 1,
        "n_embd": 16,
        "dropout": 0.0,
        "batch_size": 64,
        "learning_rate": 1e-2,
        "steps": 200,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "value_bins": 10,
        "valid_fraction": 0.1,
        "eval_every": 0,
        "eval_rows": 64,
        "checkpoint_every": 0,
    }
    root = tmp_path_factory.mktemp("counts")
    models = {}
    for kind in ("state", "action"):
        out = root / f"{kind}.pt"
        train_aux(
            {**cfg, "kind": kind},
            tokens=tokens,
            labeled=labeled,
            discount=0.9,
            seed=0,
            out_path=out,
            progress=False,
        )
        models[kind] = load_aux(out, kind=kind)
    import torch

    train = torch.load(root / "state.pt", weights_only=True)["data"]["train_episodes"]
    return {"models": models, "train": rows[np.asarray(train)]}


def test_return_models_match_the_training_counts(counted):
    state, action = counted["models"]["state"], counted["models"]["action"]
    train = counted["train"]
    assert np.allclose(state.returns.values, [0.0, 1.0, 2.0])  # one bin per distinct return
    grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float)
    p_state = state.distribution(grid[:, :1])
    p_action = action.distribution(grid[:, :1], grid[:, 1:])
    for i, (s, a) in enumerate(grid):
        in_state = train[train[:, 0] == s]
        after = in_state[in_state[:, 1] == a]
        counts_s = np.array([np.mean(in_state[:, 2] == g) for g in (0.0, 1.0, 2.0)])
        counts_a = np.array([np.mean(after[:, 2] == g) for g in (0.0, 1.0, 2.0)])
        assert np.abs(p_state[i] - counts_s).max() < 0.05, (s, p_state[i], counts_s)
        assert np.abs(p_action[i] - counts_a).max() < 0.05, (s, a, p_action[i], counts_a)
    # The scores from the counts: state 0 returns 0 (share p0) or 1, so action 0 (R = 0) is at p0 / 2 and
    # action 1 (R = 1) at p0 + (1 - p0) / 2. State 1 returns 0 (share p1) or 2, never 1, so its mid values are
    # p1 / 2, p1 and p1 + (1 - p1) / 2 at 0, 1, 2: action 0 (R = 2) is at the last, action 1 (R = 2 q, q the
    # share of its returns that are 2, about 1/2) between the last two.
    steps = ExecutedSteps(
        episode=np.arange(4),
        step=np.zeros(4, np.int64),
        obs=grid[:, :1],
        action=grid[:, 1:],
        reward=np.zeros(4),
    )
    scored = score_steps(steps, state, action)
    p0, p1 = np.mean(train[train[:, 0] == 0][:, 2] == 0.0), np.mean(train[train[:, 0] == 1][:, 2] == 0.0)
    r11 = train[(train[:, 0] == 1) & (train[:, 1] == 1)][:, 2].mean()
    hand = [p0 / 2, p0 + (1 - p0) / 2, p1 + (1 - p1) / 2, p1 + (r11 - 1) * (1 - p1) / 2]
    assert np.allclose(scored.scores, hand, atol=0.05), (scored.scores, hand)
    with pytest.raises(DataError, match="a state and an action model"):
        score_steps(steps, action, state)


# ----------------------------------------------------------------------------- the executed steps


class CyclingPolicy:
    """Acts 0, 1, 2, 3, 0, ... per step: a fixed action sequence whose outcomes the env decides."""

    def reset(self, num_envs: int, seed: int) -> None:
        self.t = 0

    def act(self, env_ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        self.t += 1
        return np.full((len(env_ids), 1), float((self.t - 1) % 4))

    def record(self, env_ids: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        pass


def test_rollouts_record_every_executed_step(tmp_path):
    mdp = make_mdp("taxi-stochastic", max_episode_steps=9)
    results = evaluate_policy(CyclingPolicy(), mdp, episodes=5, batch_episodes=2, seed=3, progress=False)
    steps = ExecutedSteps.from_episodes(results.trajectories)
    save_steps(tmp_path / "s.npz", steps)
    loaded = load_steps(tmp_path / "s.npz")
    for key in ("episode", "step", "obs", "action", "reward"):
        assert np.array_equal(getattr(loaded, key), getattr(steps, key))
    assert np.allclose(loaded.episode_returns(), results.returns)
    assert np.bincount(loaded.episode).tolist() == results.steps
    assert np.array_equal(loaded.action[:, 0], loaded.step % 4)
    first = loaded.obs[loaded.step == 0]
    for b, start in enumerate(range(0, 5, 2)):
        size = min(2, 5 - start)
        batch_seed = int(np.random.SeedSequence([3, b]).generate_state(1)[0])
        reset = VectorTabularEnv(mdp, size, batch_seed, rng="per_env").reset()
        assert np.array_equal(first[start : start + size], reset)
    with pytest.raises(DataError, match="at least one step"):
        ExecutedSteps.from_episodes([EpisodeSteps(np.zeros((0, 4)), np.zeros((0, 1)), np.zeros(0))])


# ------------------------------------------------------------------------------- stages, end to end


@pytest.fixture(scope="module")
def taxi(tmp_path_factory) -> dict[str, Path]:
    """Taxi on 60 episodes: tiny DT and return models (the smoke workflow's sizes), DT evaluated at two
    targets, then the score and the table."""
    root = tmp_path_factory.mktemp("taxi")
    paths = {
        "raw": root / "raw.hdf5",
        "labeled": root / "labeled.npz",
        "tokens": root / "tokens.npz",
        "dt": root / "dt.pt",
        "dt_metrics": root / "dt.json",
        "eval": root / "seed0.json",
        "eval_steps": root / "seed0.steps.npz",
        "aux_state": root / "state.pt",
        "aux_action": root / "action.pt",
        "optimality": root / "seed0.optimality.json",
        "optimality_table": root / "optimality.csv",
        "optimality_figure": root / "optimality.png",
    }
    common = ["task=taxi-stochastic", "task.dataset.num_episodes=60", "progress=false", "device=cpu"]
    common += [f"paths.{k}={v}" for k, v in paths.items()]
    for stage in ("data", "labels", "tokens"):
        assert main([stage, *common]) == 0
    assert main(["train_dt", *common, "dt.steps=30", "dt.eval_every=0", "dt.checkpoint_every=0"]) == 0
    for kind in ("state", "action"):
        aux = [f"aux.kind={kind}", "aux.steps=20", "aux.eval_every=10", "aux.eval_rows=64"]
        aux += [f"paths.aux={paths[f'aux_{kind}']}", f"paths.aux_metrics={root / kind}.metrics.json"]
        assert main(["train_aux", *common, *aux]) == 0
    episodes = ["eval.episodes=6", "eval.batch_episodes=3", "eval.max_episode_steps=25"]
    assert main(["evaluate", *common, "planner=dt", "planner.target_return=[-100,-300]", *episodes]) == 0
    assert main(["optimality", *common, "planner=dt"]) == 0
    assert main(["optimality_table", *common, f"paths.optimality_files=[{paths['optimality']}]"]) == 0
    return paths


def test_the_steps_are_the_reported_targets_and_the_record_is_unchanged(taxi):
    record = read_json(taxi["eval"])
    steps = load_steps(taxi["eval_steps"])
    assert np.allclose(steps.episode_returns(), record["episodes"]["returns"])
    assert np.bincount(steps.episode).tolist() == record["episodes"]["steps"]
    assert steps.obs.shape == (len(steps.episode), 4) and steps.action.shape == (len(steps.episode), 1)
    assert set(record["episodes"]) == {"returns", "steps", "penalties", "successes", "violations"}
    assert "trajectories" not in record and all("trajectories" not in t for t in record["targets"])


def test_the_score_file_and_the_table(taxi):
    score = read_json(taxi["optimality"])
    record = read_json(taxi["eval"])
    assert (score["task"], score["method"], score["seed"]) == ("taxi-stochastic", "dt", 0)
    assert score["episodes"]["returns"] == record["episodes"]["returns"]
    assert score["episodes"]["steps"] == record["episodes"]["steps"]
    assert len(score["episodes"]["scores"]) == 6 and all(0 <= s <= 1 for s in score["episodes"]["scores"])
    assert Path(f"{taxi['optimality']}.run.json").is_file()
    csv = taxi["optimality_table"].read_text().splitlines()
    assert csv[0] == "task,method,label,seeds,episodes,score_mean,score_sem,sem_over,corr_return,return_mean"
    assert csv[1].startswith("taxi-stochastic,dt,DT,1,6,")
    assert "mid-distribution" in taxi["optimality_table"].with_suffix(".md").read_text()
    assert taxi["optimality_figure"].read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads(Path(str(taxi["aux_state"]).replace("state.pt", "state.metrics.json")).read_text())
    assert metrics["model"] == "aux" and metrics["kind"] == "state" and metrics["heldout_ll_per_token"] < 0


def test_scoring_refuses_steps_of_another_run(taxi, tmp_path):
    steps = load_steps(taxi["eval_steps"])
    save_steps(
        tmp_path / "other.npz",
        ExecutedSteps(steps.episode, steps.step, steps.obs, steps.action, steps.reward + 1.0),
    )
    args = ["optimality", "task=taxi-stochastic", "planner=dt", "device=cpu", "progress=false"]
    args += [f"paths.{k}={taxi[k]}" for k in ("eval", "aux_state", "aux_action")]
    args += [f"paths.eval_steps={tmp_path / 'other.npz'}", f"paths.optimality={tmp_path / 'o.json'}"]
    assert main(args) == 1
    assert not (tmp_path / "o.json").exists()
