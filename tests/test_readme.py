"""The README stays true: its results table is the pipeline's, its commands are the ones CI runs."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("table", ["models", "summary", "mujoco", "safe_rl"])
def test_readme_results_tables_are_the_published_pipeline_output(table):
    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {table}-table:start -->\n(.*)<!-- {table}-table:end -->", readme, re.S)
    assert block, f"README lacks the {table}-table block"
    assert block.group(1) == (REPO / "docs" / "results" / f"{table}.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = (
        'export PIP_CONSTRAINT="$PWD/requirements/lock.txt" && '
        "pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest"
    )
    assert command in readme
    assert command.replace("pip install", "pip install -q") in ci
