"""Writing result tables: one CSV and a Markdown copy beside it, with one number format.

Every table of the project (models, summary, Gym-MuJoCo scores) goes through :func:`write_table`, so a
formatting change is made once. It lives in the evaluation layer, below the stages, so that changing
how numbers print never touches the code fingerprint of a stage that trains or evaluates.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from trifle.io import atomic_path


def format_value(value: Any) -> str:
    """Floats to 4 decimals; NaN and None (the quantity does not apply, e.g. a critic's likelihood) empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Write ``rows`` as CSV at ``path`` and as Markdown beside it (same name, .md)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: format_value(r[c]) for c in columns} for r in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_table(rows, columns))
