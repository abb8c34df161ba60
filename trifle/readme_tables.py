"""Copy the pipeline's Markdown tables into README.md between their marker comments.

`python -m trifle.readme_tables` after a run keeps the README's results exactly the committed
`results/tables/*.md` (a test checks they agree).
"""

from __future__ import annotations

import re
from pathlib import Path

TABLES = ("summary", "models")


def update_readme(readme: Path = Path("README.md"), tables_dir: Path = Path("results/tables")) -> None:
    text = readme.read_text()
    for name in TABLES:
        table = (tables_dir / f"{name}.md").read_text()
        pattern = rf"<!-- {name}-table:start -->\n.*?<!-- {name}-table:end -->"
        text = re.sub(
            pattern,
            lambda _m, t=table, n=name: f"<!-- {n}-table:start -->\n{t}<!-- {n}-table:end -->",
            text,
            flags=re.S,
        )
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
