"""`dvc repro` runs the workflow config params.yaml names, and `dvc exp run -S` switches it for one run.

DVC itself runs here, on a copy of the project's dvc.yaml and params.yaml, with a stand-in `snakemake`
on PATH that records its arguments: what is checked is the command DVC builds and what dvc.lock
records, not the workflow (tests/test_pipeline_e2e.py runs that through `dvc repro`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trifle import sync as sync_module
from trifle.errors import TrifleError

REPO = Path(__file__).resolve().parents[1]

STAND_IN = """#!/bin/sh
echo "$@" >> "$SNAKEMAKE_CALLS"
mkdir -p data results/checkpoints results/eval results/tables results/figures
echo "$@" > results/tables/args.txt
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture()
def project(tmp_path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository holding the real dvc.yaml and params.yaml and empty stand-ins for the
    stage's dependencies."""
    root = tmp_path / "project"
    for name in ("workflow/config", "trifle", "bin"):
        (root / name).mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    (root / "Snakefile").write_text("")
    (root / "trifle" / "__init__.py").write_text("")
    for config in ("default", "mujoco_cpu"):
        (root / "workflow" / "config" / f"{config}.yaml").write_text(f"name: {config}\n")
    (root / "bin" / "snakemake").write_text(STAND_IN)
    (root / "bin" / "snakemake").chmod(0o755)
    (root / ".gitignore").write_text("/bin/\n")
    env = {
        **os.environ,
        "PATH": f"{root / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SNAKEMAKE_CALLS": str(tmp_path / "calls.txt"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    (root / ".dvcignore").write_text("/bin\n")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "project"], root, env)
    return root, env


def _calls(env: dict[str, str]) -> list[str]:
    return Path(env["SNAKEMAKE_CALLS"]).read_text().splitlines()


def _locked_config(root: Path) -> str:
    stage = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["reproduce"]
    assert stage["cmd"].endswith(stage["params"]["params.yaml"]["workflow_config"]), stage["cmd"]
    return stage["params"]["params.yaml"]["workflow_config"]


@pytest.mark.slow
def test_repro_runs_the_config_params_yaml_names_and_exp_run_switches_it(project):
    root, env = project
    _run(["dvc", "repro", "-q"], root, env)
    assert _calls(env) == ["--cores all --configfile workflow/config/default.yaml"]
    assert _locked_config(root) == "workflow/config/default.yaml"
    # Nothing changed: DVC does not rerun.
    _run(["dvc", "repro", "-q"], root, env)
    assert len(_calls(env)) == 1
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "pin"], root, env)
    # One run of another config, as the docs show; the lock records which config the pin holds.
    _run(["dvc", "exp", "run", "-q", "-S", "workflow_config=workflow/config/mujoco_cpu.yaml"], root, env)
    assert _calls(env)[-1] == "--cores all --configfile workflow/config/mujoco_cpu.yaml"
    assert _locked_config(root) == "workflow/config/mujoco_cpu.yaml"
    assert "modified" not in _run(["dvc", "status"], root, env)


def test_the_projects_lock_records_the_config_params_yaml_names():
    """The committed pin was made with the config params.yaml names today (else `dvc status` reports
    modified params and sync refuses)."""
    named = yaml.safe_load((REPO / "params.yaml").read_text())["workflow_config"]
    assert (REPO / named).is_file()
    assert _locked_config(REPO) == named


def test_sync_touches_under_the_config_params_yaml_names(tmp_path, monkeypatch):
    (tmp_path / "workflow").mkdir()
    (tmp_path / "workflow" / "mine.yaml").write_text("tasks: []\n")
    (tmp_path / "params.yaml").write_text("workflow_config: workflow/mine.yaml\n")
    monkeypatch.chdir(tmp_path)
    commands = []

    class Done:
        stdout = "{}"

    monkeypatch.setattr(sync_module, "_run", lambda cmd: commands.append(cmd) or Done())
    sync_module.sync()
    assert commands[-1] == [
        "snakemake",
        "--touch",
        "--forceall",
        "--cores",
        "1",
        "--configfile",
        "workflow/mine.yaml",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "cannot read params.yaml"),
        ("workflow_config: [a, b\n", "params.yaml is not valid YAML"),
        ("other: 1\n", "expected key 'workflow_config'"),
        (
            "workflow_config: workflow/config/nope.yaml\n",
            "names workflow/config/nope.yaml, which does not exist",
        ),
    ],
)
def test_a_bad_params_file_is_named_before_anything_is_pulled(tmp_path, monkeypatch, text, expected):
    if text is not None:
        (tmp_path / "params.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sync_module, "_run", lambda cmd: pytest.fail(f"ran {cmd}"))
    with pytest.raises(TrifleError, match=expected) as err:
        sync_module.sync()
    assert "\n" not in str(err.value)
