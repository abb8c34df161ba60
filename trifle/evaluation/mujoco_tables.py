"""MuJoCo (D4RL) result tables laid out like the Trifle paper's Tables 1 and 2, plus a score figure.

The generic summary (:mod:`trifle.evaluation.summary`) pools episodes and reports raw returns; the paper
compares normalized D4RL scores across seeds and, for the action-constrained runs, the share of steps that
broke the constraint. This module computes those numbers from the per-seed evaluation records and writes
them as CSV (for scripts) and as Markdown laid out like the paper (for reading beside it).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import DataError
from trifle.evaluation.summary import METHOD_ORDER, load_evaluation
from trifle.io import atomic_path
from trifle.stages.tables import write_table

MUJOCO_COLUMNS = (
    "task",
    "method",
    "n_seeds",
    "score_mean",
    "score_sem",
    "violation_rate",
    "step_seconds",
    "return_mean",
    "return_sem",
)

# Normalized D4RL scores (x100, v2 datasets) reported by the Trajectory Transformer (Janner et al., 2021)
# and Decision Transformer (Chen et al., 2021) papers, as quoted in the Trifle paper's Table 1.
PUBLISHED: dict[str, dict[str, float]] = {
    "tt": {
        "halfcheetah-medium-expert-v2": 95.0,
        "hopper-medium-expert-v2": 110.0,
        "walker2d-medium-expert-v2": 101.9,
        "halfcheetah-medium-v2": 46.9,
        "hopper-medium-v2": 61.1,
        "walker2d-medium-v2": 79.0,
        "halfcheetah-medium-replay-v2": 41.9,
        "hopper-medium-replay-v2": 91.5,
        "walker2d-medium-replay-v2": 82.6,
    },
    "dt": {
        "halfcheetah-medium-expert-v2": 86.8,
        "hopper-medium-expert-v2": 107.6,
        "walker2d-medium-expert-v2": 108.1,
        "halfcheetah-medium-v2": 42.6,
        "hopper-medium-v2": 67.6,
        "walker2d-medium-v2": 74.0,
        "halfcheetah-medium-replay-v2": 36.6,
        "hopper-medium-replay-v2": 82.7,
        "walker2d-medium-replay-v2": 66.6,
    },
}

REQUIRED_KEYS = (
    "task",
    "method",
    "seed",
    "env",
    "dataset",
    "constrained",
    "episodes",
    "plan_seconds",
    "env_steps",
)
REQUIRED_EPISODE_KEYS = ("scores", "returns", "steps", "violations")
SAFE_SUFFIX = "-safe"
# The paper's row order: datasets from best to worst data, environments alphabetically as in D4RL.
DATASET_ORDER = ("medium-expert", "medium", "medium-replay")
ENV_ORDER = ("halfcheetah", "hopper", "walker2d")
ENV_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
DASH = "–"


# --------------------------------------------------------------------------- records and rows


def _record_id(record: dict[str, Any]) -> str:
    return f"task={record.get('task', '?')} method={record.get('method', '?')} seed={record.get('seed', '?')}"


def check_record(record: dict[str, Any]) -> None:
    """Fail early, naming the run, when a record lacks what the tables need (rather than a KeyError later)."""
    for key in REQUIRED_KEYS:
        if key not in record:
            raise DataError(f"evaluation record {_record_id(record)}: lacks key '{key}'")
    episodes = record["episodes"]
    for key in REQUIRED_EPISODE_KEYS:
        if key not in episodes:
            raise DataError(f"evaluation record {_record_id(record)}: lacks key 'episodes.{key}'")
    lengths = {key: len(episodes[key]) for key in REQUIRED_EPISODE_KEYS}
    if len(set(lengths.values())) != 1 or not lengths["scores"]:
        raise DataError(
            f"evaluation record {_record_id(record)}: episodes.scores/returns/steps/violations must be non-empty "
            f"lists of one length, got lengths {lengths}"
        )


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read evaluation files with :func:`load_evaluation` and check the extra MuJoCo keys."""
    records = [load_evaluation(Path(p)) for p in paths]
    for record in records:
        check_record(record)
    return records


def method_key(method: str) -> tuple[int, str, bool]:
    """Sort methods by METHOD_ORDER, each "-safe" variant right after its base method."""
    safe = method.endswith(SAFE_SUFFIX)
    base = method[: -len(SAFE_SUFFIX)] if safe else method
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, base, safe)


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _single(group: list[dict[str, Any]], key: str) -> Any:
    """The one value of ``key`` shared by a (task, method) group; mixed values mean mixed-up files."""
    values = {r[key] for r in group}
    if len(values) != 1:
        raise DataError(
            f"evaluation records task={group[0]['task']} method={group[0]['method']}: "
            f"seeds disagree on '{key}' ({sorted(map(str, values))})"
        )
    return values.pop()


def _mean_and_sem(per_seed: list[list[float]]) -> tuple[float, float]:
    """Mean over seeds of each seed's episode mean, and its standard error (see :func:`score_rows`)."""
    episodes = [np.asarray(values, dtype=float) for values in per_seed]
    seed_means = np.array([e.mean() for e in episodes])
    # One seed has no between-seed spread to report; the episode-level error is the best available.
    return float(seed_means.mean()), _sem(seed_means) if len(episodes) >= 2 else _sem(episodes[0])


def _score_row(group: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = [r["seed"] for r in group]
    if len(set(seeds)) != len(seeds):
        raise DataError(
            f"evaluation records task={group[0]['task']} method={group[0]['method']}: duplicate seeds {seeds}"
        )
    score_mean, sem = _mean_and_sem([r["episodes"]["scores"] for r in group])
    return_mean, return_sem = _mean_and_sem([r["episodes"]["returns"] for r in group])
    steps = sum(int(np.sum(r["episodes"]["steps"])) for r in group)
    violations = sum(int(np.sum(r["episodes"]["violations"])) for r in group)
    env_steps = sum(r["env_steps"] for r in group)
    return {
        "task": group[0]["task"],
        "method": group[0]["method"],
        "n_seeds": len(group),
        "score_mean": score_mean,
        "score_sem": sem,
        "return_mean": return_mean,
        "return_sem": return_sem,
        "violation_rate": violations / steps if steps else 0.0,
        "step_seconds": sum(r["plan_seconds"] for r in group) / env_steps if env_steps else float("nan"),
        # Not CSV columns: kept so the paper layouts need not parse task names.
        "env": _single(group, "env"),
        "dataset": _single(group, "dataset"),
        "constrained": bool(_single(group, "constrained")),
    }


def score_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method), sorted by task then method, with the MUJOCO_COLUMNS statistics.

    ``score_mean`` is the mean over seeds of each seed's mean episode score, so every seed weighs the same
    whatever its episode count. ``score_sem`` is the standard error of those per-seed means (ddof=1) when
    there are two or more seeds: it measures training variance, which is what the paper's +- reports.
    With a single seed it falls back to the standard error over that seed's episodes (evaluation noise
    only, so it understates the spread across training runs); it is NaN when only one value exists.
    ``violation_rate`` is violating steps over all steps of all episodes; ``step_seconds`` is planning
    wall time per environment step. Rows also carry ``env``, ``dataset`` and ``constrained``.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        check_record(record)
        groups[(record["task"], record["method"])].append(record)
    keys = sorted(groups, key=lambda k: (k[0], method_key(k[1])))
    return [_score_row(groups[k]) for k in keys]


# --------------------------------------------------------------------------- paper layouts


def _env_dataset(row: dict[str, Any]) -> tuple[str, str]:
    """The row's env and dataset; parsed from a D4RL-style task name when the row lacks them."""
    if "env" in row and "dataset" in row:
        return str(row["env"]), str(row["dataset"])
    env, _, rest = row["task"].partition("-")
    return env, re.sub(r"-v\d+$", "", rest)


def _line_key(row: dict[str, Any]) -> tuple[Any, ...]:
    env, dataset = _env_dataset(row)
    dataset_rank = DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    env_rank = ENV_ORDER.index(env) if env in ENV_ORDER else len(ENV_ORDER)
    return (dataset_rank, dataset, env_rank, env, row["task"])


def _labels(tasks_rows: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Dataset and Environment cells per task; the task name is added when two tasks share a pair."""
    pairs = {task: _env_dataset(row) for task, row in tasks_rows.items()}
    labels = {}
    for task, (env, dataset) in pairs.items():
        env_label = ENV_NAMES.get(env, env.capitalize())
        if list(pairs.values()).count((env, dataset)) > 1:
            env_label += f" ({task})"
        labels[task] = ("-".join(p.capitalize() for p in dataset.split("-")), env_label)
    return labels


def _lines(rows: list[dict[str, Any]]) -> list[str]:
    """Tasks in the paper's row order (Medium-Expert, Medium, Medium-Replay, others; by environment)."""
    first = {}
    for row in rows:
        first.setdefault(row["task"], row)
    return [row["task"] for row in sorted(first.values(), key=_line_key)]


def _cell(mean: float, sem: float) -> str:
    return f"{mean:.1f}" if math.isnan(sem) else f"{mean:.1f} ± {sem:.1f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _seeds_phrase(rows: list[dict[str, Any]]) -> str:
    """What the ± is over: seeds, or a single seed's episodes (see :func:`score_rows`)."""
    counts = sorted({int(r["n_seeds"]) for r in rows})
    if counts == [1]:
        return "the episodes of 1 seed"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"{n} seeds" + (" (the episodes, for a single seed)" if counts[0] == 1 else "")


def _average(values: list[float | None]) -> str:
    """The paper averages a column only where it has every entry; a partial average would mislead."""
    if not values or any(v is None for v in values):
        return DASH
    return f"{sum(values) / len(values):.1f}"


def paper_table1_markdown(rows: list[dict[str, Any]]) -> str:
    """Normalized scores laid out like the paper's Table 1, published TT/DT numbers beside ours.

    One line per (dataset, environment); a column per method present ("<method> (ours)", mean +- sem);
    a final Average line per column where the column has a value on every line, else "–".
    """
    if not rows:
        return "No unconstrained MuJoCo runs.\n"
    tasks = _lines(rows)
    methods = sorted({r["method"] for r in rows}, key=method_key)
    by_key = {(r["task"], r["method"]): r for r in rows}
    labels = _labels({r["task"]: r for r in rows})
    header = ["Dataset", "Environment", "DT (published)", "TT (published)"] + [f"{m} (ours)" for m in methods]
    body, columns = [], [[] for _ in range(2 + len(methods))]
    for task in tasks:
        values: list[float | None] = [PUBLISHED["dt"].get(task), PUBLISHED["tt"].get(task)]
        cells = [DASH if v is None else f"{v:.1f}" for v in values]
        for method in methods:
            row = by_key.get((task, method))
            values.append(None if row is None else row["score_mean"])
            cells.append(DASH if row is None else _cell(row["score_mean"], row["score_sem"]))
        for column, value in zip(columns, values, strict=True):
            column.append(value)
        body.append([*labels[task], *cells])
    body.append(["Average", "", *(_average(c) for c in columns)])
    note = (
        "\nPublished numbers are from the TT and DT papers (normalized D4RL scores, v2 datasets); "
        f"ours are mean ± standard error over {_seeds_phrase(rows)}.\n"
    )
    return _markdown(header, body) + note


def paper_table2_markdown(rows: list[dict[str, Any]]) -> str:
    """Action-constrained results laid out like the paper's Table 2: score and violation rate per planner.

    Only "-safe" methods count; TT is ``tt-safe`` and Trifle is ``trifle-s-safe``. Violation rates are
    percentages of environment steps.
    """
    safe = [r for r in rows if r["method"].endswith(SAFE_SUFFIX)]
    if not safe:
        return "No constrained (action-constrained) runs.\n"
    by_key = {(r["task"], r["method"]): r for r in safe}
    labels = _labels({r["task"]: r for r in safe})
    header = ["Dataset", "Environment"]
    for name in ("TT", "Trifle"):
        header += [f"{name} score", f"{name} return", f"{name} violation rate"]
    body = []
    for task in _lines(safe):
        cells = [*labels[task]]
        for method in ("tt-safe", "trifle-s-safe"):
            row = by_key.get((task, method))
            if row is None:
                cells += [DASH, DASH, DASH]
            else:
                cells += [
                    _cell(row["score_mean"], row["score_sem"]),
                    _cell(row["return_mean"], row["return_sem"]),
                    f"{100 * row['violation_rate']:.2f}%",
                ]
        body.append(cells)
    return _markdown(header, body) + f"\nMean ± standard error over {_seeds_phrase(safe)}.\n"


# --------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_mujoco_tables(records: list[dict[str, Any]], mujoco_csv: Path, safe_csv: Path) -> None:
    """Write unconstrained rows to ``mujoco_csv`` and constrained rows to ``safe_csv``.

    The CSVs come from :func:`write_table`; its generic Markdown copies are then replaced by the paper
    layouts, which are what a reader compares against the paper. All records are checked before any file
    is written, so a bad record leaves the previous tables intact.
    """
    for record in records:
        check_record(record)
    plain = score_rows([r for r in records if not r["constrained"]])
    safe = score_rows([r for r in records if r["constrained"]])
    mujoco_csv, safe_csv = Path(mujoco_csv), Path(safe_csv)
    write_table(mujoco_csv, plain, MUJOCO_COLUMNS)
    write_table(safe_csv, safe, MUJOCO_COLUMNS)
    _write_text(mujoco_csv.with_suffix(".md"), paper_table1_markdown(plain))
    # Constrained rows are "-safe" methods by convention; the CSV keeps them all, the layout shows TT/Trifle.
    _write_text(safe_csv.with_suffix(".md"), paper_table2_markdown(safe))


def plot_scores(rows: list[dict[str, Any]], path: Path) -> None:
    """Normalized score +- sem per method, one panel per task, published TT/DT scores marked, as a PNG."""
    if not rows:
        raise DataError(f"{path}: no MuJoCo score rows to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        _plot_task(
            ax, task, sorted((r for r in rows if r["task"] == task), key=lambda r: method_key(r["method"]))
        )
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _plot_task(ax: Any, task: str, task_rows: list[dict[str, Any]]) -> None:
    x = np.arange(len(task_rows))
    sems = [0.0 if math.isnan(r["score_sem"]) else r["score_sem"] for r in task_rows]
    ax.bar(x, [r["score_mean"] for r in task_rows], yerr=sems, capsize=4, color="#4c72b0")
    ax.set_xticks(x, [r["method"] for r in task_rows])
    for name, style in (("tt", "--"), ("dt", ":")):
        if task in PUBLISHED[name]:
            ax.axhline(
                PUBLISHED[name][task], color="#c44e52", linestyle=style, label=f"{name.upper()} (published)"
            )
    if any(task in published for published in PUBLISHED.values()):
        ax.legend(fontsize=7)
    ax.set_title(task)
    ax.set_ylabel("normalized score")
    ax.axhline(0.0, color="black", linewidth=0.5)
