"""Publish a run's tables and figure into the repository's docs and README.

The pipeline's outputs (`results/tables`, `results/figures`) are DVC-tracked, not committed, so a
fresh clone reruns the workflow. `python -m trifle.publish` after a run copies the Markdown tables
and the returns figure to `docs/results/` and into README.md between its marker comments; a test
checks that the README shows exactly the published tables.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from trifle.io import atomic_path

TABLES = ("summary", "models")
FIGURES = ("returns.png",)


def publish(root: Path = Path(".")) -> None:
    results, docs = root / "results", root / "docs" / "results"
    readme = root / "README.md"
    text = readme.read_text()
    for name in TABLES:
        table = (results / "tables" / f"{name}.md").read_text()
        with atomic_path(docs / f"{name}.md") as tmp:
            tmp.write_text(table)
        block = f"<!-- {name}-table:start -->\n{table}<!-- {name}-table:end -->"
        text = re.sub(
            rf"<!-- {name}-table:start -->\n.*?<!-- {name}-table:end -->",
            lambda _m, b=block: b,
            text,
            flags=re.S,
        )
    for name in FIGURES:
        with atomic_path(docs / name) as tmp:
            shutil.copyfile(results / "figures" / name, tmp)
    with atomic_path(readme) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    publish()
