"""Gym-MuJoCo (D4RL) result tables laid out like the Trifle paper's Tables 1 and 2, plus a score figure.

The grouping, checks, means and standard errors are :mod:`trifle.evaluation.aggregate`'s, the one
convention of every table (several seeds: mean of the per-seed means, standard error over seeds; one
seed: over its episodes; the ``sem_over`` column says which). This module holds what only the Gym-MuJoCo
tables have: normalized D4RL scores, the share of steps that broke the action constraint, the published
TT and DT scores, the split between the main table and the constrained one (the method registry's
``tables``), and the paper layouts (Markdown) and figure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import DataError
from trifle.evaluation import aggregate
from trifle.evaluation.aggregate import Group, convention_phrase, group_records, load_evaluation
from trifle.evaluation.tables import write_table
from trifle.io import atomic_path
from trifle.planning.methods import method, sort_key

MUJOCO_COLUMNS = (
    "task",
    "method",
    "n_seeds",
    "score_mean",
    "score_sem",
    "sem_over",
    "violation_rate",
    "step_seconds",
    "return_mean",
    "return_sem",
)
#: Method-registry table names (trifle.planning.methods.TABLES) of the two MuJoCo tables.
MAIN_TABLE, CONSTRAINED_TABLE = "mujoco", "constrained"

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

#: Keys a MuJoCo evaluation record has besides aggregate.REQUIRED_KEYS, and its per-episode series.
MUJOCO_KEYS = ("env", "dataset", "constrained")
EPISODE_KEYS = ("scores", "returns", "steps", "violations")
# The paper's row order: datasets from best to worst data, environments alphabetically as in D4RL.
DATASET_ORDER = ("medium-expert", "medium", "medium-replay")
ENV_ORDER = ("halfcheetah", "hopper", "walker2d")
ENV_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
DASH = "–"


# --------------------------------------------------------------------------- records and rows


def check_record(record: dict[str, Any]) -> None:
    """Fail early, naming the run, when a record lacks what the tables need (rather than a KeyError later)."""
    aggregate.check_record(record, EPISODE_KEYS, MUJOCO_KEYS)


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read evaluation files with :func:`load_evaluation` and check the extra MuJoCo keys."""
    records = [load_evaluation(Path(p)) for p in paths]
    for record in records:
        check_record(record)
    return records


def _score_row(group: Group) -> dict[str, Any]:
    constrained = bool(group.single("constrained"))
    if constrained != method(group.method).constrained:
        raise DataError(
            f"{group.files}: run {'with' if constrained else 'without'} the action constraint, but method "
            f"{group.method!r} is declared {'un' if constrained else ''}constrained in its planner config "
            "(an override of planner.constrained?); its rows would land in the wrong table"
        )
    score, ret = group.estimate("scores"), group.estimate("returns")
    steps = sum(int(np.sum(r["episodes"]["steps"])) for r in group.records)
    violations = sum(int(np.sum(r["episodes"]["violations"])) for r in group.records)
    return {
        "task": group.task,
        "method": group.method,
        "n_seeds": len(group.records),
        "score_mean": score.mean,
        "score_sem": score.sem,
        "sem_over": score.over,
        "return_mean": ret.mean,
        "return_sem": ret.sem,
        "violation_rate": violations / steps if steps else 0.0,
        "step_seconds": group.step_seconds(),
        # Not CSV columns: kept so the paper layouts need not parse task names.
        "env": group.single("env"),
        "dataset": group.single("dataset"),
        "constrained": constrained,
    }


def score_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method), by task then the registry's method order, with the MUJOCO_COLUMNS.

    ``score_mean``/``score_sem`` and ``return_mean``/``return_sem`` follow the aggregate convention
    (``sem_over``: ``seeds`` with several seeds, the per-seed means; ``episodes`` with one).
    ``violation_rate`` is violating steps over all steps of all episodes; ``step_seconds`` is planning
    wall time per environment step. Rows also carry ``env``, ``dataset`` and ``constrained``; a record
    whose ``constrained`` flag contradicts its method's planner config is a DataError naming the files.
    """
    return [_score_row(g) for g in group_records(records, EPISODE_KEYS, MUJOCO_KEYS).values()]


def table_rows(rows: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """The rows of the methods the registry lists in ``table`` (``mujoco`` or ``constrained``)."""
    return [r for r in rows if table in method(r["method"]).tables]


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


def _error_note(rows: list[dict[str, Any]]) -> str:
    """What the ± of ``rows`` is over, entry by entry (the aggregate convention), and their seed counts."""
    cells = {f"{method(r['method']).label} on {r['task']}": r["sem_over"] for r in rows}
    counts = sorted({int(r["n_seeds"]) for r in rows})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean ± standard error {convention_phrase(cells)}; {seeds} seed{'' if counts == [1] else 's'} per entry"


def _average(values: list[float | None]) -> str:
    """The paper averages a column only where it has every entry; a partial average would mislead."""
    if not values or any(v is None for v in values):
        return DASH
    return f"{sum(values) / len(values):.1f}"


def _published_methods() -> list[str]:
    return sorted(PUBLISHED, key=sort_key)


def _in_order(rows: list[dict[str, Any]]) -> list[str]:
    """The methods of ``rows`` in the registry's display order."""
    return sorted({r["method"] for r in rows}, key=sort_key)


def behaviour_score(path: Path, env: str) -> tuple[float, float, int]:
    """Normalized score of the policy behind a dataset: mean and standard error over its complete episodes.

    Complete means ended by a fall or the step limit; the unfinished tail is left out. This is the line
    planning must beat: a planner below it imitates worse than the data it learned from.
    """
    from trifle.data.d4rl_format import load_dataset
    from trifle.data.labels import segment_episodes
    from trifle.envs.mujoco import normalized_score

    data = load_dataset(path)
    ends = np.flatnonzero(np.asarray(data.terminals, bool) | np.asarray(data.timeouts, bool))
    if not ends.size:
        raise DataError(f"{path}: no complete episode, so no behaviour score")
    starts, _ = segment_episodes(data.terminals, data.timeouts)
    sums = np.add.reduceat(np.asarray(data.rewards, np.float64), starts)[: len(ends)]
    scores = normalized_score(env, sums, data.attrs)  # a Minari dataset's own reference scores win
    sem = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else math.nan
    return float(scores.mean()), sem, len(scores)


def paper_table1_markdown(
    rows: list[dict[str, Any]], behaviour: dict[str, tuple[float, float, int]] | None = None
) -> str:
    """Normalized scores laid out like the paper's Table 1, published TT/DT numbers beside ours.

    Only the methods the registry lists in the ``mujoco`` table count. One line per (dataset,
    environment); a column per method present ("<registry label> (ours)", mean +- sem); a final Average
    line per column where the column has a value on every line, else "–". With ``behaviour`` (task ->
    :func:`behaviour_score`), a "Data (behaviour)" column shows the score of the policy behind each
    dataset, so a reader sees at once whether planning adds anything.
    """
    rows = table_rows(rows, MAIN_TABLE)
    if not rows:
        return "No unconstrained MuJoCo runs.\n"
    tasks = _lines(rows)
    methods = _in_order(rows)
    published = _published_methods()
    by_key = {(r["task"], r["method"]): r for r in rows}
    labels = _labels({r["task"]: r for r in rows})
    header = ["Dataset", "Environment"]
    header += [f"{method(m).label} (published)" for m in published]
    behaviour = behaviour or {}
    extra = 1 if behaviour else 0
    header += ["Data (behaviour)"] * extra
    header += [f"{method(m).label} (ours)" for m in methods]
    body, columns = [], [[] for _ in range(len(published) + extra + len(methods))]
    for task in tasks:
        values: list[float | None] = [PUBLISHED[m].get(task) for m in published]
        cells = [DASH if v is None else f"{v:.1f}" for v in values]
        if extra:
            data = behaviour.get(task)
            values.append(None if data is None else data[0])
            cells.append(DASH if data is None else _cell(data[0], data[1]))
        for name in methods:
            row = by_key.get((task, name))
            values.append(None if row is None else row["score_mean"])
            cells.append(DASH if row is None else _cell(row["score_mean"], row["score_sem"]))
        for column, value in zip(columns, values, strict=True):
            column.append(value)
        body.append([*labels[task], *cells])
    body.append(["Average", "", *(_average(c) for c in columns)])
    note = (
        "\nPublished numbers are from the TT and DT papers (normalized D4RL scores, v2 datasets); "
        f"ours are {_error_note(rows)}."
    )
    if behaviour:
        counts = ", ".join(f"{task}: {behaviour[task][2]}" for task in tasks if task in behaviour)
        note += (
            " Data (behaviour): the normalized score of the dataset's own complete episodes (mean ± s.e.; "
            f"episodes: {counts})."
        )
    note += "\n"
    return _markdown(header, body) + note


def paper_table2_markdown(rows: list[dict[str, Any]]) -> str:
    """Action-constrained results laid out like the paper's Table 2: score and violation rate per planner.

    Only the methods the registry lists in the ``constrained`` table count, each with its registry
    label. Violation rates are percentages of environment steps.
    """
    rows = table_rows(rows, CONSTRAINED_TABLE)
    if not rows:
        return "No constrained (action-constrained) runs.\n"
    methods = _in_order(rows)
    by_key = {(r["task"], r["method"]): r for r in rows}
    labels = _labels({r["task"]: r for r in rows})
    header = ["Dataset", "Environment"]
    for name in methods:
        label = method(name).label
        header += [f"{label} score", f"{label} return", f"{label} violation rate"]
    body = []
    for task in _lines(rows):
        cells = [*labels[task]]
        for name in methods:
            row = by_key.get((task, name))
            if row is None:
                cells += [DASH, DASH, DASH]
            else:
                cells += [
                    _cell(row["score_mean"], row["score_sem"]),
                    _cell(row["return_mean"], row["return_sem"]),
                    f"{100 * row['violation_rate']:.2f}%",
                ]
        body.append(cells)
    return _markdown(header, body) + f"\nScores and returns: {_error_note(rows)}.\n"


# --------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_mujoco_tables(
    records: list[dict[str, Any]],
    mujoco_csv: Path,
    safe_csv: Path,
    behaviour: dict[str, tuple[float, float, int]] | None = None,
) -> list[dict[str, Any]]:
    """Write the rows of the methods the registry lists in the ``mujoco`` table to ``mujoco_csv`` and those
    it lists in the ``constrained`` table to ``safe_csv``.

    The CSVs come from :func:`write_table`; its generic Markdown copies are then replaced by the paper
    layouts, which are what a reader compares against the paper. All records are checked before any file
    is written, so a bad record leaves the previous tables intact. Returns every row (:func:`score_rows`).
    """
    rows = score_rows(records)
    plain, safe = table_rows(rows, MAIN_TABLE), table_rows(rows, CONSTRAINED_TABLE)
    mujoco_csv, safe_csv = Path(mujoco_csv), Path(safe_csv)
    write_table(mujoco_csv, plain, MUJOCO_COLUMNS)
    write_table(safe_csv, safe, MUJOCO_COLUMNS)
    _write_text(mujoco_csv.with_suffix(".md"), paper_table1_markdown(plain, behaviour))
    _write_text(safe_csv.with_suffix(".md"), paper_table2_markdown(safe))
    return rows


def plot_scores(rows: list[dict[str, Any]], path: Path) -> None:
    """Normalized score +- sem per method (registry label and order), one panel per task, the published
    scores marked, as a PNG. Only the methods the registry lists in one of the two MuJoCo tables count."""
    rows = [r for r in rows if {MAIN_TABLE, CONSTRAINED_TABLE} & set(method(r["method"]).tables)]
    if not rows:
        raise DataError(f"{path}: no MuJoCo score rows to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        _plot_task(
            ax, task, sorted((r for r in rows if r["task"] == task), key=lambda r: sort_key(r["method"]))
        )
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _plot_task(ax: Any, task: str, task_rows: list[dict[str, Any]]) -> None:
    x = np.arange(len(task_rows))
    sems = [0.0 if math.isnan(r["score_sem"]) else r["score_sem"] for r in task_rows]
    ax.bar(x, [r["score_mean"] for r in task_rows], yerr=sems, capsize=4, color="#4c72b0")
    ax.set_xticks(x, [method(r["method"]).label for r in task_rows])
    published = [m for m in _published_methods() if task in PUBLISHED[m]]
    for name, style in zip(published, ("--", ":", "-.", (0, (5, 1))), strict=False):
        ax.axhline(
            PUBLISHED[name][task], color="#c44e52", linestyle=style, label=f"{method(name).label} (published)"
        )
    if published:
        ax.legend(fontsize=7)
    ax.set_title(task)
    ax.set_ylabel("normalized score")
    ax.axhline(0.0, color="black", linewidth=0.5)
