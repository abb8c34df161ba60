"""Ablation tables: one planner setting varied over values, each method's return at each value.

An ablation study (workflow config ``ablations:``; docs/evaluation.md#ablations) evaluates methods with
one planner key overridden, e.g. ``planner.horizon`` in {1, 3, 5} (the paper's Table 5: H = 1 is
"naive rejection sampling", beam width 1 is "without rejection sampling") or ``planner.top_ratio``
(Table 7). Each evaluation file records the planner settings it ran with, so the value is read from
the file itself (``planner.<key>``), never from its path: a file evaluated with another value cannot be
tabulated under the wrong one. Means and standard errors follow the one convention of
:mod:`trifle.evaluation.aggregate` (per-seed means with several seeds, pooled episodes with one).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trifle.errors import DataError
from trifle.evaluation.aggregate import convention_phrase, describe, group_records
from trifle.evaluation.tables import write_table
from trifle.io import atomic_path
from trifle.planning.methods import method

ABLATION_COLUMNS = (
    "task",
    "method",
    "setting",
    "value",
    "seeds",
    "episodes",
    "return_mean",
    "return_sem",
    "sem_over",
)


def setting_value(record: Mapping[str, Any], setting: str) -> Any:
    """The value of ``planner.<key>`` the record was evaluated with (``setting`` = "planner.<key>")."""
    section, _, key = setting.partition(".")
    if section != "planner" or not key:
        raise DataError(f"ablation setting {setting!r}: expected a planner key, 'planner.<key>'")
    planner = record.get("planner")
    if not isinstance(planner, Mapping) or key not in planner:
        raise DataError(f"{describe(record)}: the file records no planner setting {key!r}")
    return planner[key]


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers ascending, then anything else (null: the method's default) by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def ablation_rows(records: Sequence[Mapping[str, Any]], setting: str) -> list[dict[str, Any]]:
    """One row per (task, method, value of ``setting``), ordered by task, method (registry), value."""
    by_value: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_value[setting_value(record, setting)].append(record)
    rows = []
    for value, members in by_value.items():
        for (task, name), group in group_records(members, ("returns",)).items():
            est = group.estimate("returns")
            rows.append(
                {
                    "task": task,
                    "method": name,
                    "setting": setting,
                    # null (the method's default, e.g. the adaptive threshold) as the config spells it.
                    "value": "null" if value is None else value,
                    "seeds": len(group.seeds),
                    "episodes": group.n_episodes,
                    "return_mean": est.mean,
                    "return_sem": est.sem,
                    "sem_over": est.over,
                }
            )
    rows.sort(key=lambda r: (r["task"], method(r["method"]).order, r["method"], _order(r["value"])))
    return rows


def write_ablation(path: Path, rows: Sequence[Mapping[str, Any]], study: str) -> None:
    """The table (CSV and Markdown) with a note saying what varied and what the errors are over."""
    write_table(path, list(rows), ABLATION_COLUMNS)
    cells = {f"{r['task']} {r['method']} {r['value']}": r["sem_over"] for r in rows}
    setting = rows[0]["setting"] if rows else "?"
    note = (
        f"\nAblation `{study}`: `{setting}` varied, every other setting the task's. Mean return per "
        f"episode; standard errors {convention_phrase(cells)}.\n"
    )
    md = path.with_suffix(".md")
    with atomic_path(md) as tmp:
        tmp.write_text(md.read_text() + note)


def plot_ablation(rows: Sequence[Mapping[str, Any]], path: Path, study: str) -> None:
    """Mean return +- standard error against the setting's value, one line per method, a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        names = []
        for row in rows:
            if row["task"] == task and row["method"] not in names:
                names.append(row["method"])
        for name in names:
            mine = [r for r in rows if r["task"] == task and r["method"] == name]
            labels = [str(r["value"]) for r in mine]
            means = [r["return_mean"] for r in mine]
            sems = [0.0 if math.isnan(r["return_sem"]) else r["return_sem"] for r in mine]
            ax.errorbar(labels, means, yerr=sems, marker="o", capsize=3, label=method(name).label)
        ax.set_title(task)
        ax.set_xlabel(rows[0]["setting"] if rows else "")
        ax.set_ylabel("mean return")
        ax.legend(fontsize=8)
    fig.suptitle(f"ablation: {study}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
