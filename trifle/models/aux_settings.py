"""The optimality score's return models' training settings: the defaults (:data:`AUX_CONFIG`) and
their checks.

The trainer (``aux_training``) reads its settings through :func:`resolve_config`, and config composition
(trifle.config) runs it on every composed config, so a bad ``aux.*`` value fails before any stage
starts. This module imports no torch: the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trifle.errors import ConfigError
from trifle.models.setting_checks import betas_setting, float_setting, int_setting, steps_or_epochs

#: ``state``: p^s(G | s); ``action``: p^a(G | s, a).
KINDS = ("state", "action")

#: Defaults of missing keys: the trajectory GPT's Trajectory-Transformer sizes and optimizer
#: (trifle.models.gpt_settings.TT_CONFIG), 100 return bins as TT's 100 bins per dimension.
AUX_CONFIG: dict[str, Any] = {
    "kind": "state",
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "dropout": 0.1,
    "batch_size": 256,
    "learning_rate": 6e-4,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "steps": None,
    "epochs": None,
    "warmup_steps": 1000,
    "min_lr_fraction": 0.1,
    "value_bins": 100,
    "valid_fraction": 0.05,
    "eval_every": 1000,
    "eval_rows": 4096,
    "checkpoint_every": 1000,
}


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an aux config (missing keys take :data:`AUX_CONFIG` values) and return plain types."""
    unknown = sorted(set(cfg) - set(AUX_CONFIG))
    if unknown:
        raise ConfigError(f"aux.{unknown[0]}: unknown key; known keys are {', '.join(sorted(AUX_CONFIG))}")
    full = {**AUX_CONFIG, **dict(cfg)}
    out: dict[str, Any] = {}
    if full["kind"] not in KINDS:
        raise ConfigError(f"aux.kind: expected one of {', '.join(KINDS)}, got {full['kind']!r}")
    out["kind"] = full["kind"]
    for key in ("n_layer", "n_head", "n_embd", "batch_size", "eval_rows"):
        out[key] = int_setting(full, "aux", key, 1)
    out["value_bins"] = int_setting(full, "aux", "value_bins", 2)
    for key in ("warmup_steps", "eval_every", "checkpoint_every"):
        out[key] = int_setting(full, "aux", key, 0)
    if out["n_embd"] % out["n_head"]:
        raise ConfigError(f"aux.n_embd: {out['n_embd']} must be divisible by aux.n_head={out['n_head']}")
    out["dropout"] = float_setting(full, "aux", "dropout", 0.0, 0.99)
    out["learning_rate"] = float_setting(full, "aux", "learning_rate", 0.0, 10.0, open_low=True)
    out["weight_decay"] = float_setting(full, "aux", "weight_decay", 0.0, 10.0)
    out["grad_clip"] = float_setting(full, "aux", "grad_clip", 0.0, math.inf)
    out["min_lr_fraction"] = float_setting(full, "aux", "min_lr_fraction", 0.0, 1.0)
    out["valid_fraction"] = float_setting(full, "aux", "valid_fraction", 0.0, 0.99, open_low=True)
    out["betas"] = betas_setting(full, "aux")
    out["steps"], out["epochs"] = steps_or_epochs(full, "aux")
    return out
