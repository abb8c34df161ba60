"""Per-dimension discretizers: categorical (identity on a finite set) and quantile bins.

Every column maps raw values to tokens 0..n-1 and tokens back to one representative value per bin.
Quantile bins hold equal empirical mass, by one of two rules (``quantile_rule``):

* ``trifle`` (:func:`fit_quantile`): ties merge bins, atoms at the ends get bins of their own, and a
  bin's representative is the mean of the training values that fall in it, so ``decode(encode(x))`` is
  exact for categorical columns and the in-bin mean for quantile columns;
* ``tt`` (:func:`fit_tt_quantile`): Trajectory Transformer's ``QuantileDiscretizer`` exactly (fixed
  thresholds every ceil(n/N)-th value, midpoint representatives), fitted on every row but the dataset's
  last as TT does. A GPT imported from TT (trifle.models.tt_import) only reads tokens made this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from trifle.errors import DataError

KINDS = ("categorical", "quantile")
QUANTILE_RULES = ("trifle", "tt")


@dataclass(frozen=True)
class ColumnBins:
    """How one column is discretized: its kind, bin edges (quantile only) and bin representatives."""

    kind: str
    edges: np.ndarray  # [n-1] interior edges; empty for categorical
    values: np.ndarray  # [n] representative value of each bin (the category itself for categorical)

    @property
    def num_bins(self) -> int:
        return len(self.values)

    def encode(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.kind == "quantile":
            return np.searchsorted(self.edges, x, side="right").astype(np.int64)
        idx = np.clip(np.searchsorted(self.values, x), 0, self.num_bins - 1)
        unknown = self.values[idx] != x
        if unknown.any():
            raise DataError(
                f"column '{name}': value {x[unknown][0]!r} is not one of its categories {self.values}"
            )
        return idx.astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": self.edges.tolist(), "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnBins:
        return cls(d["kind"], np.asarray(d["edges"], np.float64), np.asarray(d["values"], np.float64))


def fit_categorical(x: np.ndarray, categories: np.ndarray | None = None) -> ColumnBins:
    """Identity on the sorted distinct values (plus any declared categories never seen in the data)."""
    values = np.unique(np.asarray(x, np.float64))
    if categories is not None:
        values = np.union1d(values, np.asarray(categories, np.float64))
    return ColumnBins("categorical", np.zeros(0), values)


def fit_quantile(x: np.ndarray, n_bins: int) -> ColumnBins:
    """Equal-mass bins; ties merge bins, and an atom (a value repeated in the data) may get a bin of its own.

    Two atom rules keep apart values that mean something different from their neighbours:

    * a value holding much of the mass (at least two bins' worth) gets its own bin: without it, a
      column that is mostly one value (e.g. zero returns in a sparse-reward task) would share its bin
      with the nearest other values, erasing exactly the distinction that matters (zero vs small return);
    * a rarer value repeated at either end of the column (a termination penalty, a clipping bound) gets
      its own bin too, taken from the equal-mass bins of the rest: pooled with its neighbours, its bin's
      representative is neither (Hopper's -100 fall penalty pooled with 0.4% of ordinary rewards
      decodes to about -16, and the penalty all but vanishes from the planner's expected reward).

    Bin count never exceeds ``n_bins``.
    """
    x = np.sort(np.asarray(x, np.float64))
    values, counts = np.unique(x, return_counts=True)
    big = 2 * len(x) / n_bins
    low = len(values) >= 3 and 2 <= counts[0] < big and n_bins >= 4
    high = len(values) >= 3 + low and 2 <= counts[-1] < big and n_bins >= 4 + low
    core = x[int(counts[0]) if low else 0 : len(x) - (int(counts[-1]) if high else 0)]
    edges = _equal_mass_edges(core, n_bins - low - high)
    if low:
        edges = np.concatenate(
            [[np.nextafter(values[0], np.inf)], edges[edges > np.nextafter(values[0], np.inf)]]
        )
    if high:
        edges = np.concatenate([edges[edges < values[-1]], [values[-1]]])
    tokens = np.searchsorted(edges, x, side="right")
    counts = np.bincount(tokens, minlength=len(edges) + 1)
    sums = np.bincount(tokens, weights=x, minlength=len(edges) + 1)
    bounds = np.concatenate([[x[0]], edges, [x[-1]]])
    midpoints = (bounds[:-1] + bounds[1:]) / 2
    values = np.where(counts > 0, sums / np.maximum(counts, 1), midpoints)
    return ColumnBins("quantile", edges, values)


def fit_tt_quantile(x: np.ndarray, n_bins: int) -> ColumnBins:
    """TT's ``QuantileDiscretizer`` for one column, as a :class:`ColumnBins` (the same tokens).

    TT's thresholds are every ``p = ceil(n / N)``-th sorted value from the minimum, then the maximum;
    a value's token is the last threshold at or below it, clipped to ``N - 1``, so tied thresholds leave
    empty bins (token numbers skip) instead of merging, and every column has exactly ``N`` tokens. As
    ``searchsorted(side="right")`` over the thresholds after the first, that is trifle's encoding.
    A token's value is the midpoint of its two thresholds (TT's ``reconstruct``). When the data are too
    few for ``N + 1`` thresholds, TT gives the maximum a token past the last bin (min(K, N-1) for K
    thresholds): reproduced, with the maximum as that token's value (TT's reconstruct fails there).
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise DataError(f"fit_tt_quantile: expected a non-empty column, got shape {x.shape}")
    data = np.sort(x)
    step = math.ceil(len(data) / n_bins)
    thresholds = np.concatenate([data[::step], data[-1:]])
    k = len(thresholds)
    top = min(k, n_bins - 1)  # TT's token for the maximum (values at or above every threshold)
    edges = np.concatenate([thresholds[1 : k - 1], np.repeat(thresholds[-1], top - (k - 2))])
    values = np.full(n_bins, thresholds[-1])
    mids = (thresholds[:-1] + thresholds[1:]) / 2
    values[: min(len(mids), n_bins)] = mids[:n_bins]
    return ColumnBins("quantile", edges[: n_bins - 1], values)


def _equal_mass_edges(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior edges of at most ``n_bins`` equal-mass bins of sorted ``x``, a heavy atom alone in its bin."""
    # Edges are data points, a bin holds the values below its upper edge; an edge equal to the minimum
    # would only create an empty first bin.
    at = np.minimum(np.ceil(np.linspace(0.0, 1.0, n_bins + 1)[1:-1] * len(x)).astype(np.int64), len(x) - 1)
    edges = np.unique(x[at])
    values, counts = np.unique(x, return_counts=True)
    for i in np.flatnonzero((counts >= 2 * len(x) / n_bins) & (values < x[-1])):
        atom, above = values[i], values[i + 1]
        if above in edges or len(edges) + 2 > n_bins:
            continue  # already alone in its bin, or no room for another bin
        edges = np.union1d(edges, [atom, np.nextafter(atom, np.inf)])
    return edges[edges > x[0]]


class Discretizer:
    """A fitted discretizer over the columns of a transition matrix (obs, action, reward, value)."""

    def __init__(self, columns: list[ColumnBins], names: list[str], quantile_rule: str = "trifle") -> None:
        if len(columns) != len(names):
            raise ValueError("one name per column")
        self.columns = columns
        self.names = names
        # Kept with the bins: a model trained elsewhere (TT's GPT) must be given tokens of its own rule.
        self.quantile_rule = quantile_rule

    @classmethod
    def fit(
        cls,
        data: np.ndarray,
        kinds: list[str],
        names: list[str],
        *,
        n_bins: int,
        categories: list[np.ndarray | None] | None = None,
        quantile_rule: str = "trifle",
    ) -> Discretizer:
        """Fit one column per kind; ``categories`` optionally declares the full range of discrete columns,
        ``quantile_rule`` picks the quantile columns' rule (module docstring)."""
        if n_bins < 2:
            raise DataError(f"n_bins={n_bins}: expected at least 2 bins")
        if quantile_rule not in QUANTILE_RULES:
            raise DataError(f"quantile_rule={quantile_rule!r}: expected one of {QUANTILE_RULES}")
        categories = categories or [None] * data.shape[1]
        columns = []
        for j, kind in enumerate(kinds):
            if kind == "categorical":
                columns.append(fit_categorical(data[:, j], categories[j]))
            elif kind == "quantile" and quantile_rule == "tt":
                # TT fits on qlearning_dataset_with_timeouts' rows, which omit the dataset's last one.
                columns.append(fit_tt_quantile(data[:-1, j] if len(data) > 1 else data[:, j], n_bins))
            elif kind == "quantile":
                columns.append(fit_quantile(data[:, j], n_bins))
            else:
                raise DataError(f"column '{names[j]}': unknown discretizer kind '{kind}', expected {KINDS}")
        return cls(columns, names, quantile_rule)

    @property
    def num_bins(self) -> np.ndarray:
        return np.array([c.num_bins for c in self.columns], np.int64)

    @property
    def vocab_size(self) -> int:
        """Tokens per column in the shared vocabulary: the largest bin count."""
        return int(self.num_bins.max())

    def encode(self, data: np.ndarray) -> np.ndarray:
        """[N, D] raw values -> [N, D] int64 tokens."""
        data = np.atleast_2d(data)
        return np.stack([c.encode(data[:, j], self.names[j]) for j, c in enumerate(self.columns)], axis=1)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """[..., D] tokens -> [..., D] representative values."""
        tokens = np.asarray(tokens)
        return np.stack([c.values[tokens[..., j]] for j, c in enumerate(self.columns)], axis=-1)

    def expectation(self, column: int, probs: np.ndarray) -> np.ndarray:
        """E[value] of one column under a distribution over its bins ([..., >= num_bins], extra ignored)."""
        values = self.columns[column].values
        return np.asarray(probs)[..., : len(values)] @ values

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "columns": [c.to_dict() for c in self.columns],
            "quantile_rule": self.quantile_rule,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Discretizer:
        # Token files written before the rule was recorded used trifle's.
        rule = d.get("quantile_rule", "trifle")
        return cls([ColumnBins.from_dict(c) for c in d["columns"]], list(d["names"]), rule)
