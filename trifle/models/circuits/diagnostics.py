"""What a circuit's held-out likelihood cannot show: whether its conditionals are the data's.

Trifle uses the circuit only through conditionals: p(V | s, a^{<=i}) for the action correction and
E[r], E[V] given a state and actions for multi-step values. A circuit can reach a good likelihood while
ignoring the action altogether (a tree that puts a_0 far from r_0 does exactly that), so the training
stage also measures the conditionals against the data's own counts:

* ``reward_tv`` (tasks whose observations are all categorical): the total-variation distance between
  p_PC(r | s, a) and the empirical p(r | s, a), averaged over the (s, a) pairs seen at least
  ``min_count`` times, weighted by their counts. 0 is perfect.
* ``q_within_state_corr`` (same tasks): the correlation, across the actions of each state, between
  the circuit's E[r + gamma V | s, a] and the data's mean of r + gamma V for (s, a). Both are centred on
  their state's count-weighted mean first, so only the *ranking of actions within a state* counts, which is
  what a planner uses; 1 is perfect, 0 means the circuit's action values carry no information.
* ``value_calibration_error`` (every task, held-out transitions): the randomised probability integral
  transform u = F(V-) + U p(V), U ~ Uniform(0, 1), of each held-out value label under p_PC(V | s, a) is
  uniform when the circuit is calibrated (also where V has atoms); the number is the largest deviation
  of a decile's share from 0.1 (about 0.01-0.02 is sampling noise at 4000 rows). ``value_corr`` is the correlation of
  E_PC[V | s, a] with the label.

All quantities use each bin's representative value (the discretizer's decoding), so circuit and data are
compared on the same scale. Queries condition on the first transition of the window only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trifle.data.tokens import TokenData

#: Rows per circuit query (bounds the [B, V, C] evidence tensor).
_CHUNK = 2048


def _conditional(circuit, tokens: np.ndarray, num_vars: int, targets: list[int]) -> np.ndarray:
    """p(targets | first transition's observation and action tokens) as ``[B, T, C]`` float64."""
    given = tokens.shape[1]
    out = []
    for lo in range(0, len(tokens), _CHUNK):
        part = torch.as_tensor(tokens[lo : lo + _CHUNK], dtype=torch.long)
        x = torch.zeros(len(part), num_vars, dtype=torch.long)
        missing = torch.ones(len(part), num_vars, dtype=torch.bool)
        x[:, :given], missing[:, :given] = part, False
        with torch.no_grad():
            out.append(circuit.conditional(x, missing, targets).double().cpu().numpy())
    return np.concatenate(out)


def _real_bins(probs: np.ndarray, num_bins: int) -> np.ndarray:
    """Drop the pad and unused categories and renormalise over the column's own bins."""
    probs = probs[..., :num_bins]
    return probs / np.clip(probs.sum(axis=-1, keepdims=True), 1e-300, None)


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    num = float(np.sum(w * x * y))
    den = math.sqrt(float(np.sum(w * x * x)) * float(np.sum(w * y * y)))
    return num / den if den > 0 else float("nan")


def discrete_state_diagnostics(
    circuit, data: TokenData, rows: np.ndarray, *, discount: float, min_count: int = 5, max_pairs: int = 4000
) -> dict[str, float]:
    """``reward_tv`` and ``q_within_state_corr`` on the (s, a) pairs of ``rows`` (see the module docstring)."""
    obs_dim, act_dim, dim = data.obs_dim, data.act_dim, data.transition_dim
    n_rew, n_val = (int(n) for n in data.discretizer.num_bins[-2:])
    r_vals = data.discretizer.columns[-2].values
    v_vals = data.discretizer.columns[-1].values
    sa = data.tokens[rows, : obs_dim + act_dim]
    keys, inverse, counts = np.unique(sa, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    kept = np.flatnonzero(counts >= min_count)
    kept = kept[np.argsort(-counts[kept], kind="stable")[:max_pairs]]
    if len(kept) == 0:
        return {"reward_tv": float("nan"), "q_within_state_corr": float("nan"), "diagnostic_pairs": 0}
    slot = np.full(len(keys), -1)
    slot[kept] = np.arange(len(kept))
    pair = slot[inverse]
    use = pair >= 0
    rew_tok, val_tok = data.tokens[rows, -2][use], data.tokens[rows, -1][use]
    emp_r = np.zeros((len(kept), n_rew))
    np.add.at(emp_r, (pair[use], rew_tok), 1.0)
    emp_r /= emp_r.sum(axis=1, keepdims=True)
    q_data = np.bincount(pair[use], weights=r_vals[rew_tok] + discount * v_vals[val_tok], minlength=len(kept))
    weight = counts[kept].astype(float)
    q_data /= weight
    probs = _conditional(circuit, keys[kept], circuit.num_vars, [dim - 2, dim - 1])
    pc_r, pc_v = _real_bins(probs[:, 0], n_rew), _real_bins(probs[:, 1], n_val)
    tv = 0.5 * np.abs(pc_r - emp_r).sum(axis=1)
    q_pc = pc_r @ r_vals[:n_rew] + discount * (pc_v @ v_vals[:n_val])
    # Centre both on each state's count-weighted mean: only the ranking of a state's actions is compared.
    _, state = np.unique(keys[kept][:, :obs_dim], axis=0, return_inverse=True)
    state = state.reshape(-1)
    w_state = np.bincount(state, weights=weight)
    centred = []
    for q in (q_data, q_pc):
        mean = np.bincount(state, weights=weight * q) / w_state
        centred.append(q - mean[state])
    multi = np.bincount(state)[state] >= 2
    corr = (
        _weighted_corr(centred[0][multi], centred[1][multi], weight[multi]) if multi.any() else float("nan")
    )
    return {
        "reward_tv": float(np.sum(weight * tv) / weight.sum()),
        "q_within_state_corr": corr,
        "diagnostic_pairs": len(kept),
    }


def value_calibration(
    circuit, data: TokenData, rows: np.ndarray, *, max_rows: int = 4000, seed: int = 0
) -> dict[str, float]:
    """``value_calibration_error`` and ``value_corr`` of p_PC(V | s, a) on ``rows`` (held-out transitions)."""
    if len(rows) == 0:
        return {"value_calibration_error": float("nan"), "value_corr": float("nan")}
    rng = np.random.default_rng(seed)
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    obs_act = data.obs_dim + data.act_dim
    n_val = int(data.discretizer.num_bins[-1])
    v_vals = data.discretizer.columns[-1].values[:n_val]
    dim = data.transition_dim
    probs = _real_bins(
        _conditional(circuit, data.tokens[rows, :obs_act], circuit.num_vars, [dim - 1])[:, 0], n_val
    )
    label = data.tokens[rows, -1]
    cdf_below = np.cumsum(probs, axis=1) - probs
    idx = np.arange(len(rows))
    # Randomised PIT: uniform on [0, 1] under a calibrated model even when V has atoms (FrozenLake's 0).
    pit = cdf_below[idx, label] + rng.random(len(rows)) * probs[idx, label]
    shares = np.histogram(np.clip(pit, 0, 1), bins=10, range=(0.0, 1.0))[0] / len(rows)
    expected = probs @ v_vals
    truth = v_vals[label]
    corr = (
        float(np.corrcoef(expected, truth)[0, 1]) if expected.std() > 0 and truth.std() > 0 else float("nan")
    )
    return {"value_calibration_error": float(np.abs(shares - 0.1).max()), "value_corr": corr}


def has_discrete_states(data: TokenData) -> bool:
    """Whether every observation column is categorical (Taxi, FrozenLake), so (s, a) pairs repeat."""
    return all(c.kind == "categorical" for c in data.discretizer.columns[: data.obs_dim])


def episode_rows(data: TokenData, episode_ids: np.ndarray) -> np.ndarray:
    """Row indices of the given episodes."""
    ends = np.append(data.episode_starts[1:], len(data.tokens))
    pieces = [np.arange(data.episode_starts[e], ends[e]) for e in np.asarray(episode_ids, np.int64)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def circuit_diagnostics(
    circuit, data: TokenData, train_ids: np.ndarray, valid_ids: np.ndarray, *, discount: float, seed: int = 0
) -> dict[str, float]:
    """Every diagnostic that applies to the task: the discrete-state ones on the training episodes'
    counts, the calibration on held-out episodes; NaN where one does not apply."""
    out = {"reward_tv": float("nan"), "q_within_state_corr": float("nan")}
    if has_discrete_states(data):
        out.update(
            discrete_state_diagnostics(circuit, data, episode_rows(data, train_ids), discount=discount)
        )
    out.update(value_calibration(circuit, data, episode_rows(data, valid_ids), seed=seed))
    return out


def write_circuit_metrics(
    cfg: dict,
    circuit,
    data: TokenData,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    metrics: dict,
    *,
    train_ll: float,
    heldout_ll: float,
    **extra,
) -> dict[str, float]:
    """Diagnose a trained or imported circuit and write its ``paths.pc_metrics`` file (the models table's
    row: likelihoods, the task's window, these diagnostics). Returns the diagnostics."""
    from trifle.models.metrics import write_model_metrics

    diagnostics = circuit_diagnostics(
        circuit, data, train_ids, valid_ids, discount=cfg["task"]["labels"]["discount"], seed=cfg["seed"]
    )
    metrics["diagnostics"] = diagnostics
    write_model_metrics(
        cfg,
        "pc",
        metrics,
        train_ll=train_ll,
        heldout_ll=heldout_ll,
        window=cfg["task"]["pc_window"],
        **extra,
        **diagnostics,
    )
    return diagnostics
