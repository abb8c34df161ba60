"""End to end on tiny data (the toy tasks and a generated Gym-MuJoCo dataset): the whole DAG, provenance,
exact reruns, and the DVC sharing round trip.

One producer run serves every check (it is the slow part): run the smoke config through `dvc repro`,
push to a local remote, clone, `python -m trifle sync`, and confirm Snakemake has nothing left to do.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from workflow_support import REPO, copy_project, job_counts, run, snakemake

pytestmark = pytest.mark.slow

TRAINING = {"train_gpt", "train_pc"}


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    smoke = (REPO / "workflow" / "config" / "smoke.yaml").read_text()
    project = copy_project(root / "producer", config=smoke)
    remote = root / "remote"
    run(["git", "init", "-q"], project)
    run(["dvc", "remote", "add", "-f", "-d", "localstore", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)
    run(["dvc", "repro"], project)
    return {"project": project, "remote": remote, "root": root}


def test_default_target_writes_the_models_table(produced):
    project = produced["project"]
    with open(project / "results" / "tables" / "models.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["task"], r["model"]) for r in rows} == {
        (t, m) for t in ("taxi-stochastic", "frozenlake-eps0.5") for m in ("gpt", "pc", "dt")
    } | {("hopper-random-local", "gpt"), ("hopper-random-local", "pc")} | {
        (t, "critic")
        for t in ("taxi-stochastic", "hopper-random-local")  # where tt-q runs
    }
    for row in rows:
        assert float(row["train_seconds"]) > 0
        # A critic models no tokens: no log-likelihood (null in its metrics file).
        assert (
            row["heldout_ll_per_token"] == ""
            if row["model"] == "critic"
            else float(row["heldout_ll_per_token"]) < 0
        )
    assert (project / "results" / "tables" / "models.md").read_text().startswith("| task |")


def test_summary_has_every_method_and_a_figure(produced):
    project = produced["project"]
    with open(project / "results" / "tables" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("taxi-stochastic", "frozenlake-eps0.5") for m in ("dt", "tt", "trifle-s", "trifle-m")
    } | {
        ("taxi-stochastic", m)
        for m in ("tt-q", "trifle-s-q", "trifle-dt", "tt-qtaxi-filter", "tt-qtaxi-value", "tt-qtaxi-full")
    }
    for row in rows:
        assert int(row["n_episodes"]) == 6 and 0.0 <= float(row["failure_rate"]) <= 1.0
        assert float(row["step_seconds"]) > 0
    assert (project / "results" / "figures" / "returns.png").read_bytes()[:4] == b"\x89PNG"


def test_mujoco_tables_score_every_method_and_the_constrained_ones_never_violate(produced):
    """The Gym-MuJoCo branch on generated data: normalized scores, and zero violations under the
    constraint for both constrained methods (the unconstrained ones are measured, not assumed)."""
    tables = produced["project"] / "results" / "tables"
    with open(tables / "mujoco.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    with open(tables / "safe_rl.csv") as fh:
        safe = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"tt", "trifle-s", "tt-q", "trifle-s-q"} and set(safe) == {"tt-safe", "trifle-s-safe"}
    for row in [*rows.values(), *safe.values()]:
        assert row["task"] == "hopper-random-local" and row["n_seeds"] == "1"
        assert -5.0 < float(row["score_mean"]) < 20.0 and float(row["step_seconds"]) > 0
        assert 0.0 <= float(row["violation_rate"]) <= 1.0
    assert float(safe["tt-safe"]["violation_rate"]) == 0.0
    assert float(safe["trifle-s-safe"]["violation_rate"]) == 0.0
    md = (tables / "mujoco.md").read_text()
    assert "| Dataset | Environment | DT (published) | TT (published) |" in md and "Hopper" in md
    assert "violation rate" in (tables / "safe_rl.md").read_text()
    figure = produced["project"] / "results" / "figures" / "mujoco_scores.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_report_builds_with_table_and_figure(produced):
    project = produced["project"]
    snakemake(project, "--report", "report.zip")
    import zipfile

    names = zipfile.ZipFile(project / "report.zip").namelist()
    # Tables are in the report as rendered HTML tables (a CSV would only be a download link there).
    assert any(n.endswith("returns.png") for n in names) and any(n.endswith("summary.html") for n in names)
    assert any(n.endswith("mujoco_scores.png") for n in names) and any(
        n.endswith("safe_rl.html") for n in names
    )
    assert any(n.endswith("curves.png") for n in names) and any(n.endswith("models.html") for n in names)


def test_every_output_has_provenance_and_every_job_a_log(produced):
    project = produced["project"]
    outputs = [
        *project.glob("data/*/*.hdf5"),
        *project.glob("data/*/*.npz"),
        *project.glob("results/checkpoints/*/*/seed0.pt"),
    ]
    outputs += [
        *project.glob("results/checkpoints/*/*/seed0.jpc"),
        project / "results" / "tables" / "models.csv",
        *project.glob("results/eval/*/*/seed0.json"),
        project / "results" / "tables" / "summary.csv",
        project / "results" / "tables" / "mujoco.csv",
    ]
    # data: raw, labeled, tokens (3 tasks); checkpoints: gpt, dt, pc (toy tasks), gpt, pc (hopper), critic
    # (taxi, hopper); models table; 14 toy (Taxi 10, FrozenLake 4) and 6 hopper evaluations; summary;
    # MuJoCo tables.
    assert len(outputs) == 3 * 3 + 3 * 2 + 2 + 2 + 1 + 20 + 1 + 1
    for output in outputs:
        info = Path(f"{output}.run.json")
        assert info.is_file(), output
        assert '"commit"' in info.read_text()
    logs = [p.relative_to(project / "logs").parts[0] for p in project.glob("logs/**/*.log")]
    assert sorted(set(logs)) == [
        "ablation_table",
        "ablations",
        "dataset",
        "evaluate",
        "labels",
        "models_table.log",
        "mujoco_tables.log",
        "optimality",
        "optimality_table.log",
        "summary.log",
        "tokens",
        "train_aux",
        "train_critic",
        "train_dt",
        "train_gpt",
        "train_pc",
    ]


def test_optimality_table_scores_every_listed_run(produced):
    """Every run of a method whose registry lists the optimality score has a score file beside its record,
    with provenance; the table has one row per (task, method) of them and the figure is written."""
    import yaml

    from trifle.planning.methods import methods_in

    project = produced["project"]
    smoke = yaml.safe_load((project / "workflow" / "config" / "default.yaml").read_text())
    expected = {
        (task, m)
        for task in smoke["tasks"]
        for m in smoke["per_task"].get(task, {}).get("methods", smoke["methods"])
        if m in methods_in("optimality")
    }
    with open(project / "results" / "tables" / "optimality.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["task"], r["method"]) for r in rows} == expected
    for row in rows:
        assert 0.0 <= float(row["score_mean"]) <= 1.0 and row["seeds"] == "1" and int(row["episodes"]) > 0
    for task, m in expected:
        assert Path(f"{project}/results/eval/{task}/{m}/seed0.optimality.json.run.json").is_file()
    for task in smoke["tasks"]:
        for kind in ("state", "action"):
            assert Path(f"{project}/results/checkpoints/{task}/aux/{kind}/seed0.pt.run.json").is_file()
    assert (project / "results" / "figures" / "optimality.png").read_bytes()[:4] == b"\x89PNG"


def test_second_run_has_nothing_to_do(produced):
    out = snakemake(produced["project"], "-n").stdout
    assert "Nothing to be done" in out, out


def test_hyperparameter_change_reruns_exactly_the_jobs_that_read_it(produced):
    project = produced["project"]
    config = (project / "workflow" / "config" / "default.yaml").read_text()
    changed = copy_project(
        produced["root"] / "changed", config=config.replace("pc.num_latents=4", "pc.num_latents=5")
    )
    for name in ("data", "results", ".snakemake"):
        run(["cp", "-a", str(project / name), str(changed / name)], produced["root"])
    counts = job_counts(snakemake(changed, "-n").stdout)
    # The circuit feeds only the Trifle methods' evaluations (trifle-dt included), not tt, tt-safe, tt-q or dt.
    # Their optimality scores follow (Taxi's 4 and FrozenLake's 2; on Hopper trifle-s and trifle-s-q, not
    # trifle-s-safe, whose registry does not list the score), and the optimality table; the smoke's
    # fixed-threshold study (trifle-s at two values) and its table.
    assert counts == {
        "train_pc": 3,
        "evaluate": 6 + 3,
        "evaluate_ablation": 2,
        "ablation_table": 1,
        "optimality": 6 + 2,
        "optimality_table": 1,
        "models_table": 1,
        "summary": 1,
        "mujoco_tables": 1,
        "all": 1,
    }


def test_dvc_round_trip_restores_without_recomputation(produced):
    project, root = produced["project"], produced["root"]
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pin artifacts"], project)
    run(["dvc", "push"], project)
    consumer = root / "consumer"
    run(["git", "clone", "-q", str(project), str(consumer)], root)
    assert not (consumer / "results" / "checkpoints").exists()
    run([*_python(), "-m", "trifle", "sync"], consumer)
    assert (consumer / "results" / "checkpoints" / "taxi-stochastic" / "pc" / "seed0.jpc").is_file()
    out = snakemake(consumer, "-n").stdout
    assert "Nothing to be done" in out, out
    assert "changed" not in run(["dvc", "status"], consumer).stdout


def _python() -> list[str]:
    import sys

    return [sys.executable]
