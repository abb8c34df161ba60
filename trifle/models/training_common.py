"""What the GPT and Decision Transformer trainers share: seed-derived randomness, the learning-rate
schedule, the optimizer's parameter groups, and resumable checkpoints. The loop that puts these together
is ``training_loop``; the checks of single settings are ``setting_checks``' (torch-free, for config
validation).

Reproducibility is by construction: the init, the minibatch of step ``t`` and its dropout masks are
functions of ``(seed, t)``, so a run resumed from ``<out_path>.partial.pt`` replays exactly the steps
of an uninterrupted one. A partial checkpoint is only resumed when its seed, data fingerprint and
training settings (minus those that cannot change the weights) equal the current ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.errors import CheckpointError


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG streams."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def derived_seed(seed: int, *path: int) -> int:
    """A well-mixed 63-bit seed for sub-stream ``path`` of ``seed`` (init, dropout of step t, ...)."""
    return int(np.random.SeedSequence([int(seed), *path]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def batch_indices(seed: int, step: int, batch_size: int, num_windows: int) -> np.ndarray:
    """Window indices of optimizer step ``step``: slice ``step`` of a per-epoch random permutation.

    A pure function of its arguments, so a resumed run draws exactly the batches it would have.
    """
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_windows)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng(np.random.SeedSequence([int(seed), 1, int(epoch)])).permutation(
            num_windows
        )
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def learning_rate(cfg: Mapping[str, Any], step: int, total_steps: int) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr_fraction`` of it (as TT)."""
    base = cfg["learning_rate"]
    if step < cfg["warmup_steps"]:
        return base * (step + 1) / cfg["warmup_steps"]
    span = max(1, total_steps - cfg["warmup_steps"])
    progress = min(1.0, (step - cfg["warmup_steps"]) / span)
    floor = cfg["min_lr_fraction"]
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def adamw(
    model: torch.nn.Module, cfg: Mapping[str, Any], also_decay: Collection[str] = ()
) -> torch.optim.AdamW:
    """AdamW decaying only linear-layer weights (and ``also_decay``), as minGPT, TT and DT do.

    Pulling biases, norm gains and embeddings toward zero only hurts; ``cfg`` gives ``learning_rate``,
    ``betas`` and ``weight_decay``.
    """
    decay = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    decay.update(also_decay)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n in decay], "weight_decay": cfg["weight_decay"]},
        {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=tuple(cfg["betas"]))


def eval_subset(num_windows: int, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced window indices: deterministic and covering all episodes."""
    if num_windows <= limit:
        return np.arange(num_windows)
    return np.unique(np.linspace(0, num_windows - 1, limit).round().astype(np.int64))


def partial_path(out_path: Path) -> Path:
    """Where the resumable checkpoint of a run writing ``out_path`` lives."""
    return out_path.with_name(out_path.name + ".partial.pt")


def load_checkpoint(path: Path, device: str | torch.device, kind: str) -> dict:
    """A trifle checkpoint dict; any unreadable or foreign file is a CheckpointError naming ``path``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        # One short line: torch's messages can run to several, with advice that does not apply here.
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}" if first and len(first) <= 120 else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint, expected a trifle {kind} checkpoint ({reason})"
        ) from exc
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path}: not a trifle {kind} checkpoint (no 'format' entry)")
    return obj


def check_partial(
    path: Path, saved: dict, current: dict, *, partial_format: str, resume_free_keys: Collection[str]
) -> None:
    """Raise CheckpointError naming the first setting that differs between ``saved`` and ``current``."""
    if saved.get("format") != partial_format:
        raise CheckpointError(f"{path}: format {saved.get('format')!r}, expected {partial_format!r}")
    for section in ("seed", "data", "cfg"):
        old, new = saved.get(section), current[section]
        if section == "cfg":
            old = {k: v for k, v in (old or {}).items() if k not in resume_free_keys}
            new = {k: v for k, v in new.items() if k not in resume_free_keys}
        if isinstance(new, dict) and isinstance(old, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    raise CheckpointError(
                        f"{path}: cannot resume, {section}.{key} is {old.get(key)!r} in the checkpoint but "
                        f"{new.get(key)!r} now (delete the file to start over)"
                    )
        elif old != new:
            raise CheckpointError(
                f"{path}: cannot resume, {section} is {old!r} in the checkpoint but {new!r} now"
            )


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's parameters, for checkpoints."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
