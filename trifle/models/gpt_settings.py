"""The trajectory GPT's training settings: the defaults (:data:`TT_CONFIG`) and their checks.

The trainer (``gpt_training``) reads its settings through :func:`resolve_config`, and config
composition (trifle.config) runs it on every composed config, so a bad ``gpt.*`` value fails before any
stage starts. This module imports no torch: the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trifle.errors import ConfigError
from trifle.models.setting_checks import betas_setting, float_setting, int_setting, steps_or_epochs

#: How the GPT treats value tokens (trifle.models.gpt): ``read`` as inputs, ``masked`` as outputs only,
#: ``unattended`` as TT does (embedded, but no position attends to a value token).
VALUE_INPUTS = ("read", "masked", "unattended")

#: Trajectory Transformer's published GPT settings (config/offline.py); pick ``steps`` or ``epochs``.
TT_CONFIG: dict[str, Any] = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "dropout": 0.1,
    "seq_transitions": 10,
    "batch_size": 256,
    "learning_rate": 6e-4,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "steps": None,
    "epochs": None,
    "warmup_steps": 1000,
    "min_lr_fraction": 0.1,
    "action_weight": 5.0,
    "reward_weight": 1.0,
    "value_weight": 1.0,
    "value_inputs": "read",
    "valid_fraction": 0.05,
    "eval_every": 1000,
    "eval_windows": 1024,
    "checkpoint_every": 1000,
}

#: A CPU-friendly model for the quick workflow (toy-text tasks, smoke runs).
SMALL_CONFIG: dict[str, Any] = {**TT_CONFIG, "n_layer": 2, "n_head": 2, "n_embd": 64, "batch_size": 64}


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a training config (missing keys take :data:`TT_CONFIG` values) and return plain types."""
    unknown = sorted(set(cfg) - set(TT_CONFIG))
    if unknown:
        raise ConfigError(f"gpt.{unknown[0]}: unknown key; known keys are {', '.join(sorted(TT_CONFIG))}")
    full = {**TT_CONFIG, **dict(cfg)}
    out: dict[str, Any] = {}
    for key in ("n_layer", "n_head", "n_embd", "seq_transitions", "batch_size", "eval_windows"):
        out[key] = int_setting(full, "gpt", key, 1)
    for key in ("warmup_steps", "eval_every", "checkpoint_every"):
        out[key] = int_setting(full, "gpt", key, 0)
    if out["n_embd"] % out["n_head"]:
        raise ConfigError(f"gpt.n_embd: {out['n_embd']} must be divisible by gpt.n_head={out['n_head']}")
    out["dropout"] = float_setting(full, "gpt", "dropout", 0.0, 0.99)
    out["learning_rate"] = float_setting(full, "gpt", "learning_rate", 0.0, 10.0, open_low=True)
    out["weight_decay"] = float_setting(full, "gpt", "weight_decay", 0.0, 10.0)
    out["grad_clip"] = float_setting(full, "gpt", "grad_clip", 0.0, math.inf)
    out["min_lr_fraction"] = float_setting(full, "gpt", "min_lr_fraction", 0.0, 1.0)
    out["valid_fraction"] = float_setting(full, "gpt", "valid_fraction", 0.0, 0.99, open_low=True)
    for key in ("action_weight", "reward_weight", "value_weight"):
        out[key] = float_setting(full, "gpt", key, 0.0, math.inf)
    out["betas"] = betas_setting(full, "gpt")
    out["steps"], out["epochs"] = steps_or_epochs(full, "gpt")
    if full["value_inputs"] not in VALUE_INPUTS:
        raise ConfigError(
            f"gpt.value_inputs: expected one of {', '.join(VALUE_INPUTS)}, got {full['value_inputs']!r}"
        )
    out["value_inputs"] = full["value_inputs"]
    return out
