"""The Decision Transformer's training settings: the defaults (:data:`DT_CONFIG`) and their checks.

The trainer (``dt_training``) reads its settings through :func:`resolve_config`, and config composition
(trifle.config) runs it on every composed config, so a bad ``dt.*`` value fails before any stage
starts. This module imports no torch: the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trifle.errors import ConfigError
from trifle.models.setting_checks import betas_setting, float_setting, int_setting

#: DT's gym (D4RL) settings from the DT paper and ``gym/experiment.py``; the defaults of missing keys.
DT_CONFIG: dict[str, Any] = {
    "n_layer": 3,
    "n_head": 1,
    "n_embd": 128,
    "dropout": 0.1,
    "context_len": 20,
    "batch_size": 64,
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "betas": (0.9, 0.999),
    "grad_clip": 0.25,
    "steps": 100_000,
    "warmup_steps": 10_000,
    "min_lr_fraction": 1.0,  # 1.0: constant after warmup (gym DT); < 1: cosine decay to this fraction
    "return_scale": 1000.0,  # null: the largest |episode return| in the dataset
    "valid_fraction": 0.05,
    "eval_every": 10_000,
    "eval_windows": 1024,
    "checkpoint_every": 5_000,
    "target_return": None,  # conditioning target for rollouts (raw units); null: the planner config's
}

#: Keys that only configure rollouts; they never change training, so a stage slice may leave them out.
ROLLOUT_KEYS = ("target_return",)
#: Keys that change the trained model (what a Snakemake rule for ``train_dt`` should depend on).
TRAINING_KEYS = tuple(k for k in DT_CONFIG if k not in ROLLOUT_KEYS)


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a DT config (missing keys take :data:`DT_CONFIG` values) and return plain types."""
    unknown = sorted(set(cfg) - set(DT_CONFIG))
    if unknown:
        raise ConfigError(f"dt.{unknown[0]}: unknown key; known keys are {', '.join(sorted(DT_CONFIG))}")
    full = {**DT_CONFIG, **dict(cfg)}
    out: dict[str, Any] = {}
    for key in ("n_layer", "n_head", "n_embd", "context_len", "batch_size", "steps", "eval_windows"):
        out[key] = int_setting(full, "dt", key, 1)
    for key in ("warmup_steps", "eval_every", "checkpoint_every"):
        out[key] = int_setting(full, "dt", key, 0)
    if out["n_embd"] % out["n_head"]:
        raise ConfigError(f"dt.n_embd: {out['n_embd']} must be divisible by dt.n_head={out['n_head']}")
    out["dropout"] = float_setting(full, "dt", "dropout", 0.0, 0.99)
    out["learning_rate"] = float_setting(full, "dt", "learning_rate", 0.0, 10.0, open_low=True)
    out["weight_decay"] = float_setting(full, "dt", "weight_decay", 0.0, 10.0)
    out["grad_clip"] = float_setting(full, "dt", "grad_clip", 0.0, math.inf)
    out["min_lr_fraction"] = float_setting(full, "dt", "min_lr_fraction", 0.0, 1.0)
    out["valid_fraction"] = float_setting(full, "dt", "valid_fraction", 0.0, 0.99, open_low=True)
    out["betas"] = betas_setting(full, "dt")
    out["return_scale"] = (
        None
        if full["return_scale"] is None
        else float_setting(full, "dt", "return_scale", 0.0, math.inf, open_low=True)
    )
    target = full["target_return"]
    if target is not None:
        target = float_setting(full, "dt", "target_return", -math.inf, math.inf)
    out["target_return"] = target
    return out
