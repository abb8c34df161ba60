"""Train and load IQL's critic (trifle.models.iql) on a task's labeled transitions, for TT(+Q).

Transitions come from the labeled trajectories (``paths.labeled``): row t of an episode with
s' = the next row's observation and d = 0, and the episode's last row with d = 1 when the episode
ended by a real terminal. The last row of an episode cut by a timeout (or by the end of the dataset)
has no s' in the labeled file and is left out, as D4RL's ``qlearning_dataset`` does. Rewards are the
labeled ones (termination penalty applied), the same rewards the GPT's reward tokens model, so that
the planner's ``sum gamma^h r_h + gamma^H Q`` adds quantities of one kind; gamma is the task's
``task.labels.discount``, stored in the checkpoint and checked by the planner.

The loop is ``training_loop``'s, shared with the GPT and DT trainers: the init is a function of
``seed``, the minibatch of step t a function of ``(seed, t)`` (a fresh permutation of the training
transitions per epoch), so a run resumed from ``<out_path>.partial.pt`` (weights, target weights,
optimizer state) ends bit-identical to an uninterrupted one. The held-out episodes are
:func:`split_episodes`' with the same seed and ``valid_fraction``, i.e. the GPT's and DT's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.data.labels import LabeledTrajectories
from trifle.data.windows import split_episodes
from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models.iql import CriticConfig, IQLCritic
from trifle.models.iql_settings import IQL_CONFIG as IQL_CONFIG
from trifle.models.iql_settings import resolve_config
from trifle.models.training_common import (
    cpu_state,
    derived_seed,
    eval_subset,
    load_checkpoint,
    seeded,
)
from trifle.models.training_loop import (
    TrainingJob,
    optimizer_step,
    run_training,
    save_final,
    shuffled_batches,
)

# The settings (IQL_CONFIG and resolve_config) are defined in the torch-free iql_settings, which config
# validation imports; they are imported here so that the trainer's users find them here too.

CHECKPOINT_FORMAT = "trifle-critic/1"
PARTIAL_FORMAT = "trifle-critic-partial/1"

_RESUME_FREE_KEYS = {"checkpoint_every"}


# --------------------------------------------------------------------------------------- data


def is_discrete(attrs: Mapping[str, Any]) -> bool:
    """Discrete tasks carry both ``obs_cardinalities`` and ``num_actions`` (see ``d4rl_format``)."""
    return "obs_cardinalities" in attrs and "num_actions" in attrs


def model_config(cfg: Mapping[str, Any], labeled: LabeledTrajectories) -> CriticConfig:
    """The :class:`CriticConfig` a resolved training config and a dataset imply."""
    discrete = is_discrete(labeled.attrs)
    return CriticConfig(
        obs_dim=int(labeled.observations.shape[1]),
        act_dim=int(labeled.actions.shape[1]),
        hidden_dim=cfg["hidden_dim"],
        n_hidden=cfg["n_hidden"],
        obs_cardinalities=tuple(int(c) for c in labeled.attrs["obs_cardinalities"]) if discrete else None,
        num_actions=int(labeled.attrs["num_actions"]) if discrete else None,
    )


def _check_data(labeled: LabeledTrajectories, mcfg: CriticConfig) -> None:
    """Reject data the critic cannot represent, naming the array."""
    obs, act = labeled.observations, labeled.actions
    if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act) or len(act) != len(labeled.rewards):
        raise DataError(
            f"observations/actions/rewards: expected [N, obs_dim], [N, act_dim], [N], got "
            f"{obs.shape}, {act.shape}, {labeled.rewards.shape}"
        )
    if mcfg.discrete:
        cards = np.asarray(mcfg.obs_cardinalities)
        if np.any(obs != np.round(obs)) or np.any(obs < 0) or np.any(obs >= cards):
            raise DataError(f"observations: expected integers in [0, obs_cardinalities={cards.tolist()})")
        if np.any(act != np.round(act)) or np.any(act < 0) or np.any(act >= mcfg.num_actions):
            raise DataError(f"actions: expected [N, 1] integers in [0, num_actions={mcfg.num_actions})")


class Transitions:
    """(s, a, r, s', d) of the chosen episodes, addressable by index (a ``training_loop.Windows``)."""

    def __init__(self, labeled: LabeledTrajectories, episode_ids: np.ndarray) -> None:
        rows, nxt, done = transition_rows(labeled, episode_ids)
        self.rows = rows
        obs = np.asarray(labeled.observations, np.float32)
        self.observations = torch.from_numpy(obs[rows])
        self.actions = torch.from_numpy(np.asarray(labeled.actions, np.float32)[rows])
        self.rewards = torch.from_numpy(np.asarray(labeled.rewards, np.float32)[rows])
        self.next_observations = torch.from_numpy(obs[nxt])
        self.dones = torch.from_numpy(done.astype(np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        idx = torch.from_numpy(np.asarray(indices, np.int64))
        return (
            self.observations[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_observations[idx],
            self.dones[idx],
        )

    def iter_batches(self, indices: np.ndarray, batch_size: int):
        for lo in range(0, len(indices), batch_size):
            yield self.get(indices[lo : lo + batch_size])


def transition_rows(
    labeled: LabeledTrajectories, episode_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, next_rows, dones)`` of the transitions of ``episode_ids``: every row but the last of
    each episode (next = row + 1, d = 0), and the last row when the episode ended by a terminal (d = 1;
    its next row is itself, masked by d). A timed-out episode's last row has no s' and is left out."""
    starts = np.asarray(labeled.episode_starts, np.int64)
    ends = labeled.episode_ends
    terminal = np.asarray(labeled.episode_terminal, bool)
    rows, nxt, done = [], [], []
    for e in np.asarray(episode_ids, np.int64):
        inner = np.arange(starts[e], ends[e] - 1)
        rows.append(inner)
        nxt.append(inner + 1)
        done.append(np.zeros(len(inner), bool))
        if terminal[e]:
            rows.append(np.array([ends[e] - 1]))
            nxt.append(np.array([ends[e] - 1]))
            done.append(np.ones(1, bool))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(rows), np.concatenate(nxt), np.concatenate(done)


def default_value_scale(labeled: LabeledTrajectories) -> float:
    """The data's largest |value label| (1.0 if all are 0): Q and V then lie roughly in [-1, 1]."""
    largest = float(np.abs(np.asarray(labeled.values, np.float64)).max(initial=0.0))
    largest = max(largest, float(np.abs(np.asarray(labeled.rewards, np.float64)).max(initial=0.0)))
    return largest if largest > 0 else 1.0


def _fingerprint(labeled: LabeledTrajectories) -> dict:
    """Shapes plus a content hash, so a partial checkpoint is never resumed on different data."""
    digest = hashlib.sha256()
    arrays = (
        (labeled.observations, np.float32),
        (labeled.actions, np.float32),
        (labeled.rewards, np.float32),
        (labeled.values, np.float32),
        (labeled.episode_starts, np.int64),
        (labeled.episode_terminal, np.bool_),
    )
    for array, dtype in arrays:
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return {
        "rows": int(len(labeled.rewards)),
        "obs_dim": int(labeled.observations.shape[1]),
        "act_dim": int(labeled.actions.shape[1]),
        "episodes": int(len(labeled.episode_starts)),
        "sha256": digest.hexdigest(),
    }


# ---------------------------------------------------------------------------------- training


def make_optimizer(model: IQLCritic, cfg: Mapping[str, Any]) -> torch.optim.Adam:
    """IQL's Adam over Q1, Q2 and V (no weight decay); the target copies are not optimised."""
    return torch.optim.Adam(model.trainable(), lr=cfg["learning_rate"], betas=tuple(cfg["betas"]))


@torch.no_grad()
def score(model: IQLCritic, batches, *, discount: float, expectile: float) -> dict[str, float]:
    """Mean ``q_loss`` and ``v_loss`` (scaled units, as trained), the TD error's RMS in environment
    units (``td_rmse``: Q1 against r + gamma (1 - d) V(s')) and the mean min(Q1', Q2') (``q_mean``)."""
    total = {"q_loss": 0.0, "v_loss": 0.0, "sq": 0.0, "q": 0.0}
    count = 0
    device = model.device
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        q_loss, v_loss = model.losses(batch, discount=discount, expectile=expectile)
        n = batch[0].size(0)
        total["q_loss"] += float(q_loss) * n
        total["v_loss"] += float(v_loss) * n
        obs, act, rew, nxt, done = batch
        y = rew + discount * (1.0 - done) * model.state_value(nxt)
        q1 = model.q(model.features(obs), act)[0] * model.value_scale
        total["sq"] += float((q1 - y).square().sum())
        total["q"] += float(model.q_value(obs, act).sum())
        count += n
    if not count:
        return {"q_loss": math.nan, "v_loss": math.nan, "td_rmse": math.nan, "q_mean": math.nan}
    return {
        "q_loss": total["q_loss"] / count,
        "v_loss": total["v_loss"] / count,
        "td_rmse": math.sqrt(total["sq"] / count),
        "q_mean": total["q"] / count,
    }


def make_step(discount: float, expectile: float, alpha: float):
    """The loop's ``step``: one Adam update on L_Q + L_V, then the target critic's Polyak update."""

    def step(model: IQLCritic, optimizer, batch, lr: float, grad_clip: float, dropout_seed: int) -> float:
        device = model.device
        batch = tuple(t.to(device) for t in batch)

        def loss() -> torch.Tensor:
            q_loss, v_loss = model.losses(batch, discount=discount, expectile=expectile)
            return q_loss + v_loss

        value = optimizer_step(model, optimizer, loss, lr, grad_clip, dropout_seed)
        model.update_target(alpha)
        return value

    return step


def train_critic(
    cfg: Mapping[str, Any],
    *,
    labeled: LabeledTrajectories,
    discount: float,
    seed: int,
    out_path: str | Path,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train an :class:`IQLCritic` on ``labeled`` with discount ``discount`` and save it at ``out_path``.

    Resumes from ``<out_path>.partial.pt`` when present (written every ``checkpoint_every`` steps).
    ``stop_after`` ends this call after that many optimizer steps, leaving the partial checkpoint for a
    later call; the result then has ``completed: False``. Returns the metrics also stored in the
    checkpoint.
    """
    cfg = resolve_config(cfg)
    if not 0.0 <= float(discount) <= 1.0:
        raise ConfigError(f"task.labels.discount: expected a number in [0, 1], got {discount!r}")
    discount = float(discount)
    mcfg = model_config(cfg, labeled)
    _check_data(labeled, mcfg)
    starts = labeled.episode_starts
    train_ids, valid_ids = split_episodes(starts, len(labeled.rewards), cfg["valid_fraction"], seed)
    train_set, valid_set = Transitions(labeled, train_ids), Transitions(labeled, valid_ids)
    if len(train_set) == 0:
        raise DataError("labeled trajectories: the training episodes hold no transition with a next state")
    scale = cfg["value_scale"] or default_value_scale(labeled)
    data = _fingerprint(labeled)
    with seeded(derived_seed(seed, 0), torch.device(device)):
        model = IQLCritic(mcfg)
    model.value_scale.fill_(scale)
    if not mcfg.discrete:
        obs = train_set.observations.double()
        model.obs_mean.copy_(obs.mean(0).float())
        model.obs_std.copy_(obs.std(0).nan_to_num(1.0).clamp_min(1e-6).float())
    train_eval = eval_subset(len(train_set), cfg["eval_transitions"])
    valid_eval = eval_subset(len(valid_set), cfg["eval_transitions"])
    hyper = {"discount": discount, "expectile": cfg["expectile"]}

    def evaluate() -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            train_score = score(model, train_set.iter_batches(train_eval, 1024), **hyper)
            valid_score = score(model, valid_set.iter_batches(valid_eval, 1024), **hyper)
        finally:
            model.train(was_training)
        return {
            **{f"train_{k}": v for k, v in train_score.items()},
            **{f"heldout_{k}": v for k, v in valid_score.items()},
        }

    job = TrainingJob(
        kind="Critic",
        model=model,
        make_optimizer=make_optimizer,
        batch=shuffled_batches(train_set, seed, cfg["batch_size"]),
        step=make_step(discount, cfg["expectile"], cfg["target_update"]),
        evaluate=evaluate,
        shown_score=("heldout_td_rmse", "heldout_td_rmse"),
        data={**data, "discount": discount},
        partial_format=PARTIAL_FORMAT,
        resume_free_keys=_RESUME_FREE_KEYS,
    )
    run = run_training(
        job,
        cfg,
        seed=seed,
        total_steps=cfg["steps"],
        out_path=out_path,
        device=device,
        progress=progress,
        stop_after=stop_after,
    )
    if not run.completed:
        return run.stopped_metrics()
    metrics = {
        "completed": True,
        "discrete": mcfg.discrete,
        **run.final_scores,  # train_loss and the evaluation's scores above
        "value_scale": scale,
        "discount": discount,
        "expectile": cfg["expectile"],
        "steps": cfg["steps"],
        "seconds": run.seconds,
        "num_params": model.num_params(),
        "num_train_transitions": len(train_set),
        "num_heldout_transitions": len(valid_set),
        "history": run.history,
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": mcfg.to_dict(),
        "train_config": cfg,
        "seed": int(seed),
        "discount": discount,
        "state_dict": cpu_state(model),
        "metrics": metrics,
        "data": {**data, "train_episodes": train_ids.tolist(), "heldout_episodes": valid_ids.tolist()},
    }
    save_final(out_path, checkpoint)
    return metrics


def _plain(value: Any) -> Any:
    """Tuples compare equal to lists here: a checkpoint stores ``obs_cardinalities`` as a list."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def load_critic(
    path: str | Path, *, expect: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[IQLCritic, dict[str, Any]]:
    """Load a checkpoint written by :func:`train_critic` as an eval-mode critic on ``device``.

    ``expect`` holds values the caller relies on: config keys (``obs_dim``, ``act_dim``, ...) and
    ``discount``; a mismatch is a CheckpointError naming the key, the expected and found values.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, device, "critic")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    stored = {**ckpt.get("config", {}), "discount": ckpt.get("discount")}
    for key, value in (expect or {}).items():
        if key not in stored:
            raise CheckpointError(f"{path}: expected config key {key!r}, which the checkpoint does not have")
        found = stored[key]
        same = (
            math.isclose(float(found), float(value), rel_tol=0.0, abs_tol=1e-12)
            if key == "discount" and found is not None
            else _plain(found) == _plain(value)
        )
        if not same:
            raise CheckpointError(f"{path}: {key} expected {value!r}, found {found!r}")
    try:
        model = IQLCritic(CriticConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: config and weights do not form a valid model ({exc})") from exc
    return model.to(device).eval(), ckpt
