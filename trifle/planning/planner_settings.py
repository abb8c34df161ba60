"""The beam planners' settings (``tt``, ``trifle-s``, ``trifle-m`` and the methods built on them): the
planner config's keys, their checks (:func:`validate_config`) and the beam-search hyperparameters.

Torch-free, unlike the planners (trifle.planning.planners, trifle.planning.beam,
trifle.planning.circuit_queries) that read them: the method registry runs :func:`validate_planner` on
every composed config (trifle.config), and the workflow composes a config per job when it builds its DAG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trifle.errors import ConfigError

#: Rules of the proposal's value threshold (circuit_queries.kept_bins, ``planner.value_threshold``);
#: first = default.
VALUE_THRESHOLDS = ("mass", "strict", "cdf")
#: Forms of m-Trifle's plan value (circuit_queries.expected_multistep_value, ``planner.multistep_value``);
#: first = default.
MULTISTEP_VALUES = ("survival", "soft_pad")
#: What Trifle's proposal thresholds (circuit_queries.CorrectionTarget, ``planner.correction_target``).
CORRECTION_TARGETS = ("return", "value")

METHODS = ("tt", "trifle-s", "trifle-m")
TRIFLE_METHODS = ("trifle-s", "trifle-m")
BEAM_KEYS = (
    "name",
    "method",
    "beam_width",
    "horizon",
    "expansion_factor",
    "k_obs",
    "k_act",
    "cdf_act",
    "act_support",
    "max_context_transitions",
    "use_cache",
    "constrained",
)
#: Keys only the Trifle methods have (``multistep_value``: trifle-m only).
TRIFLE_KEYS = ("top_ratio", "value_threshold", "correction_target")
TRIFLE_M_KEYS = ("multistep_value",)
#: Keys a planner config may carry that are not planner settings: the method registry's block
#: (trifle.planning.methods), read by the workflow and the tables.
OPTIONAL_KEYS = ("registry",)
#: ``terminal_value`` (optional for every method, default ``gpt``): the value a plan ends with, TT's GPT
#: value token (``gpt``) or an offline critic's Q of the last planned state and action (``critic``:
#: TT(+Q), docs/planning.md#ttq). trifle-m's plan value is the circuit's, so it takes ``gpt`` only.
#: ``tabular_q``: the Taxi ablation's Q_taxi (trifle.models.tabular_q) in the critic's place.
TERMINAL_VALUES = ("gpt", "critic", "tabular_q")
#: ``q_filter`` (optional, tt only, default false): the first planning step's action prior p_GPT(a | s)
#: reweighted by exp Q_taxi(s, a) (planners.QFilter; the Taxi ablation's "action filtering").
DEFAULTED_KEYS = {"terminal_value": TERMINAL_VALUES[0], "q_filter": False}
#: ``fixed_threshold`` (optional for the Trifle methods, default null): null = the adaptive threshold
#: (``top_ratio`` under ``value_threshold``); a number q in (0, 1) = a fixed threshold, the levels at or
#: above the q-quantile of the circuit's marginal p(G), the same in every state (Table 7(b)'s
#: comparison; circuit_queries.fixed_kept_levels).
#: ``constraint_lookahead`` (optional for the Trifle methods, default false; constrained planners only):
#: also weight each candidate by the circuit's p(C | s, a^{<=i}) / p(C | s, a^{<i}), so that the proposal's
#: prior is the circuit's estimate of p(a^i | s, a^{<i}, C) rather than the GPT's p(a^i | s, a^{<i})
#: (docs/planning.md#action-constraints; it needs a circuit that predicts the constraint well).
TRIFLE_DEFAULTED_KEYS = {"fixed_threshold": None, "constraint_lookahead": False}


@dataclass(frozen=True)
class BeamSettings:
    """The beam-search hyperparameters (planner config keys of the same names)."""

    beam_width: int
    horizon: int
    expansion_factor: int
    k_obs: int | None
    k_act: int | None
    cdf_act: float | None
    discount: float
    use_cache: bool = True
    act_support: float | None = None


@dataclass(frozen=True)
class PlannerSettings:
    """A validated planner config."""

    method: str
    beam_width: int
    horizon: int
    expansion_factor: int
    k_obs: int | None
    k_act: int | None
    cdf_act: float | None
    act_support: float | None
    max_context_transitions: int
    use_cache: bool
    top_ratio: float | None = None
    constrained: bool = False
    name: str = ""
    value_threshold: str | None = None
    multistep_value: str | None = None
    correction_target: str | None = None
    terminal_value: str = TERMINAL_VALUES[0]
    fixed_threshold: float | None = None
    q_filter: bool = False
    constraint_lookahead: bool = False

    @property
    def needs_tabular_q(self) -> bool:
        """Whether the planner reads Q_taxi, the data's tabular Q (filter or terminal value)."""
        return self.q_filter or self.terminal_value == "tabular_q"

    def beam(self, discount: float) -> BeamSettings:
        return BeamSettings(
            beam_width=self.beam_width,
            horizon=self.horizon,
            expansion_factor=self.expansion_factor,
            k_obs=self.k_obs,
            k_act=self.k_act,
            cdf_act=self.cdf_act,
            act_support=self.act_support,
            discount=discount,
            use_cache=self.use_cache,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int(cfg: Mapping[str, Any], key: str, minimum: int, *, optional: bool = False) -> int | None:
    value = cfg[key]
    if optional and value is None:
        return None
    if not _is_int(value) or value < minimum:
        extra = " or null" if optional else ""
        raise ConfigError(f"planner.{key}: expected an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


def _fraction(
    cfg: Mapping[str, Any], key: str, *, optional: bool = False, closed_top: bool = True
) -> float | None:
    """A number in (0, 1] (or (0, 1) when ``closed_top`` is false)."""
    value = cfg[key]
    if optional and value is None:
        return None
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    ok = ok and float(value) > 0.0 and (float(value) <= 1.0 if closed_top else float(value) < 1.0)
    if not ok:
        interval = "(0, 1]" if closed_top else "(0, 1)"
        extra = " or null" if optional else ""
        raise ConfigError(f"planner.{key}: expected a number in {interval}{extra}, got {value!r}")
    return float(value)


def validate_config(cfg: Mapping[str, Any]) -> PlannerSettings:
    """Check every key of a planner config; a ConfigError names the offending ``planner.<key>``."""
    method = cfg.get("method")
    if method not in METHODS:
        raise ConfigError(f"planner.method: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    allowed = BEAM_KEYS + (TRIFLE_KEYS if method in TRIFLE_METHODS else ())
    allowed += TRIFLE_M_KEYS if method == "trifle-m" else ()
    defaulted = tuple(DEFAULTED_KEYS) + (tuple(TRIFLE_DEFAULTED_KEYS) if method in TRIFLE_METHODS else ())
    for key in cfg:
        if key not in allowed + OPTIONAL_KEYS + defaulted:
            raise ConfigError(
                f"planner.{key}: not a key of method {method!r}; valid keys: {', '.join(allowed + defaulted)}"
            )
    for key in allowed:
        if key not in cfg:
            raise ConfigError(f"planner.{key}: missing (method {method!r} needs it)")
    for key in ("use_cache", "constrained"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"planner.{key}: expected true or false, got {cfg[key]!r}")
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise ConfigError(
            f"planner.name: expected the method's name (a non-empty string), got {cfg['name']!r}"
        )
    for key, choices in (
        ("value_threshold", VALUE_THRESHOLDS),
        ("multistep_value", MULTISTEP_VALUES),
        ("correction_target", CORRECTION_TARGETS),
    ):
        if key in allowed and cfg[key] not in choices:
            raise ConfigError(f"planner.{key}: expected one of {', '.join(choices)}, got {cfg[key]!r}")
    terminal_value = cfg.get("terminal_value", DEFAULTED_KEYS["terminal_value"])
    if terminal_value not in TERMINAL_VALUES:
        raise ConfigError(
            f"planner.terminal_value: expected one of {', '.join(TERMINAL_VALUES)}, got {terminal_value!r}"
        )
    if terminal_value != "gpt" and method == "trifle-m":
        raise ConfigError(
            f"planner.terminal_value={terminal_value}: trifle-m scores plans with the circuit's multi-step "
            "value, not with a terminal value; expected gpt"
        )
    q_filter = cfg.get("q_filter", DEFAULTED_KEYS["q_filter"])
    if not isinstance(q_filter, bool):
        raise ConfigError(f"planner.q_filter: expected true or false, got {q_filter!r}")
    if q_filter and method != "tt":
        raise ConfigError(
            f"planner.q_filter=true: the Q filter reshapes TT's first action distribution, a slot method "
            f"{method!r} fills with the circuit's correction; expected method tt"
        )
    lookahead = cfg.get("constraint_lookahead", False)
    if not isinstance(lookahead, bool):
        raise ConfigError(f"planner.constraint_lookahead: expected true or false, got {lookahead!r}")
    if lookahead and not cfg["constrained"]:
        raise ConfigError(
            "planner.constraint_lookahead=true: only a constrained planner (planner.constrained=true) has a "
            "constraint to look ahead to; expected false"
        )
    fixed = cfg.get("fixed_threshold")
    if fixed is not None:
        fixed = _fraction(cfg, "fixed_threshold", closed_top=False)
    return PlannerSettings(
        method=method,
        beam_width=_int(cfg, "beam_width", 1),
        horizon=_int(cfg, "horizon", 1),
        expansion_factor=_int(cfg, "expansion_factor", 1),
        k_obs=_int(cfg, "k_obs", 1, optional=True),
        k_act=_int(cfg, "k_act", 1, optional=True),
        cdf_act=_fraction(cfg, "cdf_act", optional=True, closed_top=False),
        act_support=_fraction(cfg, "act_support", optional=True),
        max_context_transitions=_int(cfg, "max_context_transitions", 0),
        use_cache=cfg["use_cache"],
        top_ratio=_fraction(cfg, "top_ratio") if method in TRIFLE_METHODS else None,
        constrained=cfg["constrained"],
        name=cfg["name"],
        value_threshold=cfg.get("value_threshold"),
        multistep_value=cfg.get("multistep_value"),
        correction_target=cfg.get("correction_target"),
        terminal_value=terminal_value,
        fixed_threshold=fixed,
        q_filter=q_filter,
        constraint_lookahead=lookahead,
    )


def validate_planner(cfg: Mapping[str, Any]) -> None:
    """The method registry's settings check (trifle.planning.methods.Method.validate), run when a config
    is composed: the keys and values of :func:`validate_config`, no model needed."""
    validate_config(cfg)
