"""What the Snakemake report and DVC show: the tables as HTML, their JSON metrics, the training-curves figure,
the captions, and the files dvc.yaml declares as metrics and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from trifle.errors import DataError
from trifle.evaluation.report_tables import (
    curve_run,
    heldout_metric,
    plot_curves,
    read_table,
    table_metrics,
    write_html_table,
    write_table_metrics,
)
from trifle.evaluation.tables import write_table
from trifle.models.curves import read_curve

from workflow_support import REPO, snakemake

COLUMNS = ("task", "method", "seed", "return_mean", "sem_over", "note")
ROWS = [
    {"task": "taxi", "method": "tt", "seed": 0, "return_mean": -12.25, "sem_over": "episodes", "note": None},
    {"task": "taxi", "method": "a<b&c", "seed": 1, "return_mean": 3.0, "sem_over": "seeds", "note": '"x"'},
    {"task": "lake", "method": "tt", "seed": 0, "return_mean": float("nan"), "sem_over": "", "note": "y, z"},
]


class Cells(HTMLParser):
    """The text of every table cell, row by row, and the notes' paragraphs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self._cell: list[str] | None = None
        self._note: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p":
            self._note = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        for part in (self._cell, self._note):
            if part is not None:
                part.append(data)


def test_the_html_table_holds_the_csv_values(tmp_path):
    csv_path = tmp_path / "summary.csv"
    write_table(csv_path, ROWS, COLUMNS)
    md = tmp_path / "summary.md"
    md.write_text(md.read_text() + "\nStandard errors over seeds & episodes <as noted>.\n\nSecond note.\n")
    out = write_html_table(csv_path, tmp_path / "summary.html", notes_from=md)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "a&lt;b&amp;c" in page
    parser = Cells()
    parser.feed(page)
    header, rows = read_table(csv_path)
    assert parser.rows == [header, *rows]
    assert parser.rows[2][1] == "a<b&c" and parser.rows[1][3] == "-12.2500" and parser.rows[3][3] == ""
    assert parser.notes == ["Standard errors over seeds & episodes <as noted>.", "Second note."]
    assert '<td class="num">-12.2500</td>' in page and "<td>episodes</td>" in page
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_json_metrics_nest_the_numbers_by_the_key_columns(tmp_path):
    csv_path = tmp_path / "models.csv"
    write_table(csv_path, ROWS, COLUMNS)
    assert table_metrics(*read_table(csv_path), keys=["task", "method", "seed"]) == {
        "taxi": {"tt": {"seed0": {"return_mean": -12.25}}, "a<b&c": {"seed1": {"return_mean": 3.0}}},
        "lake": {"tt": {"seed0": {}}},
    }
    out = write_table_metrics(csv_path, tmp_path / "models.json", ["task", "method"])
    assert json.loads(out.read_text())["taxi"]["tt"] == {"seed": 0.0, "return_mean": -12.25}
    with pytest.raises(DataError, match="key column"):
        table_metrics(*read_table(csv_path), keys=["model"])


def _curve(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_curves_figure_plots_every_model_with_its_own_held_out_metric(tmp_path):
    root = tmp_path / "results" / "checkpoints"
    paths = [
        _curve(
            root / "taxi" / "gpt" / f"seed{s}.curve.csv",
            f"step,train_loss,heldout_ll,train_ll\n10,4,-2,-2.{s}\n",
        )
        for s in (0, 1)
    ]
    paths.append(
        _curve(
            root / "taxi" / "pc" / "seed0.curve.csv",
            "step,train_loss,heldout_ll,train_ll\n0,3,,-3\n1,2,-2.1,-2\n",
        )
    )
    paths.append(
        _curve(root / "lake" / "critic" / "seed0.curve.csv", "step,train_loss,heldout_td_rmse\n5,1,0.5\n")
    )
    paths.append(
        _curve(
            root / "lake" / "aux" / "state" / "seed2.curve.csv",
            "step,train_loss,heldout_ll,train_ll\n5,1,-1,-1\n",
        )
    )
    assert curve_run(paths[3]) == ("lake", "critic", "seed0")
    assert curve_run(paths[4]) == ("lake", "aux/state", "seed2")
    assert curve_run(Path("elsewhere/taxi/dt/seed3.curve.csv")) == ("taxi", "dt", "seed3")
    assert heldout_metric([read_curve(paths[2])]) == ("heldout_ll", "train_ll")
    assert heldout_metric([read_curve(paths[3])]) == ("heldout_td_rmse", "train_td_rmse")
    out = plot_curves(paths, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = subprocess.run(
        [sys.executable, "-m", "trifle.evaluation.report_tables", "curves", "--out", str(tmp_path / "c.png")]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    bad = _curve(tmp_path / "bad" / "x" / "seed0.curve.csv", "epoch,loss\n1,2\n")
    with pytest.raises(DataError, match="no 'step' column"):
        plot_curves([bad], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------ captions

REPORT = REPO / "workflow" / "report"


def _rendered(name: str) -> str:
    """A caption as Snakemake's report renders it: Jinja with the job's ``snakemake`` object, then
    docutils; any reStructuredText warning fails."""
    import docutils.core
    from jinja2 import Environment, StrictUndefined

    config = yaml.safe_load((REPO / "workflow" / "config" / "smoke.yaml").read_text())
    run = {
        "task": "taxi-stochastic",
        "seeds": "0, 1",
        "methods": "``dt``, ``tt``",
        "models": "``gpt``, ``pc``",
        "groups": "``gpt=small``",
        "overrides": "none",
        "protocol": "pretrained",
    }
    snakemake_object = SimpleNamespace(
        config=config,
        params=SimpleNamespace(runs=[run, run]),
        wildcards=SimpleNamespace(study="fixed_threshold"),
    )
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    text = env.from_string((REPORT / name).read_text()).render(snakemake=snakemake_object)
    return docutils.core.publish_parts(
        text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2}
    )["body"]


@pytest.mark.parametrize("name", sorted(p.name for p in REPORT.glob("*.rst")))
def test_every_caption_renders_without_warnings(name):
    body = _rendered(name)
    assert body.strip()


def test_captions_say_what_was_run():
    body = _rendered("curves.rst")
    assert body.count("<li>") == 2 and "taxi-stochastic" in body and "gpt=small" in body
    assert "protocol pretrained" in body
    ablation = _rendered("ablation.rst")
    assert "planner.fixed_threshold" in ablation and "trifle-s" in ablation


# ----------------------------------------------------------------------------------------------- DVC


def _outputs(*args: str) -> set[str]:
    """Every output file of a run's DAG (a dry run lists them)."""
    out = snakemake(REPO, "-n", "--forceall", *args).stdout
    files = set()
    for line in out.splitlines():
        if line.strip().startswith("output:"):
            files.update(name.strip() for name in line.split(":", 1)[1].split(","))
    assert files
    return files


@pytest.fixture(scope="module")
def default_outputs() -> set[str]:
    return _outputs()


def _declared() -> tuple[list[str], list[str], dict]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    plots: list[str] = []
    for entry in dvc["plots"]:
        ((plot_id, props),) = entry.items()
        y = (props or {}).get("y")
        plots += list(y) if isinstance(y, dict) else [plot_id]
    return dvc["metrics"], plots, dvc


def test_dvc_metrics_and_plots_are_outputs_of_the_default_run_inside_pinned_folders(default_outputs):
    metrics, plots, dvc = _declared()
    pinned = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["reproduce"]["outs"]]
    for path in metrics + plots:
        assert path in default_outputs, f"dvc.yaml declares {path}, which the default run does not make"
        assert any(path.startswith(folder + "/") for folder in pinned), path
    assert all(m.endswith(".json") for m in metrics), "DVC metrics are key-value (JSON) files"
    curves = {f for f in default_outputs if f.endswith(".curve.csv")}
    assert curves and curves <= set(plots), f"training curves not plotted: {sorted(curves - set(plots))}"
    tables = {f for f in default_outputs if f.startswith("results/tables/") and f.endswith(".csv")}
    assert tables <= set(plots), f"result tables not plotted: {sorted(tables - set(plots))}"


def test_the_smoke_run_makes_every_file_dvc_yaml_declares():
    """The smoke config (the tests' and install checks' whole-DAG run) extends the default: `dvc plots show`
    and `dvc metrics show` work after it too."""
    metrics, plots, _ = _declared()
    missing = set(metrics + plots) - _outputs("--configfile", "workflow/config/smoke.yaml")
    assert not missing, sorted(missing)


def test_every_result_table_has_its_report_page(default_outputs):
    tables = [f for f in default_outputs if f.startswith("results/tables/") and f.endswith(".csv")]
    assert tables
    assert all(f[: -len(".csv")] + ".html" in default_outputs for f in tables)
    assert "results/figures/curves.png" in default_outputs
