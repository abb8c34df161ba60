"""The Decision Transformer's conditioning targets, as the config gives them (``dt`` and ``trifle-dt``).

Torch-free, unlike the policies that use them (trifle.planning.dt_policy, trifle.planning.dt_trifle):
config composition (trifle.config) checks the targets of every composed config, and the workflow composes
a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trifle.errors import ConfigError


def parse_target_returns(value: Any, key: str) -> list[float]:
    """One or several conditioning returns as a non-empty list of finite floats.

    ``value`` is a number or a list of numbers (``key`` names the config key in the error). Booleans and
    strings are rejected rather than coerced, so a typo cannot silently become a target.
    """

    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(number(item) for item in items):
        raise ConfigError(
            f"{key}: expected a finite number or a non-empty list of finite numbers, got {value!r}"
        )
    return [float(item) for item in items]


def dt_target_returns(cfg: Mapping[str, Any]) -> list[float]:
    """DT's conditioning targets: ``planner.target_return`` (a number or a list) when set, else the
    task's ``dt_target_returns`` list."""
    target = cfg["planner"].get("target_return")
    if target is not None:
        return parse_target_returns(target, "planner.target_return")
    if cfg["task"].get("dt_target_returns") is None:
        raise ConfigError("task.dt_target_returns: no target return set (nor planner.target_return)")
    return parse_target_returns(cfg["task"]["dt_target_returns"], "task.dt_target_returns")
