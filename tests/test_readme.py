"""The README stays true: its results table is the pipeline's, its commands are the ones CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_table_is_the_committed_pipeline_output():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- models-table:start -->\n(.*)<!-- models-table:end -->", readme, re.S)
    assert block, "README lacks the models-table block"
    assert block.group(1) == (REPO / "results" / "tables" / "models.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest"
    assert command in readme
    assert command.replace("pip install", "pip install -q") in ci
