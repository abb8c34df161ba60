"""Decision Transformer's target protocol: a list of conditioning returns per task, every target on
the same episodes, the best one reported and all of them kept."""

import json

import numpy as np
import pytest

from trifle.__main__ import main
from trifle.config import compose, stage_slice
from trifle.data.labels import LabeledTrajectories
from trifle.envs import make_mdp
from trifle.errors import ConfigError
from trifle.evaluation.summary import summarize
from trifle.models.dt_training import train_dt
from trifle.planning.dt_policy import dt_target_returns, parse_target_returns
from trifle.stages import evaluate

PAPER_TAXI_TARGETS = [-100.0, -150.0, -200.0, -250.0, -300.0, -350.0]


def test_tasks_carry_target_lists():
    taxi = compose(["task=taxi-stochastic", "planner=dt"])
    assert taxi["task"]["dt_target_returns"] == PAPER_TAXI_TARGETS
    assert dt_target_returns(taxi) == PAPER_TAXI_TARGETS
    assert stage_slice(taxi, "evaluate")["task.dt_target_returns"] == PAPER_TAXI_TARGETS
    assert compose(["task=frozenlake-eps0.5"])["task"]["dt_target_returns"] == [1.0]
    assert compose(["task=hopper-medium-v2"])["task"]["dt_target_returns"] == [3600]


@pytest.mark.parametrize(
    ("override", "expected"),
    [("planner.target_return=-300", [-300.0]), ("planner.target_return=[-200,-250.5]", [-200.0, -250.5])],
)
def test_planner_target_overrides_the_task_list(override, expected):
    cfg = compose(["task=taxi-stochastic", "planner=dt", override])
    assert dt_target_returns(cfg) == expected


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.dt_target_returns=[]"], "task.dt_target_returns"),
        (["task.dt_target_returns=[-100,high]"], "task.dt_target_returns"),
        (["task.dt_target_returns=[true]"], "task.dt_target_returns"),
        (["planner=dt", "planner.target_return=[]"], "planner.target_return"),
        (["planner=dt", "planner.target_return=[-100,null]"], "planner.target_return"),
        (["planner=dt", "planner.target_return=high"], "planner.target_return"),
    ],
)
def test_bad_targets_fail_when_the_config_is_validated(overrides, key, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(overrides)
    assert main(["show", *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


def test_parse_target_returns():
    assert parse_target_returns(-300, "k") == [-300.0]
    assert parse_target_returns([1, 2.5], "k") == [1.0, 2.5]
    for bad in ([], [float("nan")], "1", [False], None):
        with pytest.raises(ConfigError, match="^k: "):
            parse_target_returns(bad, "k")


def test_best_target_takes_the_highest_mean_and_the_first_on_ties():
    means = [{"return_mean": m} for m in (-5.0, -2.0, -3.0, -2.0)]
    assert evaluate.best_target(means) == 1


@pytest.fixture(scope="module")
def taxi_dt(tmp_path_factory):
    """A tiny DT on Taxi-shaped episodes whose action depends on the return-to-go: north (1) while it is
    below -4, pick-up (4) near the end, so a target changes what the policy does."""
    mdp = make_mdp("taxi-stochastic")
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 10, size=60)
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rtg = -(np.repeat(starts + lengths, lengths) - np.arange(n))  # -1 per step to the episode's end
    obs = np.stack([rng.integers(0, c, size=n) for c in mdp.obs_cardinalities], 1).astype(np.float32)
    labeled = LabeledTrajectories(
        obs,
        np.where(rtg <= -4, 1, 4).astype(np.float32)[:, None],
        np.full(n, -1.0, np.float32),
        np.zeros(n, np.float32),
        starts,
        np.ones(len(lengths), bool),
        {
            "obs_cardinalities": list(mdp.obs_cardinalities),
            "num_actions": mdp.num_actions,
            "max_episode_steps": mdp.max_episode_steps,
        },
    )
    cfg = {
        "n_layer": 1,
        "n_head": 1,
        "n_embd": 16,
        "context_len": 3,
        "batch_size": 32,
        "steps": 150,
        "return_scale": 10.0,
    }
    cfg |= {
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "eval_every": 0,
        "eval_windows": 8,
        "checkpoint_every": 0,
    }
    out = tmp_path_factory.mktemp("dt") / "dt.pt"
    train_dt(cfg, labeled=labeled, seed=0, out_path=out, progress=False)
    return out


def test_every_target_runs_on_the_same_episodes_and_the_best_is_reported(taxi_dt, tmp_path):
    out = tmp_path / "seed0.json"
    # 0 asks for pick-ups (-10 each), -500 and -600 for moves (-1 each)
    targets = [0.0, -500.0, -600.0]
    cfg = compose(
        [
            "task=taxi-stochastic",
            "planner=dt",
            f"planner.target_return=[{','.join(str(t) for t in targets)}]",
            "planner.sample=false",  # argmax: equal actions for -500 and -600
            "eval.episodes=10",
            "eval.batch_episodes=4",
            "eval.max_episode_steps=15",
            "device=cpu",
            "progress=false",
            f"paths.dt={taxi_dt}",
            f"paths.eval={out}",
        ]
    )
    assert evaluate.run(cfg) == out
    record = json.loads(out.read_text())
    entries = record["targets"]
    assert [e["target_return"] for e in entries] == targets
    means = [e["return_mean"] for e in entries]
    # -500 and -600 act alike on the same environment seeds, so they tie exactly; the first wins.
    assert means[1] == means[2] > means[0]
    best = 1
    assert record["target_return"] == targets[best] and record["return_mean"] == max(means)
    assert record["episodes"] == entries[best]["episodes"]
    assert record["return_sem"] == pytest.approx(
        np.std(entries[best]["episodes"]["returns"], ddof=1) / np.sqrt(10)
    )
    assert "optimistic" in record["target_selection"]
    for entry in entries:
        assert len(entry["episodes"]["returns"]) == 10 and entry["env_steps"] == sum(
            entry["episodes"]["steps"]
        )
    # The summary shows the chosen target.
    (row,) = summarize([record])
    assert row["dt_target"] == f"{targets[best]:g}" and row["return_mean"] == record["return_mean"]


def test_a_single_target_gives_one_entry(taxi_dt, tmp_path):
    out = tmp_path / "one.json"
    cfg = compose(
        [
            "task=taxi-stochastic",
            "planner=dt",
            "planner.target_return=-300",
            "eval.episodes=3",
            "eval.batch_episodes=3",
            "eval.max_episode_steps=5",
            "device=cpu",
            "progress=false",
            f"paths.dt={taxi_dt}",
            f"paths.eval={out}",
        ]
    )
    evaluate.run(cfg)
    record = json.loads(out.read_text())
    assert record["target_return"] == -300.0 and [e["target_return"] for e in record["targets"]] == [-300.0]
    assert record["episodes"] == record["targets"][0]["episodes"]
