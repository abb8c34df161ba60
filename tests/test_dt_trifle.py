"""DT-based Trifle (``trifle-dt``): DT's categorical action distribution corrected by the circuit.

* On a tiny circuit whose joint is enumerated (as in tests/test_planning_queries.py: 2 states, 3
  actions, rewards {-1, 5}, 3 value bins, K = 2, 4 categories, 4^8 assignments), the corrected
  distribution equals p_DT(a) · P(G in the top mass | s, a) renormalised, with G, its levels, the threshold
  weights and the scores all recomputed by brute force; with top_ratio = 1 it is DT's own distribution.
* The policy acts from that distribution (argmax against brute force on a DT stub), is deterministic
  for a seed, and with top_ratio = 1 takes exactly DT's actions.
* The registry entry loads; bad settings fail before anything is loaded; continuous tasks are refused;
  a circuit or DT of other data is a CheckpointError; an end-to-end run on Taxi with tiny trained
  models returns valid actions through the evaluate stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trifle.__main__ import main
from trifle.config import compose
from trifle.errors import CheckpointError, ConfigError
from trifle.models.circuits import TorchCircuit
from trifle.models.dt import DecisionTransformer, DTConfig
from trifle.planning.dt_policy import DTPolicy
from trifle.planning.dt_trifle import (
    DTCorrection,
    DTTriflePolicy,
    DTTrifleSettings,
    dt_trifle_policies,
    validate_settings,
)
from trifle.planning.methods import method, methods_in, sort_key
from trifle.stages import evaluate

from circuit_support.tiny_task import (
    GAMMA,
    OBS,
    REWARDS,
    VALUES,
    K,
    enumerated_joint,
    fitted_circuit,
)
from circuit_support.tiny_task import discretizer as _discretizer

NUM_ACTIONS = 3


@pytest.fixture(scope="module")
def circuit() -> TorchCircuit:
    return fitted_circuit()


@pytest.fixture(scope="module")
def joint(circuit) -> tuple[torch.Tensor, torch.Tensor]:
    return enumerated_joint(circuit)


def _settings(top_ratio=0.2, target="return", rule="mass", sample=False) -> DTTrifleSettings:
    return DTTrifleSettings("trifle-dt", sample, top_ratio, target, rule)


def _correction(circuit, **kw) -> DTCorrection:
    return DTCorrection.build(
        circuit,
        _discretizer(),
        obs_dim=OBS,
        num_actions=NUM_ACTIONS,
        circuit_window=K,
        discount=GAMMA,
        settings=_settings(**kw),
    )


# ------------------------------------------------------------------ brute force over the joint
def _target_dist(allx, p, s: int, a: int | None, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(levels, probabilities) of the correction target G given s (and a), from the enumerated joint:
    the reward and value restricted to their real bins and renormalised, as the target is defined."""
    w = p * (allx[:, 0] == s)
    if a is not None:
        w = w * (allx[:, 1] == a)
    r_var, v_var = 2, 3

    def p_value(weights):
        mass = np.array([float((weights * (allx[:, v_var] == b)).sum()) for b in range(len(VALUES))])
        return mass / mass.sum()

    if target == "value":
        return VALUES.copy(), p_value(w)
    p_r = np.array([float((w * (allx[:, r_var] == k)).sum()) for k in range(len(REWARDS))])
    p_r = p_r / p_r.sum()
    g, m = [], []
    for k in range(len(REWARDS)):
        pv = p_value(w * (allx[:, r_var] == k))
        for b in range(len(VALUES)):
            g.append(REWARDS[k] + GAMMA * VALUES[b])
            m.append(p_r[k] * pv[b])
    g, m = np.array(g), np.array(m)
    levels = np.unique(g)
    return levels, np.array([m[g == lv].sum() for lv in levels])


def _weights_by_hand(probs: np.ndarray, top_ratio: float, rule: str) -> np.ndarray:
    """Walk the levels from the best one down. mass: take each level's mass until top_ratio is used up
    (weight = the fraction taken); cdf: every level whose mass above it is below top_ratio; strict: every
    level whose mass at or above it is at most top_ratio (the best level if none)."""
    weights = np.zeros(len(probs))
    above = 0.0
    for j in range(len(probs) - 1, -1, -1):
        if rule == "mass":
            take = min(probs[j], max(top_ratio - above, 0.0))
            weights[j] = take / probs[j]
        elif rule == "cdf":
            weights[j] = float(above < top_ratio)
        else:
            weights[j] = float(above + probs[j] <= top_ratio)
        above += probs[j]
    if rule == "strict" and not weights.any():
        weights[-1] = 1.0
    return weights


def _brute_corrected(allx, p, s: int, dt_logits: np.ndarray, top_ratio: float, target: str, rule: str):
    p_dt = np.exp(dt_logits - dt_logits.max())
    p_dt = p_dt / p_dt.sum()
    levels, base = _target_dist(allx, p, s, None, target)
    w = _weights_by_hand(base, top_ratio, rule)
    scores = np.array([(w * _target_dist(allx, p, s, a, target)[1]).sum() for a in range(NUM_ACTIONS)])
    out = p_dt * scores
    return out / out.sum(), scores


LOGITS = np.array([[0.3, -1.2, 0.9], [2.0, 0.1, -0.5], [-0.7, 0.4, 0.0], [1.5, 1.5, -3.0]])
STATES = np.array([0, 1, 1, 0])


@pytest.mark.parametrize(
    ("target", "rule", "top_ratio"),
    [("return", "mass", 0.2), ("return", "mass", 0.45), ("return", "cdf", 0.3), ("value", "strict", 0.35)],
)
def test_corrected_distribution_equals_brute_force(circuit, joint, target, rule, top_ratio):
    allx, p = joint
    corr = _correction(circuit, top_ratio=top_ratio, target=target, rule=rule)
    got = corr.log_probs(STATES[:, None], torch.tensor(LOGITS)).exp().numpy()
    changed = 0.0
    for b, s in enumerate(STATES):
        want, scores = _brute_corrected(allx, p, int(s), LOGITS[b], top_ratio, target, rule)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-10)
        assert scores.min() >= 0 and scores.max() > 0
        p_dt = np.exp(LOGITS[b]) / np.exp(LOGITS[b]).sum()
        changed = max(changed, float(np.abs(want - p_dt).max()))
    # The correction moves the distribution (the comparison is not vacuous); in this circuit V_t alone
    # hardly depends on the action, r_t does.
    assert changed > (0.05 if target == "return" else 1e-3)


def test_the_per_state_memo_gives_the_same_distribution(circuit):
    """The policy asks the circuit once per distinct state; the scores it keeps give the same answer."""
    corr = _correction(circuit, top_ratio=0.3)
    logits = torch.tensor(LOGITS)
    direct = corr.log_probs(STATES[:, None], logits)
    memo: dict = {}
    first = corr.log_probs(STATES[:, None], logits, memo)
    assert sorted(memo) == [(0,), (1,)]
    again = corr.log_probs(STATES[::-1, None].copy(), logits.flip(0), memo)
    torch.testing.assert_close(first, direct, rtol=0, atol=1e-14)
    torch.testing.assert_close(again, direct.flip(0), rtol=0, atol=1e-14)


def test_top_ratio_one_keeps_dts_distribution(circuit):
    corr = _correction(circuit, top_ratio=1.0)
    logits = torch.tensor(LOGITS)
    got = corr.log_probs(STATES[:, None], logits).exp()
    torch.testing.assert_close(got, torch.softmax(logits.double(), -1), rtol=0, atol=1e-12)


def test_the_category_to_token_map_is_applied_both_ways(circuit, joint):
    """DT's category k is scored as the circuit's token token_of_category[k] (here a permutation)."""
    allx, p = joint
    corr = _correction(circuit, top_ratio=0.3)
    perm = torch.tensor([2, 0, 1])
    corr.token_of_category = perm
    got = corr.log_probs(STATES[:, None], torch.tensor(LOGITS)).exp().numpy()
    for b, s in enumerate(STATES):
        _, scores = _brute_corrected(allx, p, int(s), LOGITS[b], 0.3, "return", "mass")
        p_dt = np.exp(LOGITS[b]) / np.exp(LOGITS[b]).sum()
        want = p_dt * scores[perm.numpy()]
        np.testing.assert_allclose(got[b], want / want.sum(), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ the policy
def _dt_stub(seed: int = 0, sharp: float = 1.0) -> DecisionTransformer:
    cfg = DTConfig(
        obs_dim=OBS, act_dim=1, context_len=3, max_timestep=10, obs_cardinalities=[2],
        num_actions=NUM_ACTIONS, n_layer=1, n_head=1, n_embd=16, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = DecisionTransformer(cfg).eval()
    with torch.no_grad():
        model.predict_action.weight.mul_(sharp)
    return model


def _first_logits(model: DecisionTransformer, obs: np.ndarray, target: float, scale: float) -> np.ndarray:
    """DT's logits at an episode's first step, by a direct forward pass."""
    n = len(obs)
    with torch.no_grad():
        out = model(
            torch.full((n, 1), target / scale),
            torch.as_tensor(obs, dtype=torch.float32)[:, None, :],
            torch.zeros(n, 1, 1),
            torch.zeros(n, 1, dtype=torch.long),
        )
    return out[:, 0].double().numpy()


def test_policy_acts_by_the_argmax_of_the_brute_force_distribution(circuit, joint):
    allx, p = joint
    model = _dt_stub(sharp=3.0)
    obs = np.array([[0], [1], [0], [1]], np.float32)
    logits = _first_logits(model, obs, target=2.0, scale=4.0)
    chosen = {}
    for ratio in (1.0, 0.2):
        policy = DTTriflePolicy(
            model, {"return_scale": 4.0}, 2.0, sample=False, correction=_correction(circuit, top_ratio=ratio)
        )
        policy.reset(4, seed=0)
        actions = policy.act(np.arange(4), obs)
        want = [
            _brute_corrected(allx, p, int(obs[b, 0]), logits[b], ratio, "return", "mass")[0].argmax()
            for b in range(4)
        ]
        assert actions[:, 0].tolist() == [float(a) for a in want]
        chosen[ratio] = actions[:, 0].tolist()
    assert chosen[1.0] == logits.argmax(-1).tolist()  # top_ratio 1: DT's own argmax
    assert chosen[0.2] != chosen[1.0]  # and the correction changes at least one action here


def _rollout(policy, seed: int, steps: int = 6, envs: int = 24) -> np.ndarray:
    rng = np.random.default_rng(100)  # the same observations and rewards for every policy
    policy.reset(envs, seed)
    ids, out = np.arange(envs), []
    for _ in range(steps):
        obs = rng.integers(0, 2, (envs, 1)).astype(np.float32)
        a = policy.act(ids, obs)
        policy.record(ids, a, rng.normal(size=envs))
        out.append(a)
    return np.concatenate(out)


def test_policy_is_deterministic_for_a_seed_and_top_ratio_one_is_dt(circuit):
    model = _dt_stub()
    make = lambda ratio: DTTriflePolicy(  # noqa: E731
        model, {"return_scale": 4.0}, 2.0, sample=True, correction=_correction(circuit, top_ratio=ratio)
    )
    first = _rollout(make(0.2), seed=3)
    np.testing.assert_array_equal(first, _rollout(make(0.2), seed=3))
    assert not np.array_equal(first, _rollout(make(0.2), seed=4))
    assert set(np.unique(first)) <= {0.0, 1.0, 2.0}
    # top_ratio 1 keeps DT's distribution, and the draws use DT's per-environment generators.
    dt = _rollout(DTPolicy(model, {"return_scale": 4.0}, 2.0, sample=True), seed=3)
    np.testing.assert_array_equal(_rollout(make(1.0), seed=3), dt)
    assert not np.array_equal(first, dt)


# ------------------------------------------------------------------- registry and settings
def test_registry_entry():
    entry = method("trifle-dt")
    assert entry.policy_function() is dt_trifle_policies
    assert entry.needs == ("labeled", "tokens", "dt", "pc") and entry.label == "DT-Trifle"
    assert (entry.order, entry.tables, entry.reference) == (15, ("summary", "optimality"), False)
    assert sorted(["tt", "trifle-dt", "dt"], key=sort_key) == ["dt", "trifle-dt", "tt"]
    assert "trifle-dt" in methods_in("summary") and "trifle-dt" not in methods_in("mujoco")
    planner = compose(["task=taxi-stochastic", "planner=trifle-dt"])["planner"]
    assert validate_settings(planner) == DTTrifleSettings("trifle-dt", True, 0.2, "return", "mass")
    assert planner["target_return"] is None  # inherited from dt.yaml: the task's six targets


def _cfg(tmp_path: Path, *overrides: str) -> dict:
    missing = [f"paths.{k}={tmp_path}/missing.{k}" for k in ("labeled", "tokens", "dt", "pc")]
    return compose(["task=taxi-stochastic", "planner=trifle-dt", "device=cpu", *missing, *overrides])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("planner.top_ratio=0", "planner.top_ratio"),
        ("planner.top_ratio=1.5", "planner.top_ratio"),
        ("planner.value_threshold=median", "planner.value_threshold"),
        ("planner.correction_target=reward", "planner.correction_target"),
        ("planner.sample=maybe", "planner.sample"),
        ("+planner.beam_width=4", "planner.beam_width"),
        ("planner.target_return=[]", "planner.target_return"),
    ],
)
def test_bad_settings_fail_before_anything_is_loaded(tmp_path, override, key):
    """Every path points to a missing file: a ConfigError (not a missing-file error) shows the settings
    were checked first."""
    try:
        cfg = _cfg(tmp_path, override)
    except ConfigError as err:  # compose itself may already refuse it
        assert key in str(err)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dt_trifle_policies(cfg, "cpu")


def test_missing_setting_is_named(tmp_path):
    cfg = _cfg(tmp_path)
    del cfg["planner"]["value_threshold"]
    with pytest.raises(ConfigError, match=r"planner\.value_threshold: missing"):
        dt_trifle_policies(cfg, "cpu")


def test_continuous_action_tasks_are_refused(tmp_path):
    cfg = compose(["task=hopper-medium-v2", "planner=trifle-dt", f"paths.dt={tmp_path}/none.pt"])
    with pytest.raises(ConfigError, match=r"task=hopper-medium-v2: .*continuous"):
        dt_trifle_policies(cfg, "cpu")


# ------------------------------------------------------------------ Taxi, tiny trained models
@pytest.fixture(scope="module")
def taxi(tmp_path_factory) -> dict[str, Path]:
    """The Taxi chain of stages on 60 episodes with tiny models (the smoke workflow's sizes)."""
    root = tmp_path_factory.mktemp("taxi")
    paths = {
        "raw": root / "raw.hdf5",
        "labeled": root / "labeled.npz",
        "tokens": root / "tokens.npz",
        "dt": root / "dt.pt",
        "dt_metrics": root / "dt.json",
        "pc": root / "pc.jpc",
        "pc_metrics": root / "pc.json",
    }
    common = ["task=taxi-stochastic", "task.dataset.num_episodes=60", "progress=false", "device=cpu"]
    common += [f"paths.{k}={v}" for k, v in paths.items()]
    assert main(["data", *common]) == 0
    assert main(["labels", *common]) == 0
    assert main(["tokens", *common]) == 0
    assert main(["train_dt", *common, "dt.steps=30", "dt.eval_every=0", "dt.checkpoint_every=0"]) == 0
    assert main(["train_pc", *common, "pc.epochs=2", "pc.num_latents=4"]) == 0
    return paths


def _taxi_cfg(taxi: dict[str, Path], tmp_path: Path, *overrides: str) -> dict:
    paths = [f"paths.{k}={taxi[k]}" for k in ("labeled", "tokens", "dt", "pc")]
    return compose(
        [
            "task=taxi-stochastic",
            "planner=trifle-dt",
            "eval.episodes=6",
            "eval.batch_episodes=3",
            "eval.max_episode_steps=25",
            "device=cpu",
            "progress=false",
            *paths,
            f"paths.eval={tmp_path / 'eval.json'}",
            *overrides,
        ]
    )


def test_taxi_end_to_end(taxi, tmp_path):
    cfg = _taxi_cfg(taxi, tmp_path, "planner.target_return=[-100,-300]")
    policies = dt_trifle_policies(cfg, "cpu")
    assert [t for t, _ in policies] == [-100.0, -300.0]
    policy = policies[0][1]
    policy.reset(5, seed=0)
    obs = np.array([[0, 0, 0, 1], [4, 4, 4, 3], [2, 3, 1, 0], [1, 1, 4, 2], [3, 0, 2, 1]], np.float32)
    actions = policy.act(np.arange(5), obs)
    assert actions.shape == (5, 1) and set(actions[:, 0].tolist()) <= set(range(6))
    out = evaluate.run(cfg)
    record = json.loads(Path(out).read_text())
    assert record["method"] == "trifle-dt" and [e["target_return"] for e in record["targets"]] == [-100, -300]
    for entry in record["targets"]:
        assert len(entry["episodes"]["returns"]) == 6
        assert all(steps <= 25 for steps in entry["episodes"]["steps"])


def test_taxi_models_of_other_data_are_refused(taxi, tmp_path):
    # A circuit over another window (K = 3 instead of 7) does not fit this task's queries.
    cfg = _taxi_cfg(taxi, tmp_path, "task.pc_window=3")
    with pytest.raises(CheckpointError, match="num_vars"):
        dt_trifle_policies(cfg, "cpu")
    # A DT trained on other episodes than the token file's.
    other = tmp_path / "other"
    common = ["task=taxi-stochastic", "task.dataset.num_episodes=40", "progress=false", "device=cpu"]
    common += [f"paths.raw={other}.hdf5", f"paths.labeled={other}.npz", f"paths.dt={other}.pt"]
    common += [f"paths.dt_metrics={other}.json"]
    assert main(["data", *common]) == 0 and main(["labels", *common]) == 0
    assert main(["train_dt", *common, "dt.steps=2", "dt.eval_every=0", "dt.checkpoint_every=0"]) == 0
    cfg = _taxi_cfg(taxi, tmp_path, f"paths.dt={other}.pt")
    with pytest.raises(CheckpointError, match="other data"):
        dt_trifle_policies(cfg, "cpu")
