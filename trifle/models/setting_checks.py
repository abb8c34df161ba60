"""The checks of single training settings that every trainer's ``resolve_config`` is built from.

Torch-free on purpose, as are the trainers' settings modules (``gpt_settings``, ``dt_settings``,
``iql_settings``, ``aux_settings``) that use them: config composition (trifle.config) validates every
composed config, the workflow composes one per job when it builds its DAG, and checking a number must not
cost a torch import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from trifle.errors import ConfigError


def int_setting(cfg: Mapping[str, Any], group: str, key: str, minimum: int) -> int:
    """``cfg[key]`` as an int >= ``minimum``; otherwise a ConfigError naming ``<group>.<key>``."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{group}.{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def float_setting(
    cfg: Mapping[str, Any], group: str, key: str, low: float, high: float, *, open_low: bool = False
) -> float:
    """``cfg[key]`` as a float in [low, high] (or (low, high]); otherwise a ConfigError naming it."""
    value = cfg[key]
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{group}.{key}: expected a number in {bracket}{low}, {high}], got {cfg[key]!r}")
    return value


def betas_setting(cfg: Mapping[str, Any], group: str) -> list[float]:
    """``cfg["betas"]`` as Adam's two betas, each in [0, 1); otherwise a ConfigError naming ``<group>.betas``."""
    try:
        betas = tuple(float(b) for b in cfg["betas"])
    except (TypeError, ValueError):
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{group}.betas: expected two numbers in [0, 1), got {cfg['betas']!r}")
    return list(betas)


def steps_or_epochs(cfg: Mapping[str, Any], group: str) -> tuple[int | None, float | None]:
    """The training length, ``(steps, epochs)``: exactly one of ``cfg["steps"]`` / ``cfg["epochs"]`` is set."""
    if (cfg["steps"] is None) == (cfg["epochs"] is None):
        raise ConfigError(f"{group}.steps / {group}.epochs: set exactly one of them (the other must be null)")
    steps = None if cfg["steps"] is None else int_setting(cfg, group, "steps", 1)
    epochs = (
        None if cfg["epochs"] is None else float_setting(cfg, group, "epochs", 0.0, math.inf, open_low=True)
    )
    return steps, epochs
