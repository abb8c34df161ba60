"""`protocol: pretrained`: released models imported by the workflow and planned with every seed.

The import stages are run on files written in the released formats (the writers of test_tt_import and
test_released_circuit) and tokens made with TT's bins; the circuit's log-likelihoods are checked against
brute-force enumeration. The DAG is checked with dry runs on a project copy holding released files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_released_circuit import ACT_DIM as PC_ACT
from test_released_circuit import NUM_CATS as PC_CATS
from test_released_circuit import OBS_DIM as PC_OBS
from test_released_circuit import brute_joint, hclt_2023, serialize_2023
from test_tt_import import ACT, OBS, V, data_kwargs, write_tt_dir

from trifle.__main__ import main
from trifle.data.circuit_windows import token_windows
from trifle.data.labels import LabeledTrajectories
from trifle.data.tokens import load_tokens, save_tokens, tokenize
from trifle.data.windows import split_episodes
from trifle.models.gpt_checkpoint import load_checked_gpt

from workflow_support import copy_project, job_counts, snakemake

TASK = "hopper-medium-v2"  # a published D4RL dataset: discount 0.99, termination penalty -100
QUANTILE = {"observations": "quantile", "actions": "quantile", "rewards": "quantile", "values": "quantile"}


def write_tokens(path: Path, obs: int, act: int, n_bins: int, rule: str = "tt", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = 600
    labeled = LabeledTrajectories(
        observations=rng.normal(size=(n, obs)).astype(np.float32),
        actions=rng.normal(size=(n, act)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        values=rng.normal(size=n).astype(np.float32),
        episode_starts=np.arange(0, n, 60, dtype=np.int64),
        episode_terminal=np.arange(10) % 2 == 0,
    )
    save_tokens(path, tokenize(labeled, {**QUANTILE, "n_bins": n_bins, "quantile": rule}))
    return path


def run_stage(stage: str, *overrides: str) -> int:
    return main([stage, f"task={TASK}", "progress=false", *overrides])


def gpt_paths(tmp_path: Path) -> list[str]:
    out = tmp_path / "out"
    return [
        f"paths.released_gpt={tmp_path / 'tt'}",
        f"paths.tokens={tmp_path / 'tokens.npz'}",
        f"paths.gpt={out / 'released.pt'}",
        f"paths.gpt_metrics={out / 'released.metrics.json'}",
    ]


def test_import_gpt_stage_writes_a_checkpoint_the_planner_loads_and_its_metrics(tmp_path):
    write_tokens(tmp_path / "tokens.npz", OBS, ACT, V)
    write_tt_dir(tmp_path / "tt", epochs=(3, 10))
    assert run_stage("import_gpt", *gpt_paths(tmp_path)) == 0
    metrics = json.loads((tmp_path / "out" / "released.metrics.json").read_text())
    assert metrics["released"] is True and metrics["task"] == TASK and metrics["model"] == "gpt"
    assert metrics["details"]["source"]["epoch"] == 10  # TT's loader takes the latest epoch
    assert metrics["details"]["source"]["value_inputs"] == "unattended"
    for key in ("train_ll_per_token", "heldout_ll_per_token"):
        assert np.isfinite(metrics[key]) and metrics[key] < 0
    tokens = load_tokens(tmp_path / "tokens.npz")
    # The evaluate stage checks a trained checkpoint against the `gpt` config's architecture; an imported
    # one has TT's (here 2 layers of 16, a block of 3 transitions minus one token) whatever the config says.
    gpt_cfg = {"n_layer": 4, "n_head": 4, "n_embd": 128, "seq_transitions": 10, "value_inputs": "masked"}
    model, ckpt = load_checked_gpt(tmp_path / "out" / "released.pt", tokens=tokens, gpt_cfg=gpt_cfg)
    assert ckpt["source"]["format"] == "trajectory-transformer" and model.cfg.value_inputs == "unattended"


def test_import_gpt_refuses_trifles_bins_and_other_labels_in_one_line(tmp_path, capsys):
    write_tokens(tmp_path / "tokens.npz", OBS, ACT, V, rule="trifle")
    write_tt_dir(tmp_path / "tt")
    assert run_stage("import_gpt", *gpt_paths(tmp_path)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.discretizer.quantile=trifle" in err[0] and "quantile=tt" in err[0]
    assert not (tmp_path / "out" / "released.pt").exists()

    write_tokens(tmp_path / "tokens.npz", OBS, ACT, V)
    write_tt_dir(tmp_path / "tt", data={**data_kwargs(), "penalty": -50})
    assert run_stage("import_gpt", *gpt_paths(tmp_path)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "penalty=-50" in err[0] and "termination_penalty=-100" in err[0]

    write_tokens(tmp_path / "tokens.npz", OBS + 1, ACT, V)
    write_tt_dir(tmp_path / "tt")
    assert run_stage("import_gpt", *gpt_paths(tmp_path)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "obs_dim=3" in err[0] and "4" in err[0]


def test_import_pc_stage_scores_the_circuit_as_brute_force_does(tmp_path):
    write_tokens(tmp_path / "tokens.npz", PC_OBS, PC_ACT, PC_CATS)
    root = hclt_2023(np.random.default_rng(0))
    src = tmp_path / f"pc-{TASK}.jpc"
    src.write_bytes(serialize_2023(root))
    out = tmp_path / "out"
    paths = [
        f"paths.released_pc={src}",
        f"paths.tokens={tmp_path / 'tokens.npz'}",
        f"paths.pc={out / 'released.jpc'}",
        f"paths.pc_metrics={out / 'released.metrics.json'}",
    ]
    assert run_stage("import_pc", "pc.valid_fraction=0.3", *paths) == 0
    metrics = json.loads((out / "released.metrics.json").read_text())
    assert metrics["released"] is True and metrics["window"] == 1
    assert metrics["details"]["source"]["source_sha256"]
    data = load_tokens(tmp_path / "tokens.npz")
    joint = brute_joint(root)  # [3]*5 table of the normalised 2023 circuit
    train_ids, valid_ids = split_episodes(data.episode_starts, len(data.tokens), 0.3, 0)
    for key, ids in (("train_ll_per_token", train_ids), ("heldout_ll_per_token", valid_ids)):
        rows = token_windows(data, window=1, episode_ids=ids)
        expected = np.mean([np.log(joint[tuple(r)]) for r in rows]) / rows.shape[1]
        assert metrics[key] == pytest.approx(expected, rel=1e-4)
    assert np.isfinite(metrics["value_calibration_error"])


# --- The DAG --------------------------------------------------------------------------------------

CONFIG = """\
tasks: [taxi-stochastic, {task}]
methods: [tt, trifle-s]
seeds: [0, 1, 2]
groups: {{gpt: small, pc: small, eval: quick}}
protocol: {protocol}
"""


def released_files(project: Path, task: str = TASK) -> None:
    """Present is all a dry run needs (their contents are the import stages' business)."""
    tt = project / "data" / "released" / "tt" / task
    tt.mkdir(parents=True)
    for name in ("model_config.pkl", "data_config.pkl", "state_0.pt", "state_49.pt"):
        (tt / name).write_bytes(b"")
    (project / "data" / "released" / "pc").mkdir(parents=True)
    (project / "data" / "released" / "pc" / f"pc-{task}.jpc").write_bytes(b"")


def blocks(out: str) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for block in out.split("\n\n"):
        rule = re.search(r"rule (\w+):", block)
        if rule:
            jobs.setdefault(rule.group(1), []).append(block)
    return jobs


def test_pretrained_dag_imports_once_and_plans_every_seed_with_the_released_models(tmp_path):
    project = copy_project(tmp_path / "p", CONFIG.format(task=TASK, protocol="pretrained"))
    released_files(project)
    out = snakemake(project, "-n", "-p", "--forceall").stdout
    counts = job_counts(out)
    # The global choice covers the task with released models; Taxi (none released) still trains.
    assert counts["import_gpt"] == counts["import_pc"] == 1
    assert counts["train_gpt"] == counts["train_pc"] == 3
    jobs = blocks(out)
    assert all("taxi-stochastic" in b for b in jobs["train_gpt"] + jobs["train_pc"])
    assert "state_49.pt" in jobs["import_gpt"][0]  # TT's latest epoch is the input
    mujoco_evals = [b for b in jobs["evaluate"] if TASK in b]
    assert len(mujoco_evals) == 6
    for block in mujoco_evals:
        assert f"paths.gpt=results/checkpoints/{TASK}/gpt/released.pt" in block
        if "trifle-s" in block:
            assert f"paths.pc=results/checkpoints/{TASK}/pc/released.jpc" in block
    (tokens,) = [b for b in jobs["tokens"] if TASK in b]
    assert "task.discretizer.quantile=tt" in tokens
    (taxi_tokens,) = [b for b in jobs["tokens"] if "taxi-stochastic" in b]
    assert "quantile=tt" not in taxi_tokens


def test_missing_released_files_and_a_task_without_them_are_one_line_at_dag_build(tmp_path):
    project = copy_project(tmp_path / "p", CONFIG.format(task=TASK, protocol="pretrained"))
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    lines = [
        line for line in (result.stdout + result.stderr).splitlines() if "released files are missing" in line
    ]
    assert (
        len(lines) == 1 and f"data/released/pc/pc-{TASK}.jpc" in lines[0] and "state_<epoch>.pt" in lines[0]
    )

    config = (
        CONFIG.format(task=TASK, protocol="trained") + "per_task: {taxi-stochastic: {protocol: pretrained}}\n"
    )
    project = copy_project(tmp_path / "q", config)
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    assert (
        "per_task.taxi-stochastic.protocol': pretrained, but no released models exist"
        in result.stdout + result.stderr
    )


def test_trained_protocol_is_unchanged(tmp_path):
    project = copy_project(tmp_path / "p", CONFIG.format(task=TASK, protocol="trained"))
    counts = job_counts(snakemake(project, "-n", "--forceall").stdout)
    assert "import_gpt" not in counts and counts["train_gpt"] == counts["train_pc"] == 6
