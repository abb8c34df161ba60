"""Train and load the two auxiliary return models of the inference-time optimality score.

The score (docs/evaluation.md#optimality-score) compares what an executed action is worth with what the
offline data does in the same state, through two models of the discounted return from step t,
``G_t = r_t + gamma V_t`` (the labels' ``V_t`` starts after ``r_t``; adding ``r_t`` lets the score see the
action's own reward):

* kind ``state``: ``p^s(G_t | s_t)``, the data's return distribution in a state;
* kind ``action``: ``p^a(G_t | s_t, a_t)``, its return distribution after a given action.

Both are the project's :class:`~trifle.models.gpt.TrajectoryGPT` over one transition row: the state
tokens (and, for ``action``, the action tokens) of the task's discretizer, then the return token. The
row is laid out in the GPT's own columns, so the return token falls in the column right after the
conditioning tokens (the first action column for ``state``, the reward column for ``action``), and only
that token is a training target (the conditioning tokens are masked out of the loss): the score needs the
conditional, not a model of the states. No past transitions are in the context: an executed
trajectory's past values are unknown at time t, or, filled with realized returns, reveal the future;
the toy tasks are Markov.

``G_t`` gets its own quantile bins (:func:`trifle.data.discretize.fit_quantile`), fit on the training
episodes' returns only and stored in the checkpoint with their decoded values (the in-bin means), so the
score reads returns in the units of the data. The task's discretizer is stored too, so an executed state
or action is encoded exactly as the training rows were.

Training is the shared loop's (``training_loop``): init a function of ``seed``, the minibatch of step t
a function of ``(seed, t)``, dropout masks of step t seeded by ``(seed, t)``, so a run resumed from
``<out_path>.partial.pt`` ends bit-identical. Held-out episodes are :func:`split_episodes`' with the same
seed and ``valid_fraction``, i.e. the GPT's when the fractions agree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.data.discretize import ColumnBins, Discretizer, fit_quantile
from trifle.data.labels import LabeledTrajectories
from trifle.data.tokens import TokenData
from trifle.data.windows import split_episodes
from trifle.errors import CheckpointError, ConfigError, DataError
from trifle.models.aux_settings import AUX_CONFIG as AUX_CONFIG
from trifle.models.aux_settings import KINDS as KINDS
from trifle.models.aux_settings import resolve_config
from trifle.models.gpt import GPTConfig, TrajectoryGPT
from trifle.models.gpt_training import train_step
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
    run_training,
    save_final,
    shuffled_batches,
)

# The settings (KINDS, AUX_CONFIG and resolve_config) are defined in the torch-free aux_settings, which
# config validation imports; they are imported here so that the trainer's users find them here too.

CHECKPOINT_FORMAT = "trifle-aux/1"
PARTIAL_FORMAT = "trifle-aux-partial/1"
# Keys whose change does not alter the trained weights, so a resume may ignore them.
_RESUME_FREE_KEYS = {"checkpoint_every"}


def discounted_returns(labeled: LabeledTrajectories, discount: float) -> np.ndarray:
    """``G_t = r_t + discount * V_t`` per row: the return from step t, the action's own reward included."""
    if not 0.0 <= float(discount) <= 1.0:
        raise ConfigError(f"task.labels.discount: expected a number in [0, 1], got {discount!r}")
    return np.asarray(labeled.rewards, np.float64) + float(discount) * np.asarray(labeled.values, np.float64)


def context_width(kind: str, obs_dim: int, act_dim: int) -> int:
    """Conditioning tokens per row: the state's, plus the action's for ``action``."""
    return obs_dim + (act_dim if kind == "action" else 0)


def model_config(cfg: Mapping[str, Any], obs_dim: int, act_dim: int, vocab_size: int) -> GPTConfig:
    """One transition row of the GPT's layout; equal column weights, since only the return is a target."""
    return GPTConfig(
        obs_dim=int(obs_dim),
        act_dim=int(act_dim),
        vocab_size=int(vocab_size),
        block_size=context_width(cfg["kind"], obs_dim, act_dim),
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=cfg["dropout"],
        action_weight=1.0,
        reward_weight=1.0,
        value_weight=1.0,
    )


class ReturnRows:
    """Training samples: a row's conditioning tokens as input, its return token as the only target.

    ``get`` gives ``(x, y, mask)`` as the GPT's loss takes them: ``y`` is ``x`` shifted by one with the
    return token last, and ``mask`` keeps only that last target.
    """

    def __init__(self, context: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> None:
        self.context = np.ascontiguousarray(context[rows], dtype=np.int64)
        self.targets = np.ascontiguousarray(targets[rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def get(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = self.context[idx]
        y = np.concatenate([x[:, 1:], self.targets[idx, None]], axis=1)
        mask = np.zeros(x.shape, np.float32)
        mask[:, -1] = 1.0
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)

    def iter_batches(
        self, indices: np.ndarray, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for lo in range(0, len(indices), batch_size):
            yield self.get(indices[lo : lo + batch_size])


def episode_rows(episode_starts: np.ndarray, num_rows: int, episode_ids: np.ndarray) -> np.ndarray:
    """The row indices of the chosen episodes, in order."""
    ends = np.append(episode_starts[1:], num_rows)
    return np.concatenate([np.arange(episode_starts[e], ends[e]) for e in episode_ids]).astype(np.int64)


def _fingerprint(tokens: np.ndarray, returns: np.ndarray, episode_starts: np.ndarray) -> dict:
    """Shapes plus a content hash of the whole data, the same for both kinds: a partial checkpoint is never
    resumed on other data, and a state and an action model can be checked to come from the same data."""
    digest = hashlib.sha256()
    for array, dtype in ((tokens, np.int64), (returns, np.float64), (episode_starts, np.int64)):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return {
        "rows": int(tokens.shape[0]),
        "transition_dim": int(tokens.shape[1]),
        "episodes": int(len(episode_starts)),
        "sha256": digest.hexdigest(),
    }


def train_aux(
    cfg: Mapping[str, Any],
    *,
    tokens: TokenData,
    labeled: LabeledTrajectories,
    discount: float,
    seed: int,
    out_path: str | Path,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the ``cfg['kind']`` return model on a task's tokens and labels and save it at ``out_path``.

    ``tokens`` and ``labeled`` are the same rows (the tokens stage encodes the labeled file). Resumes from
    ``<out_path>.partial.pt``; ``stop_after`` ends the call early as the other trainers' do. Returns the
    metrics also stored in the checkpoint.
    """
    cfg = resolve_config(cfg)
    n = len(tokens.tokens)
    if len(labeled.rewards) != n or not np.array_equal(labeled.episode_starts, tokens.episode_starts):
        raise DataError(
            f"tokens ({n} rows) and labeled trajectories ({len(labeled.rewards)} rows): expected the same "
            "rows and episodes (the tokens stage encodes the labeled file)"
        )
    obs_dim, act_dim = tokens.obs_dim, tokens.act_dim
    context = tokens.tokens[:, : context_width(cfg["kind"], obs_dim, act_dim)]
    returns = discounted_returns(labeled, discount)
    train_ids, valid_ids = split_episodes(tokens.episode_starts, n, cfg["valid_fraction"], seed)
    train_rows = episode_rows(tokens.episode_starts, n, train_ids)
    valid_rows = episode_rows(tokens.episode_starts, n, valid_ids)
    bins = fit_quantile(returns[train_rows], cfg["value_bins"])
    targets = bins.encode(returns, "G")
    mcfg = model_config(cfg, obs_dim, act_dim, max(tokens.vocab_size, bins.num_bins))
    train_set = ReturnRows(context, targets, train_rows)
    valid_set = ReturnRows(context, targets, valid_rows)
    total_steps = cfg["steps"] or math.ceil(cfg["epochs"] * len(train_set) / cfg["batch_size"])
    data = {**_fingerprint(tokens.tokens, returns, tokens.episode_starts), "discount": float(discount)}
    with seeded(derived_seed(seed, 0), torch.device(device)):
        model = TrajectoryGPT(mcfg)
    train_eval = eval_subset(len(train_set), cfg["eval_rows"])
    valid_eval = eval_subset(len(valid_set), cfg["eval_rows"])

    def evaluate() -> dict[str, float]:
        return {
            "train_ll_per_token": model.mean_log_likelihood(train_set.iter_batches(train_eval, 1024)),
            "heldout_ll_per_token": model.mean_log_likelihood(valid_set.iter_batches(valid_eval, 1024)),
        }

    job = TrainingJob(
        kind=f"aux-{cfg['kind']}",
        model=model,
        make_optimizer=lambda m, c: adamw(m, c, also_decay=("head_weight",)),
        batch=shuffled_batches(train_set, seed, cfg["batch_size"]),
        step=train_step,  # a TrajectoryGPT on its own rows: the GPT's update step
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
        "kind": cfg["kind"],
        **run.final_scores,  # train_loss, train_ll_per_token, heldout_ll_per_token (nats per return token)
        "return_bins": bins.num_bins,
        "steps": total_steps,
        "seconds": run.seconds,
        "num_params": model.num_params(),
        "num_train_rows": len(train_set),
        "num_heldout_rows": len(valid_set),
        "history": run.history,
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "kind": cfg["kind"],
        "config": mcfg.to_dict(),
        "train_config": cfg,
        "seed": int(seed),
        "discount": float(discount),
        "returns": bins.to_dict(),
        "discretizer": tokens.discretizer.to_dict(),
        "state_dict": cpu_state(model),
        "metrics": metrics,
        "data": {**data, "train_episodes": train_ids.tolist(), "heldout_episodes": valid_ids.tolist()},
    }
    save_final(out_path, checkpoint)
    return metrics


@dataclass
class ReturnModel:
    """A trained return model with what it needs to read executed states and actions."""

    kind: str
    model: TrajectoryGPT
    returns: ColumnBins  # the return bins: ``returns.values`` are the decoded returns, ascending
    discretizer: Discretizer  # the task's: encodes states (and actions) as in training
    discount: float
    data_sha256: str  # the training data's hash: a state and an action model must share their data
    path: Path

    @property
    def obs_dim(self) -> int:
        return self.model.cfg.obs_dim

    @property
    def act_dim(self) -> int:
        return self.model.cfg.act_dim

    def context_tokens(self, obs: np.ndarray, actions: np.ndarray | None) -> np.ndarray:
        """The conditioning tokens of raw states ``[N, obs_dim]`` (and actions ``[N, act_dim]``)."""
        obs = np.asarray(obs, np.float64)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise DataError(f"{self.path}: states of shape {obs.shape}, expected [N, {self.obs_dim}]")
        columns = [obs[:, j] for j in range(self.obs_dim)]
        if self.kind == "action":
            if actions is None:
                raise DataError(f"{self.path}: an action model needs the actions")
            actions = np.asarray(actions, np.float64)
            if actions.shape != (len(obs), self.act_dim):
                raise DataError(
                    f"{self.path}: actions of shape {actions.shape}, expected [{len(obs)}, {self.act_dim}]"
                )
            columns += [actions[:, j] for j in range(self.act_dim)]
        coded = [
            self.discretizer.columns[j].encode(x, self.discretizer.names[j]) for j, x in enumerate(columns)
        ]
        return np.stack(coded, axis=1) if coded else np.zeros((len(obs), 0), np.int64)

    @torch.no_grad()
    def distribution(
        self, obs: np.ndarray, actions: np.ndarray | None = None, batch_size: int = 4096
    ) -> np.ndarray:
        """``[N, bins]`` probabilities of the return bins given each state (and action), float64.

        The GPT's output covers its whole vocabulary; the mass on tokens that are no return bin (never a
        training target) is dropped and the rest renormalized.
        """
        context = self.context_tokens(obs, actions)
        device = self.model.head_bias.device
        out = np.empty((len(context), self.returns.num_bins), np.float64)
        for lo in range(0, len(context), batch_size):
            x = torch.from_numpy(context[lo : lo + batch_size]).to(device)
            logits, _ = self.model(x)
            logp = torch.log_softmax(logits[:, -1, : self.returns.num_bins].double(), dim=-1)
            out[lo : lo + batch_size] = logp.exp().cpu().numpy()
        return out


def load_aux(path: str | Path, *, kind: str | None = None, device: str | torch.device = "cpu") -> ReturnModel:
    """Load a checkpoint written by :func:`train_aux` as an eval-mode :class:`ReturnModel`.

    ``kind`` (when given) must be the checkpoint's, else CheckpointError naming both.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, device, "aux")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: kind expected {kind!r}, found {ckpt.get('kind')!r}")
    try:
        model = TrajectoryGPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
        returns = ColumnBins.from_dict(ckpt["returns"])
        discretizer = Discretizer.from_dict(ckpt["discretizer"])
    except (TypeError, KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: config and weights do not form a valid model ({exc})") from exc
    return ReturnModel(
        kind=ckpt["kind"],
        model=model.to(device).eval(),
        returns=returns,
        discretizer=discretizer,
        discount=float(ckpt["discount"]),
        data_sha256=str(ckpt["data"]["sha256"]),
        path=path,
    )
