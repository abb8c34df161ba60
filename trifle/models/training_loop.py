"""The optimizer-step loop all trainers run: schedule, periodic evaluation, resumable checkpoints.

A trainer (GPT, Decision Transformer, ...) describes what is particular to its model in a
:class:`TrainingJob` and hands it to :func:`run_training`. Everything that must behave identically
for every model lives here once, so it cannot drift between copies: which step gets which batch,
learning rate and dropout seed, when evaluations and partial checkpoints happen, and how a run that
was stopped or killed resumes so that it ends bit-identical to an uninterrupted one.

Resume works without saved RNG state because every random draw of step ``t`` is a function of
``(seed, t)``: the batch (the job's ``batch(t)``, usually :func:`shuffled_batches`) and the dropout
masks (``derived_seed(seed, 2, t)``, passed to the job's ``step``). A partial checkpoint therefore
only needs the weights, the optimizer state, the step, the evaluation history and the running loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from trifle.io import atomic_path
from trifle.models.training_common import (
    batch_indices,
    check_partial,
    cpu_state,
    derived_seed,
    learning_rate,
    load_checkpoint,
    partial_path,
    seeded,
)

#: ``step(model, optimizer, batch, lr, grad_clip, dropout_seed) -> loss``: one optimizer update.
StepFn = Callable[[torch.nn.Module, torch.optim.Optimizer, Any, float, float, int], float]


class Windows(Protocol):
    """Training samples addressable by index, as ``TransitionWindows`` and ``DTWindows`` are."""

    def __len__(self) -> int: ...

    def get(self, indices: Any) -> Any: ...


@dataclass(frozen=True)
class TrainingJob:
    """What differs between models; :func:`run_training` supplies everything else.

    ``cfg`` (given to :func:`run_training`) must hold the keys the loop reads: ``learning_rate``,
    ``warmup_steps`` and ``min_lr_fraction`` (the schedule), ``grad_clip``, ``eval_every`` and
    ``checkpoint_every`` (0 disables either).
    """

    kind: str  # "GPT", "DT": names the progress bar and the checkpoint in error messages
    model: torch.nn.Module
    make_optimizer: Callable[[torch.nn.Module, Mapping[str, Any]], torch.optim.Optimizer]
    batch: Callable[[int], Any]  # the training batch of optimizer step t; must depend on t only
    step: StepFn
    evaluate: Callable[[], dict[str, Any]]  # scores added to the running train loss at each evaluation
    shown_score: tuple[str, str]  # (progress-bar label, key of an ``evaluate`` score)
    data: dict[str, Any]  # data fingerprint: a partial checkpoint of other data is refused
    partial_format: str
    resume_free_keys: Collection[str] = frozenset({"checkpoint_every"})  # cfg keys a resume may change


@dataclass(frozen=True)
class Outcome:
    """How a :func:`run_training` call ended."""

    completed: bool
    steps: int  # optimizer steps done so far, over all calls
    seconds: float  # training time over all calls
    history: list[dict[str, Any]]  # one record per evaluation: step, train_loss, the job's scores
    final: dict[str, Any] | None  # the last record (the end-of-training evaluation); None if stopped

    @property
    def final_scores(self) -> dict[str, Any]:
        """The last record without its step, as the trainers' metrics report it."""
        return {k: v for k, v in (self.final or {}).items() if k != "step"}

    def stopped_metrics(self) -> dict[str, Any]:
        """What a trainer returns for a call that ``stop_after`` ended early."""
        return {"completed": False, "steps": self.steps, "seconds": self.seconds}


def shuffled_batches(windows: Windows, seed: int, batch_size: int) -> Callable[[int], Any]:
    """``batch(t)`` for :class:`TrainingJob`: slice ``t`` of a fresh permutation of ``windows`` per epoch."""
    return lambda step: windows.get(batch_indices(seed, step, batch_size, len(windows)))


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    lr: float,
    grad_clip: float,
    dropout_seed: int,
) -> float:
    """One update on ``loss_fn()``; it runs under ``dropout_seed`` so that a resume replays its masks."""
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    with seeded(dropout_seed, device):
        loss = loss_fn()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def run_training(
    job: TrainingJob,
    cfg: Mapping[str, Any],
    *,
    seed: int,
    total_steps: int,
    out_path: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
) -> Outcome:
    """Train ``job.model`` (moved to ``device``) to ``total_steps``, resuming ``<out_path>.partial.pt``.

    A partial checkpoint is written every ``checkpoint_every`` steps and when ``stop_after`` steps of
    this call are done; it is resumed only if its seed, data fingerprint and ``cfg`` (minus
    ``job.resume_free_keys``) match, else CheckpointError. The job is evaluated every ``eval_every``
    steps and once at the end. The final checkpoint is the trainer's to write, with :func:`save_final`.
    """
    dev = torch.device(device)
    partial = partial_path(Path(out_path))
    identity = {"seed": int(seed), "data": job.data, "cfg": cfg}
    model = job.model.to(dev)
    optimizer = job.make_optimizer(model, cfg)
    state = {"step": 0, "history": [], "loss_sum": 0.0, "loss_count": 0, "seconds": 0.0}
    if partial.exists():
        saved = load_checkpoint(partial, dev, job.kind)
        check_partial(
            partial, saved, identity, partial_format=job.partial_format, resume_free_keys=job.resume_free_keys
        )
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in state}

    def save_partial() -> None:
        with atomic_path(partial) as tmp:
            payload = {"format": job.partial_format, **identity, "state_dict": cpu_state(model)}
            torch.save({**payload, "optimizer": optimizer.state_dict(), **state}, tmp)

    def evaluate() -> dict[str, Any]:
        count = state["loss_count"]
        record = {
            "step": state["step"],
            "train_loss": state["loss_sum"] / count if count else float("nan"),
            **job.evaluate(),
        }
        state["history"].append(record)
        state["loss_sum"], state["loss_count"] = 0.0, 0
        return record

    def outcome(final: dict[str, Any] | None) -> Outcome:
        return Outcome(final is not None, state["step"], state["seconds"], state["history"], final)

    began = time.perf_counter()
    steps_this_call, shown = 0, "?"
    label, score = job.shown_score
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=job.kind.lower(),
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        while state["step"] < total_steps:
            if stop_after is not None and steps_this_call >= stop_after:
                state["seconds"] += time.perf_counter() - began
                save_partial()
                return outcome(None)
            step = state["step"]
            batch = job.batch(step)
            lr = learning_rate(cfg, step, total_steps)
            loss = job.step(model, optimizer, batch, lr, cfg["grad_clip"], derived_seed(seed, 2, step))
            state["step"], steps_this_call = step + 1, steps_this_call + 1
            state["loss_sum"] += loss
            state["loss_count"] += 1
            bar.update(1)
            if cfg["eval_every"] and state["step"] % cfg["eval_every"] == 0 and state["step"] < total_steps:
                shown = f"{evaluate()[score]:.3f}"
            bar.set_postfix(refresh=False, loss=f"{loss:.3f}", **{label: shown})
            if cfg["checkpoint_every"] and state["step"] % cfg["checkpoint_every"] == 0:
                state["seconds"] += time.perf_counter() - began
                began = time.perf_counter()
                save_partial()

    final = evaluate()  # the loop skips evaluating at the last step, so this record is never a duplicate
    state["seconds"] += time.perf_counter() - began
    return outcome(final)


def save_final(out_path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write the finished model atomically, then drop the partial so that a rerun retrains, not resumes."""
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        torch.save(checkpoint, tmp)
    partial_path(out_path).unlink(missing_ok=True)
