"""Aggregation of evaluation files into the summary table (CSV + Markdown) and the returns figure.

Columns (one row per task x method, the episodes of all seeds pooled):

- ``dt_target``: for DT, the conditioning return its evaluation file selected (the best mean return
  of its targets on these same episodes, the paper's protocol and an optimistic choice); if seeds
  chose differently, each value with its count of seeds. Empty for the other methods.
- ``return_mean``, ``return_sem``: mean return and its standard error over episodes,
  std (ddof=1) / sqrt(n); it ignores between-seed training variance, which the per-seed files keep.
- ``diff_vs_tt``, ``diff_vs_tt_sem``: paired comparison with the reference method ``tt``: the mean
  over shared episodes of (this method's return - tt's return), and its paired standard error,
  std (ddof=1) of the per-episode differences / sqrt(number of pairs). Episodes pair when they have
  the same seed and episode index and that index falls in the same batch slot in both files (hence
  the same environment seed, initial state and random stream, `trifle.evaluation.rollout`): all
  common indices when both used the same ``eval.batch_episodes``, else only those inside both files'
  first batch. Because both methods face the same
  randomness, the paired error is usually far smaller than the two ``return_sem`` combined, so
  adjacent methods can be separated with fewer episodes. Empty for tt itself, when a task has no tt
  rows or no shared episodes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import DataError
from trifle.io import atomic_path, read_json

SUMMARY_COLUMNS = (
    "task",
    "method",
    "dt_target",
    "n_seeds",
    "n_episodes",
    "return_mean",
    "return_sem",
    "diff_vs_tt",
    "diff_vs_tt_sem",
    "failure_rate",
    "penalty_mean",
    "step_seconds",
)
#: The method every other one is compared with, episode by episode (``diff_vs_tt``).
REFERENCE_METHOD = "tt"
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


def _dt_target(group: list[dict[str, Any]]) -> str:
    """The DT target(s) the seeds' files selected ("" for methods without one)."""
    chosen = [float(r["target_return"]) for r in group if r.get("target_return") is not None]
    counts = Counter(chosen)
    if len(counts) == 1:
        return f"{chosen[0]:g}"
    return ", ".join(f"{t:g} x{n}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0])))


def _paired_diff(group: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Mean and paired standard error of per-episode return differences against ``reference``.

    Episodes pair by (seed, episode index) where the index is the same (batch, slot) in both files:
    every common index with equal ``eval.batch_episodes`` (or both unknown), else the indices below
    both batch sizes (the first batch of each). ("", "") when none pair, NaN error for a single pair.
    """
    by_seed = {r["seed"]: r for r in reference}
    diffs = []
    for record in group:
        ref = by_seed.get(record["seed"])
        if ref is None:
            continue
        ours = np.asarray(record["episodes"]["returns"], float)
        theirs = np.asarray(ref["episodes"]["returns"], float)
        n = min(ours.size, theirs.size)
        batches = (_batch_episodes(record), _batch_episodes(ref))
        if batches[0] != batches[1]:
            n = 0 if None in batches else min(n, *batches)
        diffs.append(ours[:n] - theirs[:n])
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size == 0:
        return "", ""
    sem = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), sem


def _batch_episodes(record: dict[str, Any]) -> Any:
    return (record.get("eval") or {}).get("batch_episodes")


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x method, pooling the episodes of all seeds (columns: the module docstring).

    The standard error is over episodes (std / sqrt(n)); with several seeds it is the pooled
    episode-level error, which ignores between-seed training variance (the per-seed files keep it).
    ``diff_vs_tt`` / ``diff_vs_tt_sem`` compare each method with tt episode by episode (paired
    standard error: std of the differences / sqrt(number of pairs)).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        group = groups[(record["task"], record["method"])]
        if any(r["seed"] == record["seed"] for r in group):
            raise DataError(
                f"two evaluation files for task {record['task']!r}, method {record['method']!r}, "
                f"seed {record['seed']}: expected one per seed"
            )
        group.append(record)
    rows = []
    for (task, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        returns = np.concatenate([r["episodes"]["returns"] for r in group]).astype(float)
        successes = np.concatenate([r["episodes"]["successes"] for r in group]).astype(bool)
        penalties = np.concatenate([r["episodes"]["penalties"] for r in group]).astype(float)
        n = len(returns)
        reference = groups.get((task, REFERENCE_METHOD))
        diff, diff_sem = (
            ("", "") if method == REFERENCE_METHOD or not reference else _paired_diff(group, reference)
        )
        rows.append(
            {
                "task": task,
                "method": method,
                "dt_target": _dt_target(group),
                "n_seeds": len({r["seed"] for r in group}),
                "n_episodes": n,
                "return_mean": float(returns.mean()),
                "return_sem": float(returns.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                "diff_vs_tt": diff,
                "diff_vs_tt_sem": diff_sem,
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
