"""Aggregation of evaluation files into the summary table (CSV + Markdown) and the returns figure."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import DataError
from trifle.io import atomic_path, read_json

SUMMARY_COLUMNS = (
    "task",
    "method",
    "n_seeds",
    "n_episodes",
    "return_mean",
    "return_sem",
    "failure_rate",
    "penalty_mean",
    "step_seconds",
)
# Display order of methods in tables and figures (others follow alphabetically).
METHOD_ORDER = ("dt", "tt", "trifle-s", "trifle-m")


def load_evaluation(path: Path) -> dict[str, Any]:
    """Read one `results/eval/{task}/{method}/seed{seed}.json`, checking the keys the summary needs."""
    if not path.is_file():
        raise DataError(f"{path}: evaluation file not found")
    record = read_json(path)
    for key in ("task", "method", "seed", "episodes", "plan_seconds", "env_steps"):
        if key not in record:
            raise DataError(f"{path}: evaluation file lacks key '{key}'")
    return record


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x method, pooling the episodes of all seeds.

    The standard error is over episodes (std / sqrt(n)); with several seeds it is the pooled
    episode-level error, which ignores between-seed training variance (the per-seed files keep it).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["method"])].append(record)
    rows = []
    for (task, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        returns = np.concatenate([r["episodes"]["returns"] for r in group]).astype(float)
        successes = np.concatenate([r["episodes"]["successes"] for r in group]).astype(bool)
        penalties = np.concatenate([r["episodes"]["penalties"] for r in group]).astype(float)
        n = len(returns)
        rows.append(
            {
                "task": task,
                "method": method,
                "n_seeds": len({r["seed"] for r in group}),
                "n_episodes": n,
                "return_mean": float(returns.mean()),
                "return_sem": float(returns.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                "failure_rate": float(1.0 - successes.mean()),
                "penalty_mean": float(penalties.mean()),
                "step_seconds": sum(r["plan_seconds"] for r in group)
                / max(sum(r["env_steps"] for r in group), 1),
            }
        )
    return rows


def plot_returns(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean return +- standard error per method, one panel per task, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        x = np.arange(len(task_rows))
        ax.bar(
            x,
            [r["return_mean"] for r in task_rows],
            yerr=[r["return_sem"] for r in task_rows],
            capsize=4,
            color="#4c72b0",
        )
        ax.set_xticks(x, [r["method"] for r in task_rows])
        ax.set_title(task)
        ax.set_ylabel("mean return")
        ax.axhline(0.0, color="black", linewidth=0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
