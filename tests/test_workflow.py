"""The Snakemake workflow: lint, dry runs of the default and paper configs, config validation."""

import re

import pytest

from workflow_support import REPO, copy_project, job_counts, snakemake

GPU_RULES = ("train_gpt", "train_pc", "train_dt", "evaluate")


def test_lint_is_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_dry_run_lists_every_rule():
    out = snakemake(REPO, "-n", "--forceall").stdout
    assert job_counts(out) == {
        "dataset": 2,
        "labels": 2,
        "tokens": 2,
        "train_gpt": 2,
        "train_pc": 2,
        "train_dt": 2,
        "evaluate": 8,
        "models_table": 1,
        "summary": 1,
        "all": 1,
    }


def test_paper_dry_run_has_every_job_with_gpu_resources():
    out = snakemake(REPO, "-n", "--forceall", "--configfile", "workflow/config/paper.yaml").stdout
    counts = job_counts(out)
    assert counts["dataset"] == 4 and counts["train_gpt"] == 12 and counts["train_pc"] == 12
    assert counts["train_dt"] == 12 and counts["evaluate"] == 48
    for block in out.split("\n\n"):
        rule = re.search(r"rule (\w+):", block)
        if rule and rule.group(1) in GPU_RULES:
            assert "gpu=1" in block, block
            assert re.search(r"runtime=\d+", block) and "mem_mb=" in block


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("tasks: [taxi-stochastic, atari]\nseeds: [0]\n", "unknown task.*atari"),
        ("tasks: [taxi-stochastic]\nseeds: [-1]\n", "seeds"),
        ("tasks: [taxi-stochastic]\nmethods: [tt, cql]\nseeds: [0]\n", "unknown method.*cql"),
        ("tasks: [taxi-stochastic]\nseeds: [0]\nbeam: 3\n", "beam"),
        ("tasks: [taxi-stochastic]\nseeds: [0]\noverrides: [gpt.n_embd=65]\n", "gpt.n_embd"),
    ],
)
def test_bad_workflow_config_fails_before_any_job(tmp_path, config, message):
    project = copy_project(tmp_path / "p", config=config)
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr


def test_every_workflow_output_is_pinned_by_dvc():
    import yaml

    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for o in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["reproduce"]["outs"]
    ]
    summary = snakemake(REPO, "--summary").stdout.splitlines()
    files = [line.split("\t")[0] for line in summary[1:] if line.strip()]
    assert files, summary
    unpinned = [f for f in files if not any(f.startswith(o.rstrip("/") + "/") for o in outs)]
    assert unpinned == []
