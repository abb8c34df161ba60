"""The toy tasks' summary table (CSV + Markdown) and returns figure, from the evaluation files.

The grouping, checks, means and standard errors are :mod:`trifle.evaluation.aggregate`'s (one convention
for every table); this module holds what only the toy tasks' table has. Columns (one row per task x
method, in the method registry's order):

- ``dt_target``: for a return-conditioned method (DT), the conditioning return its evaluation file
  selected (the best mean return of its targets on these same episodes, the paper's protocol and an
  optimistic choice); if seeds chose differently, each value with its count of seeds. Empty otherwise.
- ``return_mean``, ``return_sem``, ``sem_over``: mean return and its standard error, over what
  ``sem_over`` names: ``seeds`` when the row has several seeds (the mean of the per-seed mean returns;
  std (ddof=1) of those means / sqrt(n_seeds)), ``episodes`` when it has one (std (ddof=1) over its
  episodes / sqrt(n_episodes): evaluation noise only).
- ``diff_vs_tt``, ``diff_vs_tt_sem``: paired comparison with the registry's reference method
  (``registry.reference``, TT; the column names keep "tt"). Per seed, the per-episode differences
  (this method's return - the reference's) over shared episodes; then the same convention over the
  seeds that have shared episodes: the mean of the per-seed mean differences and their standard error
  over seeds, or with one such seed the mean and std (ddof=1) / sqrt(number of pairs) of its
  differences. Episodes pair when they have the same seed and episode index and that index falls in the
  same batch slot in both files (hence the same environment seed, initial state and random stream,
  `trifle.evaluation.rollout`): all common indices when both used the same ``eval.batch_episodes``, else
  only those inside both files' first batch. Because both methods face the same randomness, the paired
  error is usually far smaller than the two ``return_sem`` combined. Empty for the reference itself,
  when a task has no reference rows or no shared episodes.
- ``failure_rate``, ``penalty_mean``: share of failed episodes and illegal actions per episode, averaged
  with the same convention (each seed's rate, then the mean over seeds).
- ``step_seconds``: planning wall time per environment step over all seeds.

The Markdown copy ends with a note that states the convention and which rows used which.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from trifle.evaluation.aggregate import (
    EPISODES_RULE,
    OVER_EPISODES,
    OVER_SEEDS,
    SEEDS_RULE,
    Group,
    estimate,
    group_records,
    load_evaluation,
)
from trifle.evaluation.tables import markdown_table, write_table
from trifle.io import atomic_path
from trifle.planning.methods import method, reference_method

__all__ = ["SUMMARY_COLUMNS", "load_evaluation", "plot_returns", "summarize", "summary_note", "write_summary"]

SUMMARY_COLUMNS = (
    "task",
    "method",
    "dt_target",
    "n_seeds",
    "n_episodes",
    "return_mean",
    "return_sem",
    "sem_over",
    "diff_vs_tt",
    "diff_vs_tt_sem",
    "failure_rate",
    "penalty_mean",
    "step_seconds",
)
EPISODE_KEYS = ("returns", "successes", "penalties")
#: Row key (not a CSV column): what ``diff_vs_tt_sem`` is over ("" when the row has no difference).
DIFF_OVER = "diff_sem_over"


def _dt_target(group: Group) -> str:
    """The conditioning target(s) the seeds' files selected ("" for methods without one)."""
    chosen = [float(r["target_return"]) for r in group.records if r.get("target_return") is not None]
    counts = Counter(chosen)
    if len(counts) == 1:
        return f"{chosen[0]:g}"
    return ", ".join(f"{t:g} x{n}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0])))


def _batch_episodes(record: dict[str, Any]) -> Any:
    return (record.get("eval") or {}).get("batch_episodes")


def paired_differences(group: Group, reference: Group) -> list[np.ndarray]:
    """Per seed that has shared episodes, the return differences ``group - reference`` episode by episode.

    Episodes pair by (seed, episode index) where the index is the same (batch, slot) in both files:
    every common index with equal ``eval.batch_episodes`` (or both unknown), else the indices below
    both batch sizes (the first batch of each).
    """
    by_seed = {r["seed"]: r for r in reference.records}
    diffs = []
    for record in group.records:
        ref = by_seed.get(record["seed"])
        if ref is None:
            continue
        ours = np.asarray(record["episodes"]["returns"], float)
        theirs = np.asarray(ref["episodes"]["returns"], float)
        n = min(ours.size, theirs.size)
        batches = (_batch_episodes(record), _batch_episodes(ref))
        if batches[0] != batches[1]:
            n = 0 if None in batches else min(n, *batches)
        if n:
            diffs.append(ours[:n] - theirs[:n])
    return diffs


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x method with the SUMMARY_COLUMNS (the module docstring), in display order.

    Rows also carry ``diff_sem_over`` (what ``diff_vs_tt_sem`` is over; "" without a difference).
    """
    groups = group_records(records, EPISODE_KEYS)
    reference = reference_method()
    rows = []
    for (task, name), group in groups.items():
        returns = group.estimate("returns")
        ref = groups.get((task, reference)) if reference is not None else None
        diffs = paired_differences(group, ref) if ref is not None and ref is not group else []
        diff = estimate(diffs) if diffs else None
        rows.append(
            {
                "task": task,
                "method": name,
                "dt_target": _dt_target(group),
                "n_seeds": len(group.records),
                "n_episodes": group.n_episodes,
                "return_mean": returns.mean,
                "return_sem": returns.sem,
                "sem_over": returns.over,
                "diff_vs_tt": "" if diff is None else diff.mean,
                "diff_vs_tt_sem": "" if diff is None else diff.sem,
                DIFF_OVER: "" if diff is None else diff.over,
                "failure_rate": 1.0 - group.estimate("successes").mean,
                "penalty_mean": group.estimate("penalties").mean,
                "step_seconds": group.step_seconds(),
            }
        )
    return rows


def summary_note(rows: list[dict[str, Any]]) -> str:
    """The Markdown note under the summary table: the standard-error convention and which rows used it."""
    counts = Counter(r["sem_over"] for r in rows)
    odd = [
        f"{r['task']} {r['method']}" for r in rows if r[DIFF_OVER] not in ("", r["sem_over"])
    ]  # a row whose paired seeds are fewer than its seeds
    text = (
        "\nStandard errors (one convention for every table): over seeds where a row has several seeds "
        f"(the mean of the per-seed means; {SEEDS_RULE}), over episodes where it has one ({EPISODES_RULE}); "
        f"`sem_over` names the one each row used (rows over seeds: {counts[OVER_SEEDS]}, "
        f"over episodes: {counts[OVER_EPISODES]}), and `diff_vs_tt_sem` follows the same rule over the seeds "
        "with paired episodes"
    )
    return text + (f" (over episodes, one paired seed, for: {', '.join(odd)}).\n" if odd else ".\n")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """The summary CSV and its Markdown copy (:func:`write_table`), the Markdown ending with the note."""
    path = Path(path)
    write_table(path, rows, SUMMARY_COLUMNS)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_table(rows, SUMMARY_COLUMNS) + summary_note(rows))


def plot_returns(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean return +- standard error per method (its registry label), one panel per task, as a PNG."""
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
        ax.set_xticks(x, [method(r["method"]).label for r in task_rows])
        ax.set_title(task)
        ax.set_ylabel("mean return")
        ax.axhline(0.0, color="black", linewidth=0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
