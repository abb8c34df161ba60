"""Action constraints (the safe-RL experiments, paper §6.3): bounds on chosen action dimensions.

A constraint is a list of ``{dim, low, high}`` entries (task config ``action_constraint``), each bounding
one action dimension from below and/or above. Planners work on discretized actions, so a constraint
becomes the set of *allowed bins* of each constrained dimension: the bins whose representative value
(the value an executed token decodes to) satisfies the bounds. Executing only allowed bins therefore
satisfies the constraint exactly, whatever the bin edges are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trifle.data.discretize import Discretizer
from trifle.errors import ConfigError

KEY = "task.action_constraint"


@dataclass(frozen=True)
class Bound:
    """``low <= action[dim] <= high``; a missing side is unbounded."""

    dim: int
    low: float | None = None
    high: float | None = None

    def satisfied(self, values: np.ndarray) -> np.ndarray:
        """Which of ``values`` (of this dimension) lie within the bounds."""
        values = np.asarray(values, np.float64)
        ok = np.ones(values.shape, bool)
        if self.low is not None:
            ok &= values >= self.low
        if self.high is not None:
            ok &= values <= self.high
        return ok


def _number(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"{where}.{key} = {value!r}: expected a finite number or null")
    return float(value)


def parse_constraint(entries: Sequence[Mapping[str, Any]] | None, act_dim: int | None = None) -> list[Bound]:
    """Validate a config's constraint entries; ``act_dim`` (when known) bounds the dimension ids."""
    if entries is None:
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ConfigError(f"{KEY} = {entries!r}: expected a list of {{dim, low, high}} entries")
    bounds, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{KEY}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} = {entry!r}: expected a mapping with keys dim, low, high")
        unknown = sorted(set(entry) - {"dim", "low", "high"})
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; expected dim, low, high")
        dim = entry.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ConfigError(f"{where}.dim = {dim!r}: expected an action dimension index >= 0")
        if act_dim is not None and dim >= act_dim:
            raise ConfigError(f"{where}.dim = {dim}: the task's actions have {act_dim} dimensions")
        if dim in seen:
            raise ConfigError(f"{where}.dim = {dim}: dimension constrained twice; merge the bounds")
        low, high = _number(entry, "low", where), _number(entry, "high", where)
        if low is None and high is None:
            raise ConfigError(f"{where}: expected a bound, `low` and/or `high`")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{where}: low = {low} is above high = {high}")
        seen.add(dim)
        bounds.append(Bound(dim, low, high))
    return bounds


def allowed_bins(discretizer: Discretizer, obs_dim: int, bounds: Sequence[Bound]) -> dict[int, np.ndarray]:
    """``{action dim: bool [num_bins]}``: the bins whose decoded value satisfies the dimension's bound.

    A dimension with no allowed bin cannot be satisfied by any executable action: that is a config
    error (the bound lies outside everything the dataset ever did), reported before planning starts.
    """
    allowed = {}
    for bound in bounds:
        column = discretizer.columns[obs_dim + bound.dim]
        ok = bound.satisfied(column.values)
        if not ok.any():
            raise ConfigError(
                f"{KEY}: no bin of action dimension {bound.dim} satisfies low={bound.low}, high={bound.high} "
                f"(its bins decode to {column.values.min():.3g}..{column.values.max():.3g})"
            )
        allowed[bound.dim] = ok
    return allowed


def violations(actions: np.ndarray, bounds: Sequence[Bound]) -> np.ndarray:
    """bool [B]: which executed actions ``[B, act_dim]`` break at least one bound."""
    actions = np.asarray(actions, np.float64)
    bad = np.zeros(actions.shape[0], bool)
    for bound in bounds:
        bad |= ~bound.satisfied(actions[:, bound.dim])
    return bad
