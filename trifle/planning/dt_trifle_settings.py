"""``trifle-dt``'s settings (DT-based Trifle, trifle.planning.dt_trifle): the planner config's keys and
their checks.

Torch-free, unlike the policy: the method registry runs :func:`validate_planner` on every composed config
(trifle.config), and the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trifle.errors import ConfigError
from trifle.planning.dt_targets import parse_target_returns
from trifle.planning.planner_settings import CORRECTION_TARGETS, VALUE_THRESHOLDS

#: The keys of a ``trifle-dt`` planner config: DT's rollout settings plus s-Trifle's correction keys.
KEYS = ("name", "method", "target_return", "sample", "top_ratio", "correction_target", "value_threshold")
#: Keys a planner config may carry that are not planner settings (the method registry's block).
OPTIONAL_KEYS = ("registry",)


@dataclass(frozen=True)
class DTTrifleSettings:
    """A validated ``trifle-dt`` planner config (the targets are read by ``dt_target_returns``)."""

    name: str
    sample: bool
    top_ratio: float
    correction_target: str
    value_threshold: str


def validate_settings(cfg: Mapping[str, Any]) -> DTTrifleSettings:
    """Check every key of the planner config; a ConfigError names the offending ``planner.<key>``."""
    for key in cfg:
        if key not in KEYS + OPTIONAL_KEYS:
            raise ConfigError(f"planner.{key}: not a key of DT-based Trifle; valid keys: {', '.join(KEYS)}")
    for key in KEYS:
        if key not in cfg:
            raise ConfigError(f"planner.{key}: missing (DT-based Trifle needs it)")
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise ConfigError(
            f"planner.name: expected the method's name (a non-empty string), got {cfg['name']!r}"
        )
    if not isinstance(cfg["sample"], bool):
        raise ConfigError(f"planner.sample: expected true or false, got {cfg['sample']!r}")
    ratio = cfg["top_ratio"]
    number = isinstance(ratio, (int, float, np.number)) and not isinstance(ratio, bool)
    if not (number and math.isfinite(float(ratio)) and 0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"planner.top_ratio: expected a number in (0, 1], got {ratio!r}")
    for key, choices in (("correction_target", CORRECTION_TARGETS), ("value_threshold", VALUE_THRESHOLDS)):
        if cfg[key] not in choices:
            raise ConfigError(f"planner.{key}: expected one of {', '.join(choices)}, got {cfg[key]!r}")
    return DTTrifleSettings(
        name=cfg["name"],
        sample=cfg["sample"],
        top_ratio=float(ratio),
        correction_target=cfg["correction_target"],
        value_threshold=cfg["value_threshold"],
    )


def validate_planner(planner_cfg: Mapping[str, Any]) -> None:
    """The checks that need no model and no task: the settings and an explicit ``target_return`` (config
    composition may call this, so a bad value fails when the workflow builds its DAG)."""
    validate_settings(planner_cfg)
    if planner_cfg.get("target_return") is not None:
        parse_target_returns(planner_cfg["target_return"], "planner.target_return")
