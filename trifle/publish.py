"""Publish a run's tables and figure into the repository's docs and README.

The pipeline's outputs (`results/tables`, `results/figures`) are DVC-tracked, not committed, so a
fresh clone reruns the workflow. `python -m trifle.publish` after a run copies the Markdown tables
and figures it finds to `docs/results/` and the tables into README.md between its marker comments; a test
checks that the README shows exactly the published tables.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from trifle.io import atomic_path

TABLES = ("summary", "models", "mujoco", "safe_rl")
FIGURES = ("returns.png", "mujoco_scores.png")
#: The table whose run draws each figure (a figure is published with its table).
FIGURE_OF_TABLE = {"returns.png": "summary", "mujoco_scores.png": "mujoco"}


def publish(root: Path = Path("."), results: Path | None = None, tables: tuple[str, ...] = TABLES) -> None:
    """Copy the tables and figures found under ``results`` (default ``<root>/results``) into ``root``.

    ``results`` may belong to another checkout: the MuJoCo CPU configuration runs in its own copy, so
    that its models table does not replace the default run's.
    """
    results = root / "results" if results is None else Path(results)
    docs = root / "docs" / "results"
    readme = root / "README.md"
    text = readme.read_text()
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise SystemExit(
            f"python -m trifle.publish: unknown table(s) {unknown}; expected some of {list(TABLES)}"
        )
    for name in tables:
        source = results / "tables" / f"{name}.md"
        if not source.is_file():
            continue  # a run of another configuration (toy tasks only, MuJoCo only) keeps the others
        table = source.read_text()
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
        if FIGURE_OF_TABLE[name] not in tables or not (results / "figures" / name).is_file():
            continue
        with atomic_path(docs / name) as tmp:
            shutil.copyfile(results / "figures" / name, tmp)
    with atomic_path(readme) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trifle.publish", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=Path, default=None, help="results directory of the run (default: results)"
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        default=list(TABLES),
        help=f"tables to publish (default: all of {', '.join(TABLES)})",
    )
    args = parser.parse_args(argv)
    publish(Path("."), args.results, tuple(args.tables))


if __name__ == "__main__":
    main()
