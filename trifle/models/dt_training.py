"""Train and load the Decision Transformer baseline on labeled (raw, undiscretized) trajectories.

Runs the same loop as the trajectory GPT's trainer (``training_loop``), so only the model and the
data differ: the model init is a function of ``seed``, the minibatch of optimizer step ``t`` a function
of ``(seed, t)`` and the dropout masks of step ``t`` come from a generator seeded with ``(seed, t)``, so
a run resumed from ``<out_path>.partial.pt`` ends with bit-identical weights. Held-out episodes come
from :func:`split_episodes` with the same seed, so DT and the GPT hold out the same episodes.

Returns-to-go are DT's: the undiscounted sum of the rewards from step ``t`` to the episode's end,
*including* ``r_t`` (unlike the labels' discounted ``V_t``, which starts after ``r_t``), divided by
``return_scale`` before entering the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.data.labels import LabeledTrajectories
from trifle.data.windows import split_episodes
from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models.dt import DecisionTransformer, DTConfig
from trifle.models.dt_settings import DT_CONFIG as DT_CONFIG
from trifle.models.dt_settings import ROLLOUT_KEYS, resolve_config
from trifle.models.dt_settings import TRAINING_KEYS as TRAINING_KEYS
from trifle.models.training_common import (
    adamw,
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

# The settings (DT_CONFIG, ROLLOUT_KEYS, TRAINING_KEYS and resolve_config) are defined in the torch-free
# dt_settings, which config validation imports; they are imported here so that the trainer's users find them
# here too.

CHECKPOINT_FORMAT = "trifle-dt/1"
PARTIAL_FORMAT = "trifle-dt-partial/1"

# Keys whose change does not alter the trained weights, so a resume may ignore them.
_RESUME_FREE_KEYS = {"checkpoint_every", *ROLLOUT_KEYS}


# --------------------------------------------------------------------------------------- data


def returns_to_go(rewards: np.ndarray, episode_starts: np.ndarray) -> np.ndarray:
    """DT's return-to-go ``R_t = sum_{k >= t} r_k`` within each episode (float64, includes ``r_t``)."""
    rewards = np.asarray(rewards, np.float64)
    starts = np.asarray(episode_starts, np.int64)
    ends = np.append(starts[1:], len(rewards))
    # Suffix sums per episode via one reversed cumulative sum, restarted at every episode end.
    suffix = np.cumsum(rewards[::-1])[::-1]
    after_episode = np.append(suffix, 0.0)[ends]
    return suffix - np.repeat(after_episode, ends - starts)


def episode_timesteps(episode_starts: np.ndarray, num_rows: int) -> np.ndarray:
    """Step index of every row within its episode (0 at each episode's first row)."""
    starts = np.asarray(episode_starts, np.int64)
    lengths = np.diff(np.append(starts, num_rows))
    return np.arange(num_rows) - np.repeat(starts, lengths)


def is_discrete(attrs: Mapping[str, Any]) -> bool:
    """Discrete tasks carry both ``obs_cardinalities`` and ``num_actions`` (see ``d4rl_format``)."""
    return "obs_cardinalities" in attrs and "num_actions" in attrs


def _check_data(labeled: LabeledTrajectories) -> None:
    """Reject data the model cannot represent, naming the array: better than a cryptic index error."""
    obs, act = labeled.observations, labeled.actions
    if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act) or len(act) != len(labeled.rewards):
        raise DataError(
            f"observations/actions/rewards: expected [N, obs_dim], [N, act_dim], [N], got "
            f"{obs.shape}, {act.shape}, {labeled.rewards.shape}"
        )
    if is_discrete(labeled.attrs):
        cards = np.asarray(labeled.attrs["obs_cardinalities"])
        num_actions = int(labeled.attrs["num_actions"])
        if (
            cards.shape != (obs.shape[1],)
            or np.any(obs != np.round(obs))
            or np.any(obs < 0)
            or np.any(obs >= cards)
        ):
            raise DataError(f"observations: expected integers in [0, obs_cardinalities={cards.tolist()})")
        if act.shape[1] != 1 or np.any(act != np.round(act)) or np.any(act < 0) or np.any(act >= num_actions):
            raise DataError(f"actions: expected [N, 1] integers in [0, num_actions={num_actions})")
    elif np.abs(act).max(initial=0.0) > 1.0 + 1e-3:
        raise DataError(
            f"actions: the tanh action head needs continuous actions in [-1, 1], found max |a| = "
            f"{np.abs(act).max():.4g}"
        )


def default_return_scale(rewards: np.ndarray, episode_starts: np.ndarray) -> float:
    """The largest |episode return| (1.0 if all are 0), so scaled returns-to-go lie roughly in [-1, 1]."""
    returns = np.add.reduceat(np.asarray(rewards, np.float64), np.asarray(episode_starts, np.int64))
    largest = float(np.abs(returns).max(initial=0.0))
    return largest if largest > 0 else 1.0


def max_timestep(labeled: LabeledTrajectories) -> int:
    """Size of the timestep embedding: the task's step limit when known, else the longest episode."""
    longest = int(np.diff(np.append(labeled.episode_starts, len(labeled.rewards))).max())
    limit = labeled.attrs.get("max_episode_steps")
    return max(longest, int(limit)) if isinstance(limit, (int, np.integer)) else longest


class DTWindows:
    """All windows of ``context_len`` steps starting at any row of the chosen episodes.

    Windows near an episode's end run past it; those steps are padding at the *end* (mask 0). Attention
    is causal, so trailing padding never influences a valid prediction and no attention mask is needed.
    """

    def __init__(
        self,
        labeled: LabeledTrajectories,
        rtg_scaled: np.ndarray,
        context_len: int,
        episode_ids: np.ndarray,
    ) -> None:
        n = len(labeled.rewards)
        starts = np.asarray(labeled.episode_starts, np.int64)
        ends = np.append(starts[1:], n)
        ids = np.asarray(episode_ids, np.int64)
        lengths = ends[ids] - starts[ids]
        offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.first_row = np.repeat(starts[ids], lengths) + offset
        self.end_row = np.repeat(ends[ids], lengths)
        self.context_len = int(context_len)
        self.observations = torch.from_numpy(np.asarray(labeled.observations, np.float32))
        self.actions = torch.from_numpy(np.asarray(labeled.actions, np.float32))
        self.rtg = torch.from_numpy(np.asarray(rtg_scaled, np.float32))
        self.timesteps = torch.from_numpy(episode_timesteps(starts, n))

    def __len__(self) -> int:
        return len(self.first_row)

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(rtg [B, K], obs [B, K, obs_dim], actions [B, K, act_dim], timesteps [B, K], mask [B, K])``."""
        idx = np.asarray(indices, np.int64)
        rows = self.first_row[idx, None] + np.arange(self.context_len)[None, :]
        valid = rows < self.end_row[idx, None]
        rows = torch.from_numpy(np.minimum(rows, self.end_row[idx, None] - 1))
        mask = torch.from_numpy(valid.astype(np.float32))
        return self.rtg[rows], self.observations[rows], self.actions[rows], self.timesteps[rows], mask

    def iter_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for lo in range(0, len(indices), batch_size):
            yield self.get(indices[lo : lo + batch_size])


# ---------------------------------------------------------------------------------- training


def model_config(cfg: Mapping[str, Any], labeled: LabeledTrajectories) -> DTConfig:
    """The :class:`DTConfig` a resolved training config and a dataset imply."""
    discrete = is_discrete(labeled.attrs)
    return DTConfig(
        obs_dim=int(labeled.observations.shape[1]),
        act_dim=int(labeled.actions.shape[1]),
        context_len=cfg["context_len"],
        max_timestep=max_timestep(labeled),
        obs_cardinalities=[int(c) for c in labeled.attrs["obs_cardinalities"]] if discrete else None,
        num_actions=int(labeled.attrs["num_actions"]) if discrete else None,
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=cfg["dropout"],
    )


def make_optimizer(model: DecisionTransformer, cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """minGPT/DT-Atari's grouping: weight decay on linear weights only."""
    return adamw(model, cfg)


def _fingerprint(labeled: LabeledTrajectories) -> dict:
    """Shapes plus a content hash, so a partial checkpoint is never resumed on different data."""
    digest = hashlib.sha256()
    arrays = (
        (labeled.observations, np.float32),
        (labeled.actions, np.float32),
        (labeled.rewards, np.float32),
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


@torch.no_grad()
def score(model: DecisionTransformer, batches: Iterator[tuple[torch.Tensor, ...]]) -> dict[str, float | None]:
    """Mean per-step ``loss`` (CE or MSE) in eval mode; discrete models add ``accuracy`` and ``ll``.

    ``ll`` is the mean log-likelihood of the dataset actions in nats (the negated cross-entropy).
    """
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0.0, 0.0
    try:
        for batch in batches:
            rtg, obs, act, ts, mask = (t.to(model.device) for t in batch)
            pred = model(rtg, obs, act, ts)
            if model.cfg.discrete:
                target = act[..., 0].round().long()
                logp = torch.log_softmax(pred.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
                total -= float((logp * mask).sum())
                correct += float(((pred.argmax(-1) == target).float() * mask).sum())
            else:
                total += float((((pred - act) ** 2).mean(-1) * mask).sum())
            count += float(mask.sum())
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    if not model.cfg.discrete:
        return {"loss": loss, "accuracy": None, "ll": None}
    return {"loss": loss, "accuracy": correct / count if count else float("nan"), "ll": -loss}


def train_step(
    model: DecisionTransformer,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    lr: float,
    grad_clip: float,
    dropout_seed: int,
) -> float:
    """One update on DT's action loss (cross-entropy or MSE over the unpadded steps)."""
    return optimizer_step(
        model,
        optimizer,
        lambda: model.action_loss(*(t.to(model.device) for t in batch)),
        lr,
        grad_clip,
        dropout_seed,
    )


def train_dt(
    cfg: Mapping[str, Any],
    *,
    labeled: LabeledTrajectories,
    seed: int,
    out_path: str | Path,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train a :class:`DecisionTransformer` on ``labeled`` and save it at ``out_path``.

    Resumes from ``<out_path>.partial.pt`` when present (written every ``checkpoint_every`` steps).
    ``stop_after`` ends this call after that many optimizer steps, leaving the partial checkpoint for
    a later call; the result then has ``completed: False``. Returns the metrics also stored in the
    checkpoint.
    """
    cfg = resolve_config(cfg)
    _check_data(labeled)
    mcfg = model_config(cfg, labeled)
    starts = labeled.episode_starts
    train_ids, valid_ids = split_episodes(starts, len(labeled.rewards), cfg["valid_fraction"], seed)
    scale = cfg["return_scale"] or default_return_scale(labeled.rewards, starts)
    rtg_scaled = returns_to_go(labeled.rewards, starts) / scale
    train_windows = DTWindows(labeled, rtg_scaled, cfg["context_len"], train_ids)
    valid_windows = DTWindows(labeled, rtg_scaled, cfg["context_len"], valid_ids)
    data = _fingerprint(labeled)
    with seeded(derived_seed(seed, 0), torch.device(device)):
        model = DecisionTransformer(mcfg)
    if not mcfg.discrete:
        train_rows = np.concatenate(
            [np.arange(s, e) for s, e in zip(starts[train_ids], labeled.episode_ends[train_ids], strict=True)]
        )
        obs = torch.from_numpy(np.asarray(labeled.observations[train_rows], np.float64))
        model.obs_mean.copy_(obs.mean(0).float())
        model.obs_std.copy_(obs.std(0).clamp_min(1e-6).float())
    train_eval = eval_subset(len(train_windows), cfg["eval_windows"])
    valid_eval = eval_subset(len(valid_windows), cfg["eval_windows"])

    def evaluate() -> dict[str, Any]:
        train_score = score(model, train_windows.iter_batches(train_eval, 256))
        valid_score = score(model, valid_windows.iter_batches(valid_eval, 256))
        return {
            "train_eval_loss": train_score["loss"],
            "heldout_loss": valid_score["loss"],
            "train_accuracy": train_score["accuracy"],
            "heldout_accuracy": valid_score["accuracy"],
            "train_ll_per_token": train_score["ll"],
            "heldout_ll_per_token": valid_score["ll"],
        }

    job = TrainingJob(
        kind="DT",
        model=model,
        make_optimizer=make_optimizer,
        batch=shuffled_batches(train_windows, seed, cfg["batch_size"]),
        step=train_step,
        evaluate=evaluate,
        shown_score=("heldout_loss", "heldout_loss"),
        data=data,
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
        "return_scale": scale,
        "steps": cfg["steps"],
        "seconds": run.seconds,
        "num_params": model.num_params(),
        "num_train_windows": len(train_windows),
        "num_heldout_windows": len(valid_windows),
        "history": run.history,
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": mcfg.to_dict(),
        "train_config": cfg,
        "seed": int(seed),
        "return_scale": scale,
        "state_dict": cpu_state(model),
        "metrics": metrics,
        "data": {**data, "train_episodes": train_ids.tolist(), "heldout_episodes": valid_ids.tolist()},
    }
    save_final(out_path, checkpoint)
    return metrics


def _plain(value: Any) -> Any:
    """Tuples compare equal to lists here: a checkpoint stores ``obs_cardinalities`` as a list."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def load_dt(
    path: str | Path, *, expect: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[DecisionTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`train_dt` as an eval-mode model on ``device``.

    ``expect`` holds model-config values the caller relies on (e.g. ``obs_dim``, ``num_actions``,
    ``obs_cardinalities``); a mismatch is a CheckpointError naming the key, expected and found values.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, device, "DT")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    stored = ckpt.get("config", {})
    for key, value in (expect or {}).items():
        if key not in stored:
            raise CheckpointError(f"{path}: expected config key {key!r}, which the checkpoint does not have")
        if _plain(stored[key]) != _plain(value):
            raise CheckpointError(f"{path}: {key} expected {value!r}, found {stored[key]!r}")
    try:
        model = DecisionTransformer(DTConfig(**stored))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: config and weights do not form a valid model ({exc})") from exc
    return model.to(device).eval(), ckpt
