"""What the Snakemake report and DVC show of the result tables and training curves.

Snakemake's HTML report offers a CSV only as a download; an HTML file it shows in the page. Each table
rule therefore also writes ``<table>.html`` (:func:`write_html_table`: the CSV's cells, verbatim, and the
notes its Markdown copy ends with) and marks that for the report. DVC's metrics are key-value files, so
the tables DVC tracks as metrics get a JSON copy too (:func:`write_table_metrics`: the numeric cells,
nested by the table's key columns). The training-curves figure (:func:`plot_curves`) draws every trained
model's held-out curve from its ``<checkpoint>.curve.csv`` (``trifle.models.curves``).

These read only files the workflow has written, so they live in the evaluation layer and import no stage;
the workflow runs them as ``python -m trifle.evaluation.report_tables {table,curves} ...``.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trifle.errors import DataError, TrifleError
from trifle.io import atomic_path
from trifle.models.curves import CURVE_SUFFIX, read_curve

#: Held-out metric of a curve and its training-data counterpart, by preference: the log-likelihood
#: where a model has one, else DT's regression loss (continuous actions), else the critic's TD error.
HELDOUT_METRICS = (
    ("heldout_ll", "train_ll"),
    ("heldout_loss", "train_eval_loss"),
    ("heldout_td_rmse", "train_td_rmse"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; white-space: nowrap; }
th { background: #eee; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f7f7f7; }
p.note { max-width: 60em; font-size: 13px; }
"""


def read_table(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """A result table's header and rows, as the text the CSV holds."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{path}: cannot read the table ({err})") from err
    if not lines:
        raise DataError(f"{path}: empty table, expected a header line")
    return lines[0], lines[1:]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() != ""


def markdown_notes(path: str | Path) -> list[str]:
    """The paragraphs after the table of a Markdown copy (the summary's standard-error convention, ...)."""
    lines = Path(path).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("|"))
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def html_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], title: str, notes: Sequence[str] = ()
) -> str:
    """A standalone HTML page: the cells verbatim (escaped), numbers right-aligned, then the notes."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "\n".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(c)}</td>' if _is_number(c) else f"<td>{html.escape(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    paragraphs = "".join(f'<p class="note">{html.escape(n)}</p>\n' for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n{paragraphs}"
        "</body>\n</html>\n"
    )


def write_html_table(csv_path: str | Path, out: str | Path, notes_from: str | Path | None = None) -> Path:
    """Write the table at ``csv_path`` as the HTML page the report shows (with the notes of the Markdown
    copy ``notes_from``, if given), atomically."""
    header, rows = read_table(csv_path)
    notes = markdown_notes(notes_from) if notes_from else []
    text = html_table(header, rows, Path(csv_path).name, notes)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return Path(out)


def table_metrics(header: Sequence[str], rows: Iterable[Sequence[str]], keys: Sequence[str]) -> dict:
    """The numeric cells of a table, nested by its ``keys`` columns (a number key gets its column's name,
    ``seed0``): the key-value layout of a DVC metrics file."""
    missing = [k for k in keys if k not in header]
    if missing:
        raise DataError(f"table: no key column(s) {missing}; columns: {list(header)}")
    out: dict[str, Any] = {}
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        node = out
        for key in keys:
            name = cells[key]
            node = node.setdefault(f"{key}{name}" if _is_number(name) else name, {})
        node.update({c: float(v) for c, v in cells.items() if c not in keys and _is_number(v)})
    return out


def write_table_metrics(csv_path: str | Path, out: str | Path, keys: Sequence[str]) -> Path:
    """Write :func:`table_metrics` of the table at ``csv_path`` as JSON, atomically."""
    header, rows = read_table(csv_path)
    text = json.dumps(table_metrics(header, rows, keys), indent=2) + "\n"
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return Path(out)


def curve_run(path: str | Path) -> tuple[str, str, str]:
    """(task, model, seed) of a curve from its place in the checkpoint layout,
    ``.../checkpoints/<task>/<model>[/<kind>]/seed<N>.curve.csv``."""
    path = Path(path)
    seed = path.name[: -len(CURVE_SUFFIX)] if path.name.endswith(CURVE_SUFFIX) else path.stem
    parts = path.parts[:-1]
    if "checkpoints" in parts:
        at = len(parts) - 1 - parts[::-1].index("checkpoints")
        if len(parts) > at + 2:
            return parts[at + 1], "/".join(parts[at + 2 :]), seed
    if len(parts) < 2:
        raise DataError(f"{path}: expected a curve at <task>/<model>/seed<N>{CURVE_SUFFIX}")
    return parts[-2], parts[-1], seed


def heldout_metric(curves: Iterable[list[dict[str, float | None]]]) -> tuple[str, str]:
    """The first of :data:`HELDOUT_METRICS` that any of ``curves`` has a value of."""
    curves = list(curves)
    for heldout, train in HELDOUT_METRICS:
        if any(row.get(heldout) is not None for rows in curves for row in rows):
            return heldout, train
    raise DataError("curves: none holds a held-out metric (" + ", ".join(h for h, _ in HELDOUT_METRICS) + ")")


def _points(rows: list[dict[str, float | None]], column: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[column]) for r in rows if r.get(column) is not None and r["step"] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(paths: Sequence[str | Path], out: str | Path) -> Path:
    """One panel per task (row) and model (column, in order of first appearance in ``paths``): the held-out
    metric against the step (solid, one colour per seed) with its training-data counterpart (dashed). A
    model whose only held-out value is the last one (the circuit) shows it as a point at the end of its
    training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not paths:
        raise DataError("curves: no curve files given")
    runs: dict[tuple[str, str], dict[str, list]] = {}
    for path in paths:
        task, model, seed = curve_run(path)
        runs.setdefault((task, model), {})[seed] = read_curve(path)
    tasks = sorted({t for t, _ in runs})
    models = list(dict.fromkeys(m for _, m in runs))  # in the order given (the workflow's: as trained)
    fig, axes = plt.subplots(
        len(tasks), len(models), figsize=(3.8 * len(models), 2.7 * len(tasks)), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            seeds = runs.get((task, model))
            if not seeds:
                ax.axis("off")
                continue
            heldout, train = heldout_metric(seeds.values())
            for k, (seed, rows) in enumerate(sorted(seeds.items())):
                colour = colours[k % len(colours)]
                ax.plot(*_points(rows, heldout), "o-", color=colour, markersize=3, label=seed)
                ax.plot(*_points(rows, train), ".--", color=colour, alpha=0.6, linewidth=1, markersize=3)
            ax.set_title(f"{task}: {model}", fontsize=9)
            ax.set_xlabel("EM epoch" if model == "pc" else "step", fontsize=8)
            ax.set_ylabel(f"{heldout} (train: dashed)", fontsize=8)
            ax.tick_params(labelsize=7)
            if 1 < len(seeds) <= 6:
                ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trifle.evaluation.report_tables",
        description="Report and DVC views of the result tables and training curves.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="an HTML page (and a JSON metrics file) of a CSV table")
    table.add_argument("csv", type=Path)
    table.add_argument("--html", type=Path, help="write the table as an HTML page here")
    table.add_argument("--notes", type=Path, help="the table's Markdown copy, whose closing notes to add")
    table.add_argument("--json", type=Path, help="write the numeric cells as a DVC metrics file here")
    table.add_argument("--keys", nargs="+", default=["task"], help="key columns of the JSON nesting")
    curves = sub.add_parser("curves", help="the training-curves figure of curve files")
    curves.add_argument("--out", type=Path, required=True)
    curves.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            if args.html:
                write_html_table(args.csv, args.html, args.notes)
            if args.json:
                write_table_metrics(args.csv, args.json, args.keys)
        else:
            plot_curves(args.paths, args.out)
    except (TrifleError, OSError) as err:
        print(f"trifle report_tables: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
