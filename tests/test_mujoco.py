"""Gym-MuJoCo tasks: D4RL scores, the vector env's conventions and the D4RL-layout dataset generator."""

import sys
from pathlib import Path

import mujoco
import numpy as np
import pytest

from trifle.data.d4rl_format import load_dataset, save_dataset
from trifle.data.mujoco_datasets import generate_mujoco_dataset
from trifle.envs.mujoco import (
    ACTION_NAMES,
    MUJOCO_ENVS,
    REF_SCORES,
    VectorMujocoEnv,
    make_mujoco_env,
    normalized_score,
)
from trifle.errors import CheckpointError, ConfigError, TrifleError

DIMS = {"hopper": (11, 3), "halfcheetah": (17, 6), "walker2d": (17, 6)}
DIMS |= {f"{env}-v5": dims for env, dims in DIMS.items()}  # the v5 envs Minari's datasets use


def assert_round_trip(path, arrays, attrs) -> None:
    """A generated dataset saves and loads back unchanged in the project's D4RL layout."""
    save_dataset(path, arrays, attrs)
    data = load_dataset(path)
    assert data.attrs == attrs
    for key, value in arrays.items():
        np.testing.assert_array_equal(data.arrays()[key], value)


def random_actions(rng: np.random.Generator, n: int, act_dim: int, scale: float = 1.0) -> np.ndarray:
    return scale * rng.uniform(-1.0, 1.0, size=(n, act_dim))


@pytest.mark.parametrize("env", sorted(REF_SCORES))
def test_normalized_score_reference_points(env):
    low, high = REF_SCORES[env]
    assert normalized_score(env, low) == pytest.approx(0.0)
    assert normalized_score(env, high) == pytest.approx(100.0)
    scores = normalized_score(env, [low, (low + high) / 2, high])
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [0.0, 50.0, 100.0], atol=1e-9)


def test_unknown_env_names_valid_envs():
    with pytest.raises(ConfigError, match="halfcheetah"):
        normalized_score("ant", 1.0)
    with pytest.raises(ConfigError, match="hopper"):
        make_mujoco_env("ant")
    with pytest.raises(ConfigError, match="walker2d"):
        VectorMujocoEnv("ant", 1, seed=0)


def test_building_halfcheetah_is_quiet(tmp_path, monkeypatch, capfd):
    """The known 'settotalmass' compiler warning neither prints nor writes MUJOCO_LOG.TXT into the cwd."""
    monkeypatch.chdir(tmp_path)
    previous = mujoco.get_mju_user_warning()
    make_mujoco_env("halfcheetah").close()
    assert "settotalmass" not in "".join(capfd.readouterr())
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert mujoco.get_mju_user_warning() is previous


@pytest.mark.parametrize("env", sorted(MUJOCO_ENVS))
def test_action_names_match_model_actuators(env):
    """Each action drives the joint we name; where the actuator has a name of its own, it is that name."""
    model = make_mujoco_env(env).unwrapped.model
    driven = []
    for i in range(model.nu):
        joint = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, int(model.actuator_trnid[i, 0]))
        assert model.actuator(i).name in ("", joint)
        driven.append(joint)
    assert tuple(driven) == ACTION_NAMES[env]


@pytest.mark.parametrize("env", sorted(MUJOCO_ENVS))
def test_vector_env_shapes(env):
    vec = VectorMujocoEnv(env, 2, seed=0)
    obs_dim, act_dim = DIMS[env]
    assert (vec.obs_dim, vec.act_dim) == (obs_dim, act_dim)
    np.testing.assert_array_equal(vec.action_low, -np.ones(act_dim))
    np.testing.assert_array_equal(vec.action_high, np.ones(act_dim))
    obs = vec.reset()
    assert obs.shape == (2, obs_dim) and obs.dtype == np.float64
    obs, reward, term, trunc, info = vec.step(np.zeros((2, act_dim)))
    assert obs.shape == (2, obs_dim) and reward.shape == (2,) and reward.dtype == np.float64
    assert term.shape == trunc.shape == info["stepped"].shape == (2,)
    assert info["stepped"].all()


def rollout(vec: VectorMujocoEnv, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs, rewards = [vec.reset()], []
    for _ in range(steps):
        o, r, *_ = vec.step(random_actions(rng, vec.num_envs, vec.act_dim))
        obs.append(o)
        rewards.append(r)
    return np.stack(obs), np.stack(rewards)


def test_vector_env_seeding():
    obs_a, rew_a = rollout(VectorMujocoEnv("walker2d", 2, seed=3), 10)
    obs_b, rew_b = rollout(VectorMujocoEnv("walker2d", 2, seed=3), 10)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    obs_c, _ = rollout(VectorMujocoEnv("walker2d", 2, seed=4), 10)
    assert not np.array_equal(obs_a[0], obs_c[0])
    assert not np.array_equal(obs_a[0, 0], obs_a[0, 1]), "envs of one batch must start differently"


def test_vector_env_reset_independent_of_batch():
    """An env's episodes depend on (seed, env id, reset count) only, not on which other envs exist or reset."""
    big, small = VectorMujocoEnv("hopper", 3, seed=7), VectorMujocoEnv("hopper", 1, seed=7)
    first = big.reset()
    np.testing.assert_array_equal(first[0], small.reset()[0])
    second = big.reset(env_ids=[1])
    np.testing.assert_array_equal(second[[0, 2]], first[[0, 2]])
    assert not np.array_equal(second[1], first[1])
    np.testing.assert_array_equal(big.reset(env_ids=[0])[0], small.reset()[0])


def test_vector_env_terminated_env_stays_frozen():
    vec = VectorMujocoEnv("hopper", 2, seed=0)
    vec.reset()
    push = np.array([[1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    for _ in range(200):
        obs, _, term, trunc, _ = vec.step(push)
        assert not trunc.any()
        if term[0]:
            break
    assert term[0], "full-torque Hopper should fall within 200 steps"
    steps = vec.steps[0]
    for _ in range(3):
        obs2, reward, term2, trunc2, info = vec.step(push)
        assert not info["stepped"][0] and reward[0] == 0.0 and not term2[0] and not trunc2[0]
        np.testing.assert_array_equal(obs2[0], obs[0])
    assert vec.steps[0] == steps
    vec.reset(env_ids=[0])
    assert vec.step(push)[4]["stepped"][0]


def test_vector_env_truncates_exactly_at_limit():
    vec = VectorMujocoEnv("halfcheetah", 2, seed=0, max_episode_steps=5)
    vec.reset()
    for t in range(1, 6):
        _, _, term, trunc, info = vec.step(np.zeros((2, 6)))
        assert info["stepped"].all() and not term.any()
        assert trunc.all() == (t == 5) and trunc.any() == (t == 5)
    _, reward, term, trunc, info = vec.step(np.zeros((2, 6)))
    assert not info["stepped"].any() and not reward.any() and not term.any() and not trunc.any()


def test_vector_env_clips_actions():
    rng = np.random.default_rng(0)
    wild, tame = VectorMujocoEnv("hopper", 2, seed=1), VectorMujocoEnv("hopper", 2, seed=1)
    wild.reset()
    tame.reset()
    for _ in range(5):
        actions = random_actions(rng, 2, 3, scale=4.0)
        out_wild, out_tame = wild.step(actions), tame.step(np.clip(actions, -1.0, 1.0))
        for a, b in zip(out_wild[:4], out_tame[:4], strict=True):
            np.testing.assert_array_equal(a, b)


def test_vector_env_rejects_bad_actions():
    vec = VectorMujocoEnv("hopper", 2, seed=0)
    vec.reset()
    bad = np.zeros((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(TrifleError, match="NaN"):
        vec.step(bad)
    with pytest.raises(TrifleError, match="shape"):
        vec.step(np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="num_envs"):
        VectorMujocoEnv("hopper", 0, seed=0)


@pytest.fixture(scope="module")
def hopper_data():
    return generate_mujoco_dataset(env="hopper", num_steps=300, seed=0, max_episode_steps=30, progress=False)


def episode_bounds(arrays: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """(start, end) of each episode, the unflagged tail included (end exclusive)."""
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"]) + 1
    n = arrays["rewards"].size
    cuts = [0, *ends.tolist()] + ([n] if not ends.size or ends[-1] != n else [])
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def test_dataset_layout_and_round_trip(hopper_data, tmp_path):
    arrays, attrs = hopper_data
    assert attrs["gym_id"] == "Hopper-v4" and attrs["generator"] == "mujoco" and attrs["num_steps"] == 300
    assert arrays["observations"].shape == arrays["next_observations"].shape == (300, 11)
    assert arrays["actions"].shape == (300, 3) and arrays["infos/qpos"].shape == (300, 6)
    assert np.abs(arrays["actions"]).max() <= 1.0
    np.testing.assert_allclose(arrays["infos/action_log_probs"], -3 * np.log(2.0))
    assert_round_trip(tmp_path / "hopper.hdf5", arrays, attrs)


def test_dataset_episode_flags(hopper_data):
    arrays, attrs = hopper_data
    assert not np.any(arrays["terminals"] & arrays["timeouts"])
    bounds = episode_bounds(arrays)
    for start, end in bounds:
        flagged = arrays["terminals"][end - 1] or arrays["timeouts"][end - 1]
        assert arrays["timeouts"][end - 1] == (end - start == 30 and not arrays["terminals"][end - 1])
        assert end - start <= 30
        assert flagged or end == 300, "only the tail may be unflagged"
        np.testing.assert_array_equal(
            arrays["next_observations"][start : end - 1], arrays["observations"][start + 1 : end]
        )
    complete = [(s, e) for s, e in bounds if arrays["terminals"][e - 1] or arrays["timeouts"][e - 1]]
    assert attrs["num_episodes"] == len(complete)
    returns = [arrays["rewards"][s:e].astype(np.float64).sum() for s, e in complete]
    assert attrs["mean_return"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert attrs["mean_normalized_score"] == pytest.approx(
        float(normalized_score("hopper", attrs["mean_return"]))
    )


def test_dataset_states_reproduce_observations(hopper_data):
    """D4RL's check: restoring the stored pre-step state gives the stored observation."""
    arrays, _ = hopper_data
    env = make_mujoco_env("hopper").unwrapped
    for i in np.random.default_rng(0).choice(300, size=20, replace=False):
        env.set_state(arrays["infos/qpos"][i], arrays["infos/qvel"][i])
        np.testing.assert_allclose(env._get_obs(), arrays["observations"][i], rtol=1e-6, atol=1e-6)


def test_dataset_timeouts_at_step_limit():
    """HalfCheetah never terminates: every episode is cut at the limit and the tail stays unflagged."""
    arrays, attrs = generate_mujoco_dataset(
        env="halfcheetah", num_steps=50, max_episode_steps=20, progress=False
    )
    assert np.flatnonzero(arrays["timeouts"]).tolist() == [19, 39] and not arrays["terminals"].any()
    assert attrs["num_episodes"] == 2 and attrs["gym_id"] == "HalfCheetah-v4"


def test_dataset_too_short_for_an_episode_still_has_an_end(tmp_path):
    arrays, attrs = generate_mujoco_dataset(env="halfcheetah", num_steps=3, progress=False)
    assert arrays["timeouts"].tolist() == [False, False, True]
    assert attrs["num_episodes"] == 0 and attrs["mean_return"] is None
    save_dataset(tmp_path / "tiny.hdf5", arrays, attrs)


def test_dataset_deterministic(hopper_data):
    arrays, attrs = hopper_data
    again, attrs_again = generate_mujoco_dataset(
        env="hopper", num_steps=300, seed=0, max_episode_steps=30, progress=False
    )
    assert attrs_again == attrs
    for key, value in arrays.items():
        assert again[key].dtype == value.dtype
        np.testing.assert_array_equal(again[key], value)
    other, _ = generate_mujoco_dataset(
        env="hopper", num_steps=300, seed=1, max_episode_steps=30, progress=False
    )
    assert not np.array_equal(other["observations"], arrays["observations"])


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"policy": "expert"}, "policy"),
        ({"num_steps": 0}, "num_steps"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"env": "ant"}, "hopper"),
    ],
)
def test_dataset_rejects_bad_options(options, name):
    with pytest.raises(ConfigError, match=name):
        generate_mujoco_dataset(**{"env": "hopper", "num_steps": 10, "progress": False, **options})


# --- SAC behaviour policy (stable-baselines3, optional) -------------------------------------------------

SAC_STEPS = 200  # tiny budgets: learning_starts = steps // 10, so a few hundred updates (seconds on 1 thread)


class Interrupted(Exception):
    """Stands in for a killed training job."""


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory):
    """One finished tiny SAC training, and two 'sac' datasets rolled out from its work directory."""
    pytest.importorskip("stable_baselines3")
    from trifle.data.behaviour import train_sac

    work_dir = tmp_path_factory.mktemp("sac")
    model = train_sac("hopper", steps=SAC_STEPS, seed=0, work_dir=work_dir, progress=False)
    options = {"env": "hopper", "num_steps": 300, "seed": 0, "max_episode_steps": 40, "progress": False}
    first = generate_mujoco_dataset(**options, policy="sac", sac_steps=SAC_STEPS, work_dir=str(work_dir))
    second = generate_mujoco_dataset(**options, policy="sac", sac_steps=SAC_STEPS, work_dir=work_dir)
    return model, work_dir, first, second


def actor_params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.actor.state_dict().items()}


def test_sac_training_resumes_from_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import SAC

    from trifle.data import behaviour

    real_save = behaviour._save_checkpoint

    def save_then_die(model, work_dir, step):
        real_save(model, work_dir, step)
        if step == 200:
            raise Interrupted

    monkeypatch.setattr(behaviour, "_save_checkpoint", save_then_die)
    run = {"env": "hopper", "steps": 300, "seed": 3, "work_dir": tmp_path, "checkpoint_every": 100}
    with pytest.raises(Interrupted):
        behaviour.train_sac(**run, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {".lock", "sac_args.json", "sac_model_200.zip", "sac_replay_200.pkl"}, "older ones go"

    monkeypatch.setattr(behaviour, "_save_checkpoint", real_save)
    real_learn, calls = SAC.learn, []

    def counting_learn(self, total_timesteps, **kwargs):
        calls.append((self.num_timesteps, total_timesteps, self.replay_buffer.size()))
        return real_learn(self, total_timesteps, **kwargs)

    monkeypatch.setattr(SAC, "learn", counting_learn)
    model = behaviour.train_sac(**run, progress=False)
    assert calls == [(200, 100, 200)], "resumes at the checkpoint with its replay buffer"
    assert model.num_timesteps == 300
    final = {".lock", "sac_args.json", "sac_final.zip", "sac_final_replay.pkl"}
    assert {p.name for p in tmp_path.iterdir()} == final

    again = behaviour.train_sac(**run, progress=False)
    assert len(calls) == 1, "a finished training is only loaded"
    assert again.num_timesteps == 300
    for key, value in actor_params(model).items():
        np.testing.assert_array_equal(actor_params(again)[key], value)


@pytest.mark.parametrize(
    ("change", "key"), [({"seed": 1}, "seed"), ({"env": "walker2d"}, "env"), ({"steps": 9}, "steps")]
)
def test_sac_checkpoint_from_other_arguments_is_refused(sac_run, change, key):
    from trifle.data.behaviour import train_sac
    from trifle.errors import CheckpointError

    _, work_dir, _, _ = sac_run
    run = {"env": "hopper", "steps": SAC_STEPS, "seed": 0, "work_dir": work_dir, "progress": False, **change}
    with pytest.raises(CheckpointError, match=f"{work_dir}.*{key}="):
        train_sac(**run)


def test_sac_training_refuses_unlabelled_files(tmp_path):
    pytest.importorskip("stable_baselines3")
    from trifle.data.behaviour import train_sac
    from trifle.errors import CheckpointError

    (tmp_path / "sac_final.zip").write_bytes(b"")
    with pytest.raises(CheckpointError, match="sac_args.json"):
        train_sac("hopper", steps=10, seed=0, work_dir=tmp_path, progress=False)


def test_sac_training_deterministic(sac_run, tmp_path):
    """An uninterrupted training is a function of its seed (one thread, one machine)."""
    from trifle.data.behaviour import train_sac

    model = sac_run[0]
    again = train_sac("hopper", steps=SAC_STEPS, seed=0, work_dir=tmp_path, progress=False)
    for key, value in actor_params(model).items():
        np.testing.assert_array_equal(actor_params(again)[key], value)


def test_sac_training_in_checkpoint_pieces_equals_one_call(sac_run, tmp_path):
    """Training is cut at every checkpoint (to evaluate there); the cuts must not change a single update."""
    from trifle.data.behaviour import train_sac

    model = sac_run[0]
    pieces = train_sac(
        "hopper", steps=SAC_STEPS, seed=0, work_dir=tmp_path, checkpoint_every=30, progress=False
    )
    for key, value in actor_params(model).items():
        np.testing.assert_array_equal(actor_params(pieces)[key], value)


def test_sac_target_return_never_reached_trains_the_budget_undisturbed(sac_run, tmp_path):
    """Evaluating at each checkpoint uses its own simulator and generator: the agent is the same as without."""
    from trifle.data.behaviour import EVALS_FILE, train_sac, training_result

    with pytest.warns(UserWarning, match="sac_target_return=1000000000.0 within sac_steps=200"):
        model = train_sac(
            "hopper", steps=SAC_STEPS, seed=0, work_dir=tmp_path, checkpoint_every=100,
            target_return=1e9, eval_episodes=2, progress=False,
        )  # fmt: skip
    for key, value in actor_params(sac_run[0]).items():
        np.testing.assert_array_equal(actor_params(model)[key], value)
    rows = (tmp_path / EVALS_FILE).read_text().splitlines()
    assert rows[0] == "step,mean_return,std_return,normalized_score,episodes"
    assert [row.split(",")[0] for row in rows[1:]] == ["100", "200"]
    assert training_result(tmp_path) == {
        "steps": 200, "target_return": 1e9, "reached": False, "eval_return": float(rows[2].split(",")[1]),
    }  # fmt: skip


def test_sac_target_return_stops_at_the_first_checkpoint_that_reaches_it(tmp_path):
    """A target every policy meets stops training at the first evaluation, and the dataset records it."""
    pytest.importorskip("stable_baselines3")
    from trifle.data.behaviour import train_sac, training_result

    run = {"env": "hopper", "steps": 300, "seed": 0, "work_dir": tmp_path, "progress": False}
    model = train_sac(**run, checkpoint_every=100, target_return=-1e9, eval_episodes=2)
    assert model.num_timesteps == 100 and model.replay_buffer.size() == 100
    result = training_result(tmp_path)
    assert result["steps"] == 100 and result["reached"] is True
    assert {p.name for p in tmp_path.iterdir()} >= {"sac_final.zip", "sac_final_replay.pkl", "sac_evals.csv"}
    assert not any(p.name.startswith("sac_model_") for p in tmp_path.iterdir())
    arrays, attrs = generate_mujoco_dataset(
        env="hopper", num_steps=50, seed=0, policy="sac", sac_steps=300, sac_target_return=-1e9,
        sac_eval_every=100, sac_eval_episodes=2, work_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert attrs["sac_steps"] == 300 and attrs["sac_steps_trained"] == 100
    assert attrs["sac_target_reached"] is True and attrs["sac_eval_return"] == result["eval_return"]
    with pytest.raises(
        CheckpointError, match="made with .*target_return=-1000000000.0.*, not with .*target_return=None"
    ):
        train_sac(**run, checkpoint_every=100)


def test_sac_resumed_past_its_budget_keeps_every_transition(sac_run, tmp_path):
    """An agent's final state taken as a checkpoint of a longer training: its buffer grows, nothing is
    overwritten, and the longer training's replay starts with the shorter one's."""
    import shutil

    from trifle.data import behaviour

    _, short_dir, _, _ = sac_run
    run = {"env": "hopper", "steps": 2 * SAC_STEPS, "seed": 0, "work_dir": tmp_path, "progress": False}
    behaviour._claim_work_dir(tmp_path, {"algo": "sac", **{k: run[k] for k in ("env", "seed", "steps")}})
    shutil.copy(short_dir / "sac_final.zip", tmp_path / f"sac_model_{SAC_STEPS}.zip")
    shutil.copy(short_dir / "sac_final_replay.pkl", tmp_path / f"sac_replay_{SAC_STEPS}.pkl")
    model = behaviour.train_sac(**run)
    assert model.num_timesteps == 2 * SAC_STEPS and model.replay_buffer.size() == 2 * SAC_STEPS
    longer, shorter = behaviour.final_replay(tmp_path), behaviour.final_replay(short_dir)
    for key, value in shorter.items():
        np.testing.assert_array_equal(longer[key][:SAC_STEPS], value)


def test_sac_dataset_layout_and_round_trip(sac_run, tmp_path):
    _, _, (arrays, attrs), _ = sac_run
    assert attrs["policy"] == "sac" and attrs["sac_steps"] == SAC_STEPS and attrs["num_steps"] == 300
    assert attrs["num_episodes"] >= 1 and attrs["behaviour_return"] == attrs["mean_return"]
    assert arrays["observations"].shape == arrays["next_observations"].shape == (300, 11)
    assert arrays["actions"].shape == (300, 3) and arrays["actions"].dtype == np.float32
    assert np.abs(arrays["actions"]).max() <= 1.0
    log_probs = arrays["infos/action_log_probs"]
    assert log_probs.dtype == np.float64 and np.isfinite(log_probs).all()
    assert np.unique(log_probs).size > 1, "a Gaussian policy's log-densities vary"
    for start, end in episode_bounds(arrays):
        assert end - start <= 40
        np.testing.assert_array_equal(
            arrays["next_observations"][start : end - 1], arrays["observations"][start + 1 : end]
        )
    assert_round_trip(tmp_path / "hopper-sac.hdf5", arrays, attrs)


def test_sac_replay_dataset_is_the_agents_training_experience(sac_run, tmp_path):
    """policy sac-replay: the agent's replay buffer in collection order, episodes split as SB3 flagged them."""
    model, work_dir, _, _ = sac_run
    options = {"env": "hopper", "seed": 0, "max_episode_steps": 1000, "progress": False}
    arrays, attrs = generate_mujoco_dataset(
        **options, num_steps=150, policy="sac-replay", sac_steps=SAC_STEPS, work_dir=work_dir
    )
    buffer = model.replay_buffer
    f32 = np.float32  # D4RL's dtypes; SB3 keeps the env's float64 observations
    np.testing.assert_array_equal(arrays["observations"], buffer.observations[:150, 0].astype(f32))
    np.testing.assert_array_equal(arrays["actions"], buffer.actions[:150, 0].astype(f32))
    np.testing.assert_array_equal(arrays["rewards"], buffer.rewards[:150, 0].astype(f32))
    np.testing.assert_array_equal(
        arrays["terminals"], buffer.dones[:150, 0].astype(bool) & ~buffer.timeouts[:150, 0].astype(bool)
    )
    # Consecutive rows of one episode chain: the next row starts where this one ended.
    inside = ~(arrays["terminals"] | arrays["timeouts"])[:-1]
    np.testing.assert_array_equal(
        arrays["next_observations"][:-1][inside], arrays["observations"][1:][inside]
    )
    assert arrays["terminals"].any(), "a young Hopper agent falls"
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    first_return = arrays["rewards"][: ends[0] + 1].sum(dtype=np.float64)
    assert attrs["policy"] == "sac-replay" and attrs["num_episodes"] == len(ends)
    assert attrs["behaviour_return"] == pytest.approx(
        np.mean(
            [first_return]
            + [
                arrays["rewards"][a + 1 : b + 1].sum(dtype=np.float64)
                for a, b in zip(ends[:-1], ends[1:], strict=True)
            ]
        )
    )
    save_dataset(tmp_path / "replay.hdf5", arrays, attrs)
    assert load_dataset(tmp_path / "replay.hdf5").rewards.shape == (150,)


def test_sac_replay_of_an_agent_trained_without_its_buffer_says_so(tmp_path):
    pytest.importorskip("stable_baselines3")
    from trifle.data.behaviour import final_replay

    with pytest.raises(CheckpointError, match="sac_final_replay.pkl: missing"):
        final_replay(tmp_path)


def test_sac_dataset_deterministic(sac_run):
    _, _, (arrays, attrs), (again, attrs_again) = sac_run
    assert attrs_again == attrs
    for key, value in arrays.items():
        assert again[key].dtype == value.dtype
        np.testing.assert_array_equal(again[key], value)


def test_sac_dataset_actions_follow_the_policy(sac_run):
    """Stored actions and log-probs are those of SAC's squashed Gaussian, as SB3 computes them."""
    import torch

    from trifle.data.behaviour import SACBehaviour

    model, _, (arrays, _), _ = sac_run
    act = SACBehaviour(model, -np.ones(3), np.ones(3))
    for i in (0, 17, 250):
        mean, log_std = act.gaussian(arrays["observations"][i])
        u = np.arctanh(arrays["actions"][i].astype(np.float64))
        z = (u - mean) / np.exp(log_std)
        assert np.all(np.abs(z) < 6), "the action is a plausible draw from the policy"
        dist = model.actor.action_dist.proba_distribution(
            torch.as_tensor(mean[None]), torch.as_tensor(log_std[None])
        )
        sb3 = dist.log_prob(torch.as_tensor(np.tanh(u)[None]), torch.as_tensor(u[None])).item()
        assert arrays["infos/action_log_probs"][i] == pytest.approx(sb3, abs=1e-3)


def test_squashed_gaussian_log_prob_is_exact_and_finite():
    pytest.importorskip("stable_baselines3")
    from trifle.data.behaviour import squashed_gaussian_log_prob

    # 1-D change of variables: density of a = tanh(u) is N(u) / (1 - tanh(u)^2).
    u, mean, log_std = np.array([0.3]), np.array([0.1]), np.array([-0.5])
    std = np.exp(log_std)
    expected = -0.5 * ((u - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi)) - np.log(1 - np.tanh(u) ** 2)
    assert squashed_gaussian_log_prob(u, mean, log_std) == pytest.approx(float(expected[0]), rel=1e-12)
    assert np.isfinite(squashed_gaussian_log_prob(np.array([40.0, -40.0]), np.zeros(2), np.zeros(2)))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"sac_steps": 0, "work_dir": "x"}, "sac_steps"),
        ({}, "work directory"),
        ({"sac_target_return": "high", "work_dir": "x"}, "sac_target_return"),
        ({"sac_eval_every": 0, "work_dir": "x"}, "sac_eval_every"),
        ({"sac_eval_episodes": 1.5, "work_dir": "x"}, "sac_eval_episodes"),
    ],
)
def test_sac_dataset_rejects_bad_options(options, name):
    with pytest.raises(ConfigError, match=name):
        generate_mujoco_dataset(env="hopper", num_steps=10, policy="sac", progress=False, **options)


def test_sac_dataset_without_stable_baselines3_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_baselines3", None)
    monkeypatch.delitem(sys.modules, "trifle.data.behaviour", raising=False)
    with pytest.raises(TrifleError, match="stable-baselines3"):
        generate_mujoco_dataset(
            env="hopper", num_steps=10, policy="sac", sac_steps=10, work_dir=tmp_path, progress=False
        )


def test_medium_and_medium_replay_tasks_share_one_agent():
    """The replay task is the medium task's agent's buffer: both must name the same training directory,
    and a different stopping rule must name another (it trains another agent)."""
    from trifle.config import compose
    from trifle.stages.data import behaviour_dir

    def agent_dir(*overrides):
        cfg = compose(list(overrides))
        params = dict(cfg["task"]["dataset"], env=cfg["task"]["env"])
        return behaviour_dir(Path(cfg["paths"]["raw"]), params)

    medium = agent_dir("task=hopper-medium-local")
    assert agent_dir("task=hopper-medium-replay-local") == medium
    assert medium.name == "hopper-sac400000-target1500-seed0"
    assert agent_dir("task=hopper-medium-local", "task.dataset.sac_target_return=1600") != medium
