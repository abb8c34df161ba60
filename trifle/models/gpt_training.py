"""Train and load the trajectory GPT: TT's recipe (AdamW, warmup + cosine, action-weighted loss).

Reproducibility is by construction rather than by saved RNG state: the model init is a function of
``seed``, the minibatch at optimizer step ``t`` is a function of ``(seed, t)`` (a fresh permutation
of the training windows per epoch), and the dropout masks of step ``t`` come from a generator seeded
with ``(seed, t)``. A run resumed from ``<out_path>.partial.pt`` therefore replays exactly the same
steps as an uninterrupted one, and ends with bit-identical weights (same machine and threads).

The step loop, schedule, evaluations and partial checkpoints are ``training_loop``'s, shared with the
other trainers; this module supplies what is the GPT's: the model, its optimizer, batches, loss and scores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.data.windows import TransitionWindows, split_episodes
from trifle.errors import CheckpointError, ConfigError
from trifle.models.gpt import GPTConfig, TrajectoryGPT
from trifle.models.gpt_settings import SMALL_CONFIG as SMALL_CONFIG
from trifle.models.gpt_settings import TT_CONFIG as TT_CONFIG
from trifle.models.gpt_settings import resolve_config
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

# The settings (TT_CONFIG, SMALL_CONFIG and resolve_config) are defined in the torch-free gpt_settings,
# which config validation imports; they are imported here so that the trainer's users find them here too.

CHECKPOINT_FORMAT = "trifle-gpt/1"
PARTIAL_FORMAT = "trifle-gpt-partial/1"

# Keys whose change does not alter the trained weights, so a resume may ignore them.
_RESUME_FREE_KEYS = {"checkpoint_every"}


def model_config(cfg: Mapping[str, Any], obs_dim: int, act_dim: int, vocab_size: int) -> GPTConfig:
    """The :class:`GPTConfig` a resolved training config implies (block = whole transitions)."""
    return GPTConfig(
        obs_dim=int(obs_dim),
        act_dim=int(act_dim),
        vocab_size=int(vocab_size),
        block_size=cfg["seq_transitions"] * (int(obs_dim) + int(act_dim) + 2),
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=cfg["dropout"],
        action_weight=cfg["action_weight"],
        reward_weight=cfg["reward_weight"],
        value_weight=cfg["value_weight"],
        value_inputs=cfg["value_inputs"],
    )


def make_optimizer(model: TrajectoryGPT, cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """TT's grouping: the per-column output head is a bare parameter, not a Linear, but it decays too."""
    return adamw(model, cfg, also_decay=("head_weight",))


def data_fingerprint(tokens: np.ndarray, episode_starts: np.ndarray, episode_terminal: np.ndarray) -> dict:
    """Shapes plus a content hash of a token file's arrays, stored in every GPT checkpoint.

    Public because two readers compare against it: a partial checkpoint is never resumed on different data
    (the training loop), and a trained GPT is only used with the tokens it was trained on
    (trifle.models.gpt_checkpoint.load_checked_gpt).
    """
    digest = hashlib.sha256()
    for array, dtype in ((tokens, np.int64), (episode_starts, np.int64), (episode_terminal, np.bool_)):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return {
        "rows": int(tokens.shape[0]),
        "transition_dim": int(tokens.shape[1]),
        "episodes": int(len(episode_starts)),
        "sha256": digest.hexdigest(),
    }


def train_step(
    model: TrajectoryGPT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
    grad_clip: float,
    dropout_seed: int,
) -> float:
    """One update on TT's action-weighted loss: the unit of work of training and of the GPU timings."""
    device = model.head_bias.device
    return optimizer_step(
        model, optimizer, lambda: model.loss(*(t.to(device) for t in batch)), lr, grad_clip, dropout_seed
    )


def train_gpt(
    cfg: Mapping[str, Any],
    *,
    tokens: np.ndarray,
    episode_starts: np.ndarray,
    episode_terminal: np.ndarray,
    obs_dim: int,
    act_dim: int,
    vocab_size: int,
    seed: int,
    out_path: str | Path,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train a :class:`TrajectoryGPT` on tokenized transitions and save it at ``out_path``.

    Resumes from ``<out_path>.partial.pt`` when present (written every ``checkpoint_every`` steps).
    ``stop_after`` ends this call after that many optimizer steps, leaving the partial checkpoint
    for a later call (for time-limited cluster jobs); the result then has ``completed: False``.
    Returns the metrics dict also stored in the checkpoint.
    """
    cfg = resolve_config(cfg)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != obs_dim + act_dim + 2:
        raise ConfigError(
            f"obs_dim/act_dim: tokens have shape {tokens.shape}, expected [rows, obs_dim + act_dim + 2 = "
            f"{obs_dim + act_dim + 2}]"
        )
    mcfg = model_config(cfg, obs_dim, act_dim, vocab_size)
    train_ids, valid_ids = split_episodes(episode_starts, len(tokens), cfg["valid_fraction"], seed)
    window_args = (tokens, episode_starts, episode_terminal, cfg["seq_transitions"], mcfg.stop_token)
    train_windows = TransitionWindows(*window_args, train_ids)
    valid_windows = TransitionWindows(*window_args, valid_ids)
    total_steps = cfg["steps"] or math.ceil(cfg["epochs"] * len(train_windows) / cfg["batch_size"])
    data = data_fingerprint(tokens, episode_starts, episode_terminal)
    with seeded(derived_seed(seed, 0), torch.device(device)):
        model = TrajectoryGPT(mcfg)
    train_eval = eval_subset(len(train_windows), cfg["eval_windows"])
    valid_eval = eval_subset(len(valid_windows), cfg["eval_windows"])

    def evaluate() -> dict[str, float]:
        return {
            "train_ll_per_token": model.mean_log_likelihood(train_windows.iter_batches(train_eval, 256)),
            "heldout_ll_per_token": model.mean_log_likelihood(valid_windows.iter_batches(valid_eval, 256)),
        }

    job = TrainingJob(
        kind="GPT",
        model=model,
        make_optimizer=make_optimizer,
        batch=shuffled_batches(train_windows, seed, cfg["batch_size"]),
        step=train_step,
        evaluate=evaluate,
        shown_score=("heldout_ll", "heldout_ll_per_token"),
        data=data,
        partial_format=PARTIAL_FORMAT,
        resume_free_keys=_RESUME_FREE_KEYS,
    )
    run = run_training(
        job,
        cfg,
        seed=seed,
        total_steps=total_steps,
        out_path=out_path,
        device=device,
        progress=progress,
        stop_after=stop_after,
    )
    if not run.completed:
        return run.stopped_metrics()
    metrics = {
        "completed": True,
        **run.final_scores,  # train_loss, train_ll_per_token, heldout_ll_per_token
        "steps": total_steps,
        "seconds": run.seconds,
        "num_params": model.num_params(),
        "tokens_per_step": cfg["batch_size"] * mcfg.block_size,
        "num_train_windows": len(train_windows),
        "num_heldout_windows": len(valid_windows),
        "history": run.history,
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": mcfg.to_dict(),
        "train_config": cfg,
        "seed": int(seed),
        "state_dict": cpu_state(model),
        "metrics": metrics,
        "data": {**data, "train_episodes": train_ids.tolist(), "heldout_episodes": valid_ids.tolist()},
    }
    save_final(out_path, checkpoint)
    return metrics


def load_gpt(
    path: str | Path, *, expect: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[TrajectoryGPT, dict[str, Any]]:
    """Load a checkpoint written by :func:`train_gpt` as an eval-mode model on ``device``.

    ``expect`` holds model-config values the caller relies on (e.g. ``obs_dim``, ``act_dim``,
    ``vocab_size``); any mismatch is a CheckpointError naming the key, the expected and found values.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, device, "GPT")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    stored = ckpt.get("config", {})
    for key, value in (expect or {}).items():
        if key not in stored:
            raise CheckpointError(f"{path}: expected config key {key!r}, which the checkpoint does not have")
        if stored[key] != value:
            raise CheckpointError(f"{path}: {key} expected {value!r}, found {stored[key]!r}")
    try:
        model = TrajectoryGPT(GPTConfig(**stored))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: config and weights do not form a valid model ({exc})") from exc
    return model.to(device).eval(), ckpt
