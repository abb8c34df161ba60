"""Decision Transformer: causality, returns-to-go, training and resume, checkpoints, the batched policy."""

import json
import math

import numpy as np
import pytest
import torch

from trifle.data.labels import LabeledTrajectories
from trifle.data.windows import split_episodes
from trifle.envs import VectorTabularEnv, make_mdp
from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models import dt_training, training_loop
from trifle.models.dt import DecisionTransformer, DTConfig
from trifle.models.dt_training import (
    DTWindows,
    episode_timesteps,
    load_dt,
    resolve_config,
    returns_to_go,
    train_dt,
)
from trifle.planning.dt_policy import DTPolicy
from trifle.stages import train_dt as train_dt_stage

CARDS, NUM_ACTIONS = [3, 4], 3
TINY_CFG = {
    "n_layer": 1,
    "n_head": 1,
    "n_embd": 16,
    "dropout": 0.1,
    "context_len": 3,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "weight_decay": 0.0,
    "steps": 6,
    "warmup_steps": 2,
    "min_lr_fraction": 0.1,
    "return_scale": None,
    "valid_fraction": 0.2,
    "eval_every": 2,
    "eval_windows": 64,
    "checkpoint_every": 2,
}


def discrete_dataset(num_episodes: int = 12, seed: int = 0) -> LabeledTrajectories:
    """Episodes whose action is a fixed function of the state, so a DT can learn it exactly."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, size=num_episodes)
    n = int(lengths.sum())
    obs = np.stack([rng.integers(0, c, size=n) for c in CARDS], axis=1).astype(np.float32)
    actions = ((obs[:, 0] + obs[:, 1]) % NUM_ACTIONS).astype(np.float32)[:, None]
    rewards = rng.choice([-1.0, 0.0, 2.0], size=n).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    attrs = {"obs_cardinalities": CARDS, "num_actions": NUM_ACTIONS, "max_episode_steps": 10}
    return LabeledTrajectories(
        obs, actions, rewards, np.zeros(n, np.float32), starts, np.ones(num_episodes, bool), attrs
    )


def continuous_dataset(num_episodes: int = 6, seed: int = 0) -> LabeledTrajectories:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 8, size=num_episodes)
    n = int(lengths.sum())
    obs = rng.normal(size=(n, 3)).astype(np.float32) * 5 + 2
    actions = np.tanh(obs[:, :2] / 5).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rewards = rng.normal(size=n).astype(np.float32)
    return LabeledTrajectories(
        obs, actions, rewards, np.zeros(n, np.float32), starts, np.zeros(num_episodes, bool), {}
    )


def tiny_model(discrete: bool = True, seed: int = 0, **overrides) -> DecisionTransformer:
    kind = {"obs_cardinalities": CARDS, "num_actions": NUM_ACTIONS} if discrete else {}
    base = dict(obs_dim=2 if discrete else 3, act_dim=1 if discrete else 2, context_len=4, max_timestep=10)
    cfg = DTConfig(**{**base, **kind, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0, **overrides})
    torch.manual_seed(seed)
    return DecisionTransformer(cfg).eval()


def random_inputs(model: DecisionTransformer, batch: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    if cfg.discrete:
        obs = torch.stack([torch.randint(0, c, (batch, steps), generator=g) for c in CARDS], -1).float()
        act = torch.randint(0, NUM_ACTIONS, (batch, steps, 1), generator=g).float()
    else:
        obs = torch.randn(batch, steps, cfg.obs_dim, generator=g)
        act = torch.rand(batch, steps, cfg.act_dim, generator=g) * 2 - 1
    rtg = torch.randn(batch, steps, generator=g)
    ts = torch.arange(steps).expand(batch, steps) + torch.randint(0, 4, (batch, 1), generator=g)
    return rtg, obs, act, ts


# ------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("discrete", [True, False])
def test_shapes_and_causality(discrete):
    model = tiny_model(discrete)
    rtg, obs, act, ts = random_inputs(model, 2, 4)
    pred = model(rtg, obs, act, ts)
    assert pred.shape == ((2, 4, NUM_ACTIONS) if discrete else (2, 4, 2))
    if not discrete:
        assert pred.abs().max() < 1.0
    # Change the action of step 1 (which comes after s_1) and everything of steps 2 and 3.
    rtg2, obs2, act2, _ = random_inputs(model, 2, 4, seed=1)
    act_b, obs_b, rtg_b = act.clone(), obs.clone(), rtg.clone()
    act_b[:, 1:] = act2[:, 1:] if discrete else act2[:, 1:] * 0.5
    obs_b[:, 2:], rtg_b[:, 2:] = obs2[:, 2:] + (0 if discrete else 1), rtg2[:, 2:] + 1
    pred_b = model(rtg_b, obs_b, act_b, ts)
    torch.testing.assert_close(pred_b[:, :2], pred[:, :2], atol=1e-6, rtol=0)
    assert (pred_b[:, 2:] - pred[:, 2:]).abs().max() > 1e-5
    # The return-to-go of a step is seen by that step's prediction.
    rtg_c = rtg.clone()
    rtg_c[:, 1] += 3.0
    pred_c = model(rtg_c, obs, act, ts)
    torch.testing.assert_close(pred_c[:, 0], pred[:, 0], atol=1e-6, rtol=0)
    assert (pred_c[:, 1] - pred[:, 1]).abs().max() > 1e-5


def test_model_rejects_long_context_and_bad_config():
    model = tiny_model()
    with pytest.raises(ValueError, match="context length"):
        model(*random_inputs(model, 1, 5))
    with pytest.raises(ConfigError, match="num_actions"):
        DTConfig(obs_dim=2, act_dim=1, context_len=3, max_timestep=5, obs_cardinalities=[2, 2])
    with pytest.raises(ConfigError, match="obs_cardinalities"):
        DTConfig(obs_dim=3, act_dim=1, context_len=3, max_timestep=5, obs_cardinalities=[2, 2], num_actions=2)
    with pytest.raises(ConfigError, match=r"dt\.n_embd"):
        DTConfig(obs_dim=3, act_dim=1, context_len=3, max_timestep=5, n_embd=10, n_head=3)


# -------------------------------------------------------------------------------------- data


def test_returns_to_go_and_timesteps_by_hand():
    rewards = np.array([1.0, -2.0, 4.0, 10.0, 0.5], np.float32)
    starts = np.array([0, 3])
    np.testing.assert_array_equal(returns_to_go(rewards, starts), [3.0, 2.0, 4.0, 10.5, 0.5])
    np.testing.assert_array_equal(episode_timesteps(starts, 5), [0, 1, 2, 0, 1])


def test_windows_pad_the_episode_tail_and_scale_returns():
    data = discrete_dataset()
    rtg = returns_to_go(data.rewards, data.episode_starts) / 7.0
    windows = DTWindows(data, rtg, context_len=4, episode_ids=np.array([1]))
    first, end = int(data.episode_starts[1]), int(data.episode_starts[2])
    assert len(windows) == end - first
    r, obs, act, ts, mask = windows.get(np.array([0, len(windows) - 1]))
    np.testing.assert_allclose(r[0].numpy(), rtg[first : first + 4], rtol=1e-6)
    np.testing.assert_array_equal(obs[0].numpy(), data.observations[first : first + 4])
    np.testing.assert_array_equal(ts[0].numpy(), [0, 1, 2, 3])
    np.testing.assert_array_equal(mask.numpy(), [[1, 1, 1, 1], [1, 0, 0, 0]])  # last row: one real step
    assert act[1, 0, 0] == data.actions[end - 1, 0]


def test_return_scale_default_is_largest_episode_return():
    data = discrete_dataset()
    returns = np.add.reduceat(data.rewards.astype(np.float64), data.episode_starts)
    assert dt_training.default_return_scale(data.rewards, data.episode_starts) == np.abs(returns).max()
    assert dt_training.default_return_scale(np.zeros(4), np.array([0, 2])) == 1.0


# ---------------------------------------------------------------------------------- training


def run(tmp_path, name, cfg=None, data=None, **kwargs):
    out = tmp_path / name
    metrics = train_dt(
        cfg or TINY_CFG, labeled=data or discrete_dataset(), seed=kwargs.pop("seed", 0), out_path=out,
        progress=False, **kwargs,
    )  # fmt: skip
    return out, metrics


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_training_is_deterministic_and_uses_the_gpt_split(tmp_path):
    out_a, metrics = run(tmp_path, "a.pt")
    out_b, _ = run(tmp_path, "b.pt")
    assert_same_weights(out_a, out_b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no partial or temp files left
    data = discrete_dataset()
    train_ids, valid_ids = split_episodes(data.episode_starts, len(data.rewards), 0.2, 0)
    model, ckpt = load_dt(out_a, expect={"obs_cardinalities": tuple(CARDS), "num_actions": NUM_ACTIONS})
    assert ckpt["data"]["train_episodes"] == train_ids.tolist()
    assert ckpt["data"]["heldout_episodes"] == valid_ids.tolist()
    assert model.cfg.max_timestep == 10 and not model.training
    for key in ("train_loss", "heldout_loss", "heldout_accuracy", "steps", "seconds", "num_params"):
        assert key in metrics
    assert metrics["heldout_ll_per_token"] == pytest.approx(-metrics["heldout_loss"])
    assert len(metrics["history"]) == 3


def test_training_reduces_the_loss(tmp_path):
    cfg = {**TINY_CFG, "steps": 150, "dropout": 0.0, "n_embd": 32, "eval_every": 0, "checkpoint_every": 0}
    _, metrics = run(tmp_path, "fit.pt", cfg, data=discrete_dataset(40))
    # A fresh model predicts ~uniformly (cross-entropy log 3 = 1.10); the action is learnable from s_t.
    assert metrics["train_eval_loss"] < 0.35 * math.log(NUM_ACTIONS)
    assert metrics["heldout_accuracy"] > 0.85


def test_continuous_training_and_normalisation(tmp_path):
    data = continuous_dataset()
    out, metrics = run(tmp_path, "c.pt", {**TINY_CFG, "return_scale": 10.0}, data=data)
    assert metrics["heldout_accuracy"] is None and metrics["heldout_ll_per_token"] is None
    assert metrics["heldout_loss"] < 1.0 and metrics["return_scale"] == 10.0
    model, _ = load_dt(out)
    assert not model.cfg.discrete
    assert model.obs_mean.abs().max() > 0.5  # standardised with the training episodes' statistics
    bad = continuous_dataset()
    bad.actions[0, 0] = 3.0
    with pytest.raises(DataError, match="actions"):
        run(tmp_path, "bad.pt", data=bad)


def test_out_of_range_discrete_data_is_rejected(tmp_path):
    data = discrete_dataset()
    data.observations[5, 1] = 4  # cardinality 4: values 0..3
    with pytest.raises(DataError, match="observations"):
        run(tmp_path, "bad.pt", data=data)


def test_resume_after_stop_is_bit_identical(tmp_path):
    out_full, full = run(tmp_path, "full.pt")
    out, first = run(tmp_path, "resumed.pt", stop_after=3)
    assert first["completed"] is False and first["steps"] == 3
    assert (tmp_path / "resumed.pt.partial.pt").exists() and not out.exists()
    _, resumed = run(tmp_path, "resumed.pt", {**TINY_CFG, "target_return": -5})
    assert_same_weights(out_full, out)
    assert resumed["history"] == full["history"] and resumed["train_loss"] == full["train_loss"]
    assert not (tmp_path / "resumed.pt.partial.pt").exists()


def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch):
    out_full, _ = run(tmp_path, "full.pt")
    real = training_loop.learning_rate

    def crash_at_step_3(cfg, step, total):
        if step == 3:
            raise KeyboardInterrupt
        return real(cfg, step, total)

    monkeypatch.setattr(training_loop, "learning_rate", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed.pt")
    monkeypatch.setattr(training_loop, "learning_rate", real)
    assert torch.load(tmp_path / "crashed.pt.partial.pt", weights_only=True)["step"] == 2
    out, _ = run(tmp_path, "crashed.pt", {**TINY_CFG, "checkpoint_every": 5})
    assert_same_weights(out_full, out)


def test_incompatible_checkpoints_are_refused(tmp_path):
    run(tmp_path, "d.pt", stop_after=1)
    with pytest.raises(CheckpointError, match=r"d\.pt\.partial\.pt.*cfg\.learning_rate"):
        run(tmp_path, "d.pt", {**TINY_CFG, "learning_rate": 1e-3})
    with pytest.raises(CheckpointError, match="seed"):
        run(tmp_path, "d.pt", seed=5)
    changed = discrete_dataset()
    changed.rewards[0] += 1.0  # same shapes, different content
    with pytest.raises(CheckpointError, match=r"data\.sha256"):
        run(tmp_path, "d.pt", data=changed)
    (tmp_path / "d.pt.partial.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        run(tmp_path, "d.pt")

    with pytest.raises(CheckpointError, match="missing.pt"):
        load_dt(tmp_path / "missing.pt")
    out, _ = run(tmp_path, "ok.pt", {**TINY_CFG, "steps": 1})
    with pytest.raises(CheckpointError, match=r"ok\.pt: num_actions expected 6, found 3"):
        load_dt(out, expect={"num_actions": 6})
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_dt(out, expect={"vocab_size": 6})
    gpt_like = tmp_path / "gpt.pt"
    torch.save({"format": "trifle-gpt/1"}, gpt_like)
    with pytest.raises(CheckpointError, match="trifle-dt/1"):
        load_dt(gpt_like)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"n_embd": 10, "n_head": 3}, "dt.n_embd"),
        ({"context_len": 0}, "dt.context_len"),
        ({"dropout": 1.5}, "dt.dropout"),
        ({"betas": [0.9]}, "dt.betas"),
        ({"return_scale": 0}, "dt.return_scale"),
        ({"target_return": "high"}, "dt.target_return"),
        ({"steps": None}, "dt.steps"),
        ({"bogus": 1}, "dt.bogus"),
    ],
)
def test_bad_config_raises_config_error_naming_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config({**TINY_CFG, **override})


def test_shipped_configs_resolve():
    import yaml

    from trifle.config import CONF_DIR

    for name in ("small", "paper"):
        cfg = resolve_config(yaml.safe_load((CONF_DIR / "dt" / f"{name}.yaml").read_text()))
        assert cfg["context_len"] == 7  # paper Appx E.2: K = 7 for DT on Taxi


def test_stage_writes_checkpoint_and_metrics(tmp_path, monkeypatch):
    data = discrete_dataset()
    monkeypatch.setattr(train_dt_stage, "load_labeled", lambda path: data)
    cfg = {
        "dt": TINY_CFG,
        "seed": 1,
        "device": "cpu",
        "progress": False,
        "task": {"name": "toy"},
        "paths": {
            "labeled": "unused.npz",
            "dt": str(tmp_path / "dt.pt"),
            "dt_metrics": str(tmp_path / "m.json"),
        },
    }
    assert train_dt_stage.run(cfg) == tmp_path / "dt.pt"
    record = json.loads((tmp_path / "m.json").read_text())
    assert (record["task"], record["model"], record["seed"]) == ("toy", "dt", 1)
    assert record["heldout_ll_per_token"] == pytest.approx(-record["details"]["heldout_loss"])
    assert record["train_seconds"] > 0 and record["train_ll_per_token"] < 0


# ------------------------------------------------------------------------------------ policy


def sharp_discrete_model(seed: int = 0) -> DecisionTransformer:
    """A random discrete model with large logit gaps, so argmax never hinges on float round-off."""
    model = tiny_model(True, seed, context_len=3)
    with torch.no_grad():
        model.predict_action.weight.mul_(200.0)
    return model


def test_policy_context_matches_a_manual_forward_pass():
    model = tiny_model(False, context_len=3)
    policy = DTPolicy(model, {"return_scale": 4.0}, target_return=10.0)
    policy.reset(1, seed=0)
    rng = np.random.default_rng(0)
    obs_hist, act_hist, rtg_hist = [], [], []
    rtg = 10.0
    for t in range(5):  # longer than the context: the oldest steps must drop out
        obs = rng.normal(size=(1, 3)).astype(np.float32)
        action = policy.act(np.array([0]), obs)
        obs_hist.append(obs[0])
        rtg_hist.append(rtg)
        k = slice(max(0, t - 2), t + 1)
        steps = len(obs_hist[k])
        with torch.no_grad():
            expected = model(
                torch.tensor([rtg_hist[k]], dtype=torch.float32) / 4.0,
                torch.tensor(np.array([obs_hist[k]])),
                torch.tensor(np.array([[*act_hist[k], np.zeros(2, np.float32)][-steps:]])),
                torch.arange(t + 1)[k][None],
            )[0, -1]
        np.testing.assert_allclose(action[0], expected.numpy(), rtol=0, atol=1e-6)
        reward = float(rng.normal())
        policy.record(np.array([0]), action, np.array([reward]))
        act_hist.append(action[0])
        rtg -= reward
        assert policy.return_to_go(np.array([0]))[0] == rtg  # the same float64 subtractions, in order


def test_record_lowers_return_to_go_exactly():
    policy = DTPolicy(tiny_model(), {"return_scale": 100.0}, target_return=-300.0)
    policy.reset(3, seed=0)
    ids = np.array([0, 2])
    policy.act(ids, np.array([[0, 1], [2, 3]], np.float32))
    policy.record(ids, np.array([[1.0], [2.0]]), np.array([-4.0, 20.0]))
    np.testing.assert_array_equal(policy.return_to_go(np.arange(3)), [-296.0, -300.0, -320.0])
    with pytest.raises(RuntimeError, match="did not act"):
        policy.record(np.array([1]), np.array([[0.0]]), np.array([0.0]))
    policy.act(np.array([1]), np.array([[0, 0]], np.float32))
    with pytest.raises(RuntimeError, match="await record"):
        policy.act(np.array([1]), np.array([[0, 0]], np.float32))
    with pytest.raises(ValueError, match="obs"):
        policy.act(np.array([0]), np.array([[3, 0]], np.float32))  # dimension 0 has cardinality 3


@pytest.mark.parametrize("kind", ["continuous", "greedy", "sample"])
def test_batched_act_equals_per_env_act(kind):
    """Environments with different history lengths, acting together or one at a time, agree."""
    model = tiny_model(False, context_len=3) if kind == "continuous" else sharp_discrete_model()
    batched, single = (
        DTPolicy(model, {"return_scale": 5.0}, target_return=3.0, sample=kind == "sample") for _ in range(2)
    )
    batched.reset(3, seed=7)
    single.reset(3, seed=7)
    rng = np.random.default_rng(1)
    schedule = [[0], [0, 1], [0, 1, 2], [0, 1, 2], [1, 2], [0, 1, 2], [0, 2]]
    for ids in map(np.array, schedule):
        if kind == "continuous":
            obs = rng.normal(size=(len(ids), 3)).astype(np.float32)
        else:
            obs = np.stack([rng.integers(0, c, len(ids)) for c in CARDS], 1).astype(np.float32)
        rewards = rng.normal(size=len(ids))
        together = batched.act(ids, obs)
        apart = np.concatenate([single.act(ids[i : i + 1], obs[i : i + 1]) for i in range(len(ids))])
        if kind == "continuous":
            np.testing.assert_allclose(together, apart, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(together, apart)
        batched.record(ids, together, rewards)
        for i in range(len(ids)):
            single.record(ids[i : i + 1], together[i : i + 1], rewards[i : i + 1])


def test_sampling_is_seeded():
    model = tiny_model(context_len=3)  # near-uniform logits: sampling varies a lot

    def rollout(seed):
        policy = DTPolicy(model, {"return_scale": 1.0}, target_return=0.0, sample=True)
        policy.reset(16, seed)
        ids, out = np.arange(16), []
        obs = np.zeros((16, 2), np.float32)
        for _ in range(4):
            a = policy.act(ids, obs)
            policy.record(ids, a, np.zeros(16))
            out.append(a)
        return np.concatenate(out)

    first = rollout(3)
    np.testing.assert_array_equal(first, rollout(3))
    assert not np.array_equal(first, rollout(4))
    assert set(np.unique(first)) <= {0.0, 1.0, 2.0} and len(np.unique(first)) == 3


def test_smoke_rollout_on_stochastic_taxi(tmp_path):
    mdp = make_mdp("taxi-stochastic")
    cfg = DTConfig(
        obs_dim=4, act_dim=1, context_len=7, max_timestep=300, obs_cardinalities=list(mdp.obs_cardinalities),
        num_actions=mdp.num_actions, n_layer=1, n_head=1, n_embd=16,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = DTPolicy(DecisionTransformer(cfg), {"return_scale": 884.0}, target_return=-300.0, sample=True)
    env = VectorTabularEnv(mdp, num_envs=4, seed=0)
    obs = env.reset()
    policy.reset(4, seed=0)
    total = np.zeros(4)
    for _ in range(12):
        ids = np.flatnonzero(~env.done)
        actions = policy.act(ids, obs[ids])
        assert actions.shape == (len(ids), 1) and np.all(actions == np.round(actions))
        full = np.zeros(4, np.int64)
        full[ids] = actions[:, 0].astype(np.int64)
        obs, reward, *_ = env.step(full)
        policy.record(ids, actions, reward[ids])
        total += reward
    np.testing.assert_array_equal(policy.return_to_go(np.arange(4)), -300.0 - total)


def test_policy_from_checkpoint_needs_a_target(tmp_path):
    out, _ = run(tmp_path, "p.pt", {**TINY_CFG, "steps": 1})
    with pytest.raises(ConfigError, match=r"dt\.target_return"):
        DTPolicy.from_checkpoint(out)
    policy = DTPolicy.from_checkpoint(out, target_return=-2.0)
    assert policy.return_scale == torch.load(out, weights_only=True)["return_scale"]
    out_t, _ = run(tmp_path, "t.pt", {**TINY_CFG, "steps": 1, "target_return": 4})
    policy = DTPolicy.from_checkpoint(out_t)
    policy.reset(2, seed=0)
    np.testing.assert_array_equal(policy.return_to_go(np.arange(2)), [4.0, 4.0])
