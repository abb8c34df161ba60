"""The optimality table and figure: each method's trajectory scores, and how they go with returns.

From the ``optimality`` stage's files (``results/eval/{task}/{method}/seed{seed}.optimality.json``), one
row per (task, method), in the method registry's order:

- ``seeds``, ``episodes``: the files and trajectories behind the row;
- ``score_mean``, ``score_sem``, ``sem_over``: the mean trajectory score and its standard error, with the
  one convention of :mod:`trifle.evaluation.aggregate` (per-seed means with several seeds, episodes with
  one);
- ``corr_return``: Pearson's correlation between a trajectory's score and its return, over every
  trajectory of the row (seeds pooled); empty when either is constant;
- ``return_mean``: the mean return by the same convention, so the row reads beside the summary table.

The figure plots score against return per trajectory, one panel per task, one colour per method.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import ConfigError, DataError
from trifle.evaluation.aggregate import convention_phrase, estimate
from trifle.evaluation.tables import markdown_table, write_table
from trifle.io import atomic_path, read_json
from trifle.planning.methods import method, sort_key

OPTIMALITY_COLUMNS = (
    "task",
    "method",
    "label",
    "seeds",
    "episodes",
    "score_mean",
    "score_sem",
    "sem_over",
    "corr_return",
    "return_mean",
)
REQUIRED_KEYS = ("task", "method", "seed", "episodes")
#: Where :func:`load_optimality` notes the file a record came from, so errors can name it.
SOURCE_KEY = "_source"


def load_optimality(path: Path) -> dict[str, Any]:
    """Read one optimality file, checking it has the keys and per-episode series the table needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: optimality file not found")
    record = read_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    episodes = record.get("episodes", {})
    missing += [f"episodes.{k}" for k in ("scores", "returns") if k not in episodes]
    if missing:
        raise DataError(f"{path}: optimality file lacks {', '.join(missing)}")
    if not episodes["scores"] or len(episodes["scores"]) != len(episodes["returns"]):
        raise DataError(f"{path}: episodes.scores and episodes.returns must be non-empty and of one length")
    record[SOURCE_KEY] = str(path)
    return record


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, or None when it is undefined (fewer than two points, or a constant series)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def optimality_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method) with :data:`OPTIMALITY_COLUMNS`, by task then registry order.

    Rows also carry ``_scores`` and ``_returns`` (every trajectory, seeds pooled) for the figure.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        group = groups[(record["task"], record["method"])]
        clash = [r for r in group if r["seed"] == record["seed"]]
        if clash:
            raise DataError(
                f"two optimality files for task {record['task']!r}, method {record['method']!r}, seed "
                f"{record['seed']}: {clash[0].get(SOURCE_KEY)} and {record.get(SOURCE_KEY)}"
            )
        group.append(record)
    rows = []
    for (task, name), members in sorted(groups.items(), key=lambda kv: (kv[0][0], sort_key(kv[0][1]))):
        try:
            label = method(name).label
        except ConfigError as exc:
            files = ", ".join(str(r.get(SOURCE_KEY)) for r in members)
            raise DataError(f"{files}: method {name!r} is not in the method registry ({exc})") from exc
        members = sorted(members, key=lambda r: r["seed"])
        scores = [np.asarray(r["episodes"]["scores"], np.float64) for r in members]
        returns = [np.asarray(r["episodes"]["returns"], np.float64) for r in members]
        score, ret = estimate(scores), estimate(returns)
        rows.append(
            {
                "task": task,
                "method": name,
                "label": label,
                "seeds": len(members),
                "episodes": int(sum(s.size for s in scores)),
                "score_mean": score.mean,
                "score_sem": score.sem,
                "sem_over": score.over,
                "corr_return": pearson(np.concatenate(scores), np.concatenate(returns)),
                "return_mean": ret.mean,
                "_scores": np.concatenate(scores),
                "_returns": np.concatenate(returns),
            }
        )
    return rows


def write_optimality(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The table (CSV and Markdown), the Markdown ending with what the numbers are."""
    path = Path(path)
    write_table(path, list(rows), OPTIMALITY_COLUMNS)
    cells = {f"{r['task']} {r['method']}": r["sem_over"] for r in rows}
    note = (
        "\nInference-time optimality score (docs/evaluation.md#optimality-score): per step, where the "
        "executed action's expected return under the data's p^a(G | s, a) falls in the data's "
        "p^s(G | s) (mid-distribution function); per trajectory, the mean over its steps. "
        f"Standard errors {convention_phrase(cells)}; `corr_return` is Pearson's r between trajectory "
        "score and return over every trajectory of the row.\n"
    )
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_table(list(rows), OPTIMALITY_COLUMNS) + note)


def plot_optimality(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Score against return per trajectory: one panel per task, one colour per method (its label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.6 * max(len(tasks), 1), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r["method"] for r in rows))  # one colour per method across panels
    for ax, task in zip(axes[0], tasks, strict=False):
        for row in (r for r in rows if r["task"] == task):
            corr = row["corr_return"]
            ax.scatter(
                row["_returns"],
                row["_scores"],
                s=8,
                alpha=0.5,
                color=colours[names.index(row["method"]) % len(colours)],
                label=row["label"] + ("" if corr is None else f" (r = {corr:.2f})"),
            )
        ax.set_title(task)
        ax.set_xlabel("return")
        ax.set_ylabel("optimality score")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
