"""The IQL critic's training settings: the defaults (:data:`IQL_CONFIG`) and their checks.

The trainer (``iql_training``) reads its settings through :func:`resolve_config`, and config composition
(trifle.config) runs it on every composed config, so a bad ``critic.*`` value fails before any stage
starts. This module imports no torch: the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trifle.errors import ConfigError
from trifle.models.setting_checks import betas_setting, float_setting, int_setting

#: IQL's published Gym-MuJoCo settings (the authors' ``configs/mujoco_config.py`` and train_offline.py);
#: the defaults of missing keys. ``expectile`` 0.9 is their AntMaze setting.
IQL_CONFIG: dict[str, Any] = {
    "hidden_dim": 256,
    "n_hidden": 2,
    "expectile": 0.7,
    "target_update": 0.005,  # Polyak alpha of the target Q networks
    "batch_size": 256,
    "learning_rate": 3e-4,
    "betas": (0.9, 0.999),
    "grad_clip": 0.0,  # 0: none (IQL clips nothing)
    "steps": 1_000_000,
    "warmup_steps": 0,
    "min_lr_fraction": 1.0,  # constant learning rate
    "value_scale": None,  # null: the data's largest |value label| or |reward|; networks work in these units
    "valid_fraction": 0.05,
    "eval_every": 10_000,
    "eval_transitions": 4096,
    "checkpoint_every": 10_000,
}


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a critic config (missing keys take :data:`IQL_CONFIG` values) and return plain types."""
    unknown = sorted(set(cfg) - set(IQL_CONFIG))
    if unknown:
        raise ConfigError(f"critic.{unknown[0]}: unknown key; known keys are {', '.join(sorted(IQL_CONFIG))}")
    full = {**IQL_CONFIG, **dict(cfg)}
    out: dict[str, Any] = {}
    for key in ("hidden_dim", "batch_size", "steps", "eval_transitions"):
        out[key] = int_setting(full, "critic", key, 1)
    for key in ("n_hidden", "warmup_steps", "eval_every", "checkpoint_every"):
        out[key] = int_setting(full, "critic", key, 0)
    out["expectile"] = float_setting(full, "critic", "expectile", 0.0, 1.0, open_low=True)
    if out["expectile"] >= 1.0:
        raise ConfigError(f"critic.expectile: expected a number in (0, 1), got {full['expectile']!r}")
    out["target_update"] = float_setting(full, "critic", "target_update", 0.0, 1.0, open_low=True)
    out["learning_rate"] = float_setting(full, "critic", "learning_rate", 0.0, 10.0, open_low=True)
    out["grad_clip"] = float_setting(full, "critic", "grad_clip", 0.0, math.inf)
    out["min_lr_fraction"] = float_setting(full, "critic", "min_lr_fraction", 0.0, 1.0)
    out["valid_fraction"] = float_setting(full, "critic", "valid_fraction", 0.0, 0.99, open_low=True)
    out["betas"] = betas_setting(full, "critic")
    out["value_scale"] = (
        None
        if full["value_scale"] is None
        else float_setting(full, "critic", "value_scale", 0.0, math.inf, open_low=True)
    )
    return out
