"""Bad inputs through the command line: each fails with one line naming the key or file and what was
expected, a non-zero exit status, no traceback, and no output left behind.

These run ``python -m trifle`` in a subprocess, as a user (or a Snakemake job) does, so what is checked is
what a user sees.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The toy task's stages on 20 episodes, quietly, on the CPU.
TAXI = ("task=taxi-stochastic", "task.dataset.num_episodes=20", "progress=false", "device=cpu")
# A GPT trained in two steps, without evaluations or partial checkpoints.
TINY_GPT = ("gpt.steps=2", "gpt.eval_every=0", "gpt.checkpoint_every=0", "gpt.eval_windows=8")
# An evaluation as short as it gets (it never starts here: every case fails before the first episode).
ONE_EPISODE = ("eval.episodes=1", "eval.batch_episodes=1", "eval.max_episode_steps=2")


def _trifle(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trifle", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


def _files(root: Path) -> set[str]:
    """Every file under ``root`` (hidden temporary files too), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def _assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["eval.episodes=abc"], ["eval.episodes", "an integer >= 1"]),
        (["eval.episodes=-3"], ["eval.episodes"]),
        (["eval.max_episode_steps=abc"], ["eval.max_episode_steps"]),
        (["gpt.foo=1"], ["gpt.foo: unknown key", "known keys of gpt"]),
        (["+planner.foo=1"], ["planner.foo", "valid keys"]),
        (["task.planning.beam_width=0"], ["planner.beam_width", ">= 1"]),
        (["planner.top_ratio=1.5"], ["planner.top_ratio", "(0, 1]"]),
        (["task=hopper-medium-v2", "task.dataset.sha256=abc"], ["task.dataset.sha256", "hexadecimal"]),
        (["task=nosuch"], ["unknown task 'nosuch'", "taxi-stochastic"]),
        (["planner=nosuch"], ["unknown planner 'nosuch'", "trifle-s"]),
        (["gpt=huge"], ["unknown gpt 'huge'", "small"]),
        (["seed=-1"], ["'seed'", "an integer >= 0"]),
        (["gpt.steps=abc"], ["gpt.steps", "an integer >= 1", "'abc'"]),
        (["device=tpu"], ["'device'", "one of auto, cpu, cuda"]),
        (["threads=0"], ["'threads'", "an integer >= 1"]),
        (["task.labels.discount=1.5"], ["task.labels.discount", "[0, 1]"]),
        (["task.discretizer.n_bins=1"], ["task.discretizer.n_bins", "an integer >= 2"]),
        (["task.discretizer.values=uniform"], ["task.discretizer.values", "categorical or quantile"]),
        (["gpt.n_embd=65"], ["gpt.n_embd", "divisible by gpt.n_head"]),
        (["gpt.dropout=1.5"], ["gpt.dropout", "[0.0, 0.99]"]),
        (["gpt.value_inputs=foo"], ["gpt.value_inputs", "read, masked"]),
        (["pc.backend=foo"], ["pc.backend", "auto, torch, pyjuice"]),
        (["pc.pseudocount=-1"], ["pc.pseudocount", ">= 0"]),
        (["task.pc_window=0"], ["task.pc_window", "an integer >= 1"]),
        (["eval.batch_episodes=0"], ["eval.batch_episodes", "an integer >= 1"]),
        (["task.dataset.epsilon=1.5"], ["task.dataset.epsilon", "[0, 1]"]),
        (["task.dataset.num_episodes=0"], ["task.dataset.num_episodes", "an integer >= 1"]),
        (["dt.foo=1"], ["dt.foo: unknown key", "known keys of dt"]),
        (["critic.steps=-1"], ["critic.steps", "an integer >= 1"]),
        (["aux.kind=foo"], ["aux.kind", "state, action"]),
        (["task.dt_target_returns=abc"], ["task.dt_target_returns", "finite number"]),
    ],
)
def test_a_bad_setting_fails_at_composition_with_one_line(tmp_path, overrides, names):
    """`show` composes exactly what every stage composes, so these fail before any stage runs."""
    _assert_one_line_error(_trifle("show", "planner=trifle-s", *overrides, cwd=tmp_path), *names)


def test_a_bad_evaluation_setting_fails_before_any_file_is_read(tmp_path):
    out = tmp_path / "eval.json"
    result = _trifle(
        "evaluate",
        "task=taxi-stochastic",
        "planner=tt",
        "eval.episodes=abc",
        "paths.tokens=missing.npz",
        "paths.gpt=missing.pt",
        f"paths.eval={out}",
        cwd=tmp_path,
    )
    _assert_one_line_error(result, "eval.episodes")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("stage", "path_key", "source"),
    [
        ("train_gpt", "paths.tokens", "tokens"),
        ("train_critic", "paths.labeled", "labeled"),
    ],
)
def test_a_truncated_npz_is_named_and_nothing_is_written(tmp_path, stage, path_key, source):
    """A damaged .npz (a truncated copy) is a zip error numpy does not turn into OSError: it is reported
    against the file, and the stage writes no checkpoint."""
    import numpy as np

    damaged = tmp_path / f"{source}.npz"
    np.savez(damaged, tokens=np.zeros((50, 7), np.int64), padding=np.arange(5000))
    damaged.write_bytes(damaged.read_bytes()[:300])
    out = tmp_path / "out" / "model.pt"
    key = "paths.gpt" if stage == "train_gpt" else "paths.critic"
    result = _trifle(stage, "task=taxi-stochastic", f"{path_key}={damaged}", f"{key}={out}", cwd=tmp_path)
    _assert_one_line_error(result, str(damaged), "not a readable")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_trifle_debug_shows_the_traceback(tmp_path):
    """TRIFLE_DEBUG=1 raises the error with its traceback (for a developer); without it, one line."""
    result = _trifle("show", "seed=-1", cwd=tmp_path, env={"TRIFLE_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr, result.stderr
    _assert_one_line_error(_trifle("show", "seed=-1", cwd=tmp_path), "'seed'")


# --- Input files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "args", "missing", "what"),
    [
        ("labels", ["paths.raw=no.hdf5", "paths.labeled=out/l.npz"], "no.hdf5", "dataset file not found"),
        ("tokens", ["paths.labeled=no.npz", "paths.tokens=out/t.npz"], "no.npz", "not found"),
        ("train_gpt", ["paths.tokens=no.npz", "paths.gpt=out/g.pt"], "no.npz", "token file not found"),
        ("train_pc", ["paths.tokens=no.npz", "paths.pc=out/p.jpc"], "no.npz", "token file not found"),
        ("train_dt", ["paths.labeled=no.npz", "paths.dt=out/d.pt"], "no.npz", "not found"),
        ("train_critic", ["paths.labeled=no.npz", "paths.critic=out/c.pt"], "no.npz", "not found"),
        ("train_aux", ["paths.tokens=no.npz", "paths.aux=out/a.pt"], "no.npz", "token file not found"),
        ("evaluate", ["planner=tt", "paths.tokens=no.npz", "paths.eval=out/e.json"], "no.npz", "not found"),
        ("evaluate", ["planner=dt", "paths.dt=no.pt", "paths.eval=out/e.json"], "no.pt", "checkpoint file"),
        ("optimality", ["paths.eval=no.json", "paths.optimality=out/o.json"], "no.json", "not found"),
        ("tables", ["paths.model_metrics=[no.json]", "paths.models_table=out/m.csv"], "no.json", "not found"),
        ("summary", ["paths.eval_files=[no.json]", "paths.summary_table=out/s.csv"], "no.json", "not found"),
        (
            "ablation_table",
            ["paths.eval_files=[no.json]", "ablation.study=s", "ablation.setting=k"],
            "no.json",
            "not found",
        ),
        ("optimality_table", ["paths.optimality_files=[no.json]"], "no.json", "optimality file not found"),
        ("mujoco_tables", ["paths.eval_files=[no.json]"], "no.json", "evaluation file not found"),
        ("summary", ["paths.eval_files=[]"], "paths.eval_files", "is empty"),
        ("tables", ["paths.model_metrics=[]"], "paths.model_metrics", "is empty"),
        ("data", ["task.dataset.generator=foo"], "task.dataset.generator='foo'", "expected one of"),
    ],
)
def test_a_missing_input_is_named_and_nothing_is_written(tmp_path, stage, args, missing, what):
    """Every kind of stage names the input it lacks, before it writes anything anywhere."""
    result = _trifle(stage, *TAXI, *args, cwd=tmp_path)
    _assert_one_line_error(result, missing, what)
    assert _files(tmp_path) == set()


@pytest.mark.parametrize(
    ("stage", "key", "expected"),
    [
        ("train_gpt", "paths.tokens", "not a readable token file"),
        ("labels", "paths.raw", "not a readable hdf5 file"),
        ("summary", "paths.eval_files", "not a readable JSON file"),
        ("tables", "paths.model_metrics", "not a readable JSON file"),
        ("optimality", "paths.eval", "not a readable JSON file"),
    ],
)
def test_a_text_file_in_place_of_an_input_is_named(tmp_path, stage, key, expected):
    text = tmp_path / "notes.txt"
    text.write_text("not the file you meant\n")
    value = f"[{text}]" if key.endswith(("_files", "_metrics")) else str(text)
    result = _trifle(
        stage, *TAXI, f"{key}={value}", "paths.labeled=out/l.npz", "paths.gpt=out/g.pt", cwd=tmp_path
    )
    _assert_one_line_error(result, str(text), expected)
    assert _files(tmp_path) == {"notes.txt"}


def _users_dataset(path: Path, nan_row: int | None = None) -> Path:
    """A tiny valid D4RL-layout file of one's own (two episodes), optionally with one NaN reward."""
    import h5py
    import numpy as np

    from trifle.data.d4rl_format import save_dataset

    n = 6
    save_dataset(
        path,
        {
            "observations": np.arange(2 * n, dtype=np.float32).reshape(n, 2),
            "actions": np.zeros((n, 1), np.float32),
            "rewards": np.ones(n, np.float32),
            "terminals": np.array([0, 0, 1, 0, 0, 1], bool),
            "timeouts": np.zeros(n, bool),
        },
        {},
    )
    if nan_row is not None:  # save_dataset refuses NaN, so patch it in as a damaged file would have it
        with h5py.File(path, "r+") as f:
            f["rewards"][nan_row] = np.nan
    return path


@pytest.mark.parametrize("problem", ["nan", "missing"])
def test_a_users_dataset_file_is_blamed_by_its_own_path(tmp_path, problem):
    """generator 'file': a NaN reward (or a missing file) is reported against task.dataset.path, the user's
    file, not against the project's copy (paths.raw), which is never made."""
    mine = tmp_path / "mine.hdf5"
    if problem == "nan":
        _users_dataset(mine, nan_row=3)
    out = tmp_path / "out" / "raw.hdf5"
    result = _trifle(
        "data",
        *TAXI,
        "~task.dataset",
        f"+task.dataset={{generator:file,path:'{mine}'}}",
        f"paths.raw={out}",
        cwd=tmp_path,
    )
    names = [str(mine), "'rewards'", "NaN", "row 3"] if problem == "nan" else [str(mine), "not found"]
    _assert_one_line_error(result, *names)
    assert str(out) not in result.stderr
    assert _files(tmp_path) == ({"mine.hdf5"} if problem == "nan" else set())


# --- A GPT against its consumer's config and data -------------------------------------------------


@pytest.fixture(scope="module")
def taxi(tmp_path_factory) -> dict[str, Path]:
    """Two token files of the toy task (dataset seeds 0 and 1) and a GPT trained on the first."""
    root = tmp_path_factory.mktemp("taxi")
    files = {}
    for seed in (0, 1):
        paths = [
            f"paths.raw=s{seed}/raw.hdf5",
            f"paths.labeled=s{seed}/lab.npz",
            f"paths.tokens=s{seed}/tok.npz",
        ]
        for stage in ("data", "labels", "tokens"):
            result = _trifle(stage, *TAXI, f"task.dataset.seed={seed}", *paths, cwd=root)
            assert result.returncode == 0, result.stderr
        files[f"tokens{seed}"] = root / f"s{seed}" / "tok.npz"
    files["labeled"] = root / "s0" / "lab.npz"
    files["gpt"] = root / "gpt.pt"
    result = _trifle(
        "train_gpt",
        *TAXI,
        *TINY_GPT,
        f"paths.tokens={files['tokens0']}",
        f"paths.gpt={files['gpt']}",
        f"paths.gpt_metrics={root / 'gpt.metrics.json'}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return files


def _evaluate(taxi: dict[str, Path], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return _trifle(
        "evaluate",
        *TAXI,
        *ONE_EPISODE,
        "planner=tt",
        f"paths.gpt={taxi['gpt']}",
        f"paths.eval={tmp_path / 'out' / 'seed0.json'}",
        *args,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("override", "trained"),
    [("gpt.n_layer=4", "gpt.n_layer=2"), ("gpt.seq_transitions=3", "gpt.seq_transitions=5")],
)
def test_evaluate_refuses_a_gpt_config_the_checkpoint_was_not_trained_with(taxi, tmp_path, override, trained):
    result = _evaluate(taxi, tmp_path, f"paths.tokens={taxi['tokens0']}", override)
    _assert_one_line_error(result, str(taxi["gpt"]), trained, override)
    assert _files(tmp_path) == set()


def test_evaluate_refuses_tokens_the_gpt_was_not_trained_on(taxi, tmp_path):
    """Tokens of another dataset seed: same shapes and vocabulary, other data. The GPT's `.run.json`
    names the token file it was trained on, so the job stops before loading anything."""
    result = _evaluate(taxi, tmp_path, f"paths.tokens={taxi['tokens1']}")
    _assert_one_line_error(
        result, str(taxi["gpt"]), str(taxi["tokens0"]), str(taxi["tokens1"]), "is another file"
    )
    assert _files(tmp_path) == set()


def test_a_gpt_copied_without_its_run_json_is_still_checked_against_its_tokens(taxi, tmp_path):
    """The checkpoint itself stores the sha256 of its training data (gpt_checkpoint.load_checked_gpt)."""
    import shutil

    bare = tmp_path / "bare" / "gpt.pt"
    bare.parent.mkdir()
    shutil.copy(taxi["gpt"], bare)
    result = _evaluate(taxi, tmp_path, f"paths.tokens={taxi['tokens1']}", f"paths.gpt={bare}")
    _assert_one_line_error(result, str(bare), str(taxi["tokens1"]), "other data")
    assert _files(tmp_path) == {"bare/gpt.pt"}


def test_run_json_records_the_sha256_of_every_input(taxi, tmp_path):
    """The evaluation record names the checkpoint and token file it used, by hash."""
    import hashlib
    import json

    result = _evaluate(taxi, tmp_path, f"paths.tokens={taxi['tokens0']}")
    assert result.returncode == 0, result.stderr
    inputs = json.loads((tmp_path / "out" / "seed0.json.run.json").read_text())["inputs"]
    assert set(inputs) == {"tokens", "gpt"}
    for name in ("tokens", "gpt"):
        path = taxi["tokens0"] if name == "tokens" else taxi["gpt"]
        assert inputs[name] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    gpt_inputs = json.loads((taxi["gpt"].parent / "gpt.pt.run.json").read_text())["inputs"]
    assert gpt_inputs["tokens"]["path"] == str(taxi["tokens0"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [("text", "cannot read checkpoint"), ("labeled", "cannot read checkpoint"), ("missing", "not found")],
)
def test_evaluate_names_a_gpt_file_it_cannot_use(taxi, tmp_path, given, expected):
    gpt = {"text": tmp_path / "gpt.txt", "labeled": taxi["labeled"], "missing": tmp_path / "none.pt"}[given]
    if given == "text":
        gpt.write_text("not a checkpoint\n")
    result = _evaluate(taxi, tmp_path, f"paths.tokens={taxi['tokens0']}", f"paths.gpt={gpt}")
    _assert_one_line_error(result, str(gpt), expected)
    assert _files(tmp_path) == ({"gpt.txt"} if given == "text" else set())


def test_a_labeled_file_given_as_tokens_is_named(taxi, tmp_path):
    result = _trifle(
        "train_gpt", *TAXI, f"paths.tokens={taxi['labeled']}", "paths.gpt=out/g.pt", cwd=tmp_path
    )
    _assert_one_line_error(result, str(taxi["labeled"]), "'tokens", "token file")
    assert _files(tmp_path) == set()


# --- Outputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "key", "inputs"),
    [
        ("tables", "paths.models_table", ["paths.model_metrics=[m.json]"]),
        ("train_gpt", "paths.gpt_metrics", []),
        ("evaluate", "paths.eval_steps", ["planner=tt", *ONE_EPISODE]),
    ],
)
def test_an_output_below_a_file_fails_before_any_work(taxi, tmp_path, stage, key, inputs):
    """An output whose folder is an existing file fails at the start, naming the output, not with a
    FileExistsError after the training (train_gpt would otherwise train first)."""
    (tmp_path / "m.json").write_text('{"task": "t", "model": "gpt", "seed": 0}\n')
    (tmp_path / "blocker").write_text("a file where a folder is needed\n")
    out = tmp_path / "blocker" / "sub" / "out.file"
    given = [
        f"paths.tokens={taxi['tokens0']}",
        f"paths.gpt={taxi['gpt']}",
        f"paths.eval={tmp_path / 'e.json'}",
    ]
    if stage == "train_gpt":
        given = [f"paths.tokens={taxi['tokens0']}", f"paths.gpt={tmp_path / 'g.pt'}", *TINY_GPT]
    started = time.perf_counter()
    result = _trifle(stage, *TAXI, *inputs, *given, f"{key}={out}", cwd=tmp_path)
    _assert_one_line_error(result, f"{key}={out}", "blocker is a file", "expected a directory")
    assert _files(tmp_path) == {"m.json", "blocker"}
    assert time.perf_counter() - started < 120


def test_an_output_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "table.csv").mkdir()
    result = _trifle("tables", "paths.model_metrics=[m.json]", "paths.models_table=table.csv", cwd=tmp_path)
    _assert_one_line_error(result, "paths.models_table=table.csv", "is a directory")
    assert _files(tmp_path) == set()


def test_a_read_only_output_folder_fails_before_any_work(taxi, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write to a read-only folder (root): chmod cannot make it unwritable")
        out = folder / "g.pt"
        result = _trifle(
            "train_gpt", *TAXI, *TINY_GPT, f"paths.tokens={taxi['tokens0']}", f"paths.gpt={out}", cwd=tmp_path
        )
        _assert_one_line_error(result, f"paths.gpt={out}", "not writable")
        assert _files(tmp_path) == set()
    finally:
        folder.chmod(0o755)


# --- Provenance of interrupted or failed runs -----------------------------------------------------


def test_a_failed_run_leaves_no_provenance_of_an_earlier_one(tmp_path):
    """Snakemake deletes a job's outputs before rerunning it, but not ``<output>.run.json``; a rerun that
    fails must not leave that file vouching for an output that is not there."""
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "model.pt.run.json"
    stale.write_text('{"stage": "train_critic"}\n')
    result = _trifle("train_critic", *TAXI, "paths.labeled=no.npz", "paths.critic=out/model.pt", cwd=tmp_path)
    _assert_one_line_error(result, "no.npz", "not found")
    assert _files(tmp_path) == set()


def test_sigterm_stops_a_stage_cleanly(taxi, tmp_path):
    """A cancelled job (SIGTERM) stops with one line, and leaves neither an output, a temporary file, nor
    the provenance of an earlier run."""
    out = tmp_path / "out" / "g.pt"
    out.parent.mkdir()
    stale = Path(f"{out}.run.json")
    stale.write_text('{"stage": "train_gpt"}\n')
    args = [
        "gpt.steps=1000000",
        "gpt.eval_every=0",
        "gpt.checkpoint_every=0",
        f"paths.tokens={taxi['tokens0']}",
    ]
    args += [f"paths.gpt={out}", f"paths.gpt_metrics={out.parent / 'g.json'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trifle", "train_gpt", *TAXI, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while stale.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # into the training
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    _assert_one_line_error(result, "interrupted", "SIGTERM")
    assert _files(tmp_path) == set()


# --- sync -----------------------------------------------------------------------------------------


def _dvc(*args: str, cwd: Path) -> None:
    subprocess.run(["dvc", *args], cwd=cwd, check=True, capture_output=True, env=_path_env())


def _path_env() -> dict[str, str]:
    """PATH with this interpreter's scripts first, where `dvc` is installed with the project."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_sync_names_the_remote_and_what_it_lacks(tmp_path):
    """`dvc pull` from a local remote that lacks a pinned file: the line names the remote, its URL and
    the file, not only "dvc pull failed"."""
    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    remote.mkdir()
    _dvc("init", "--no-scm", "-q", cwd=project)
    _dvc("remote", "add", "-d", "shared", str(remote), cwd=project)
    (project / "params.yaml").write_text("workflow_config: run.yaml\n")
    (project / "run.yaml").write_text("tasks: []\n")
    (project / "pinned.txt").write_text("pinned data\n")
    _dvc("add", "-q", "pinned.txt", cwd=project)
    (project / "pinned.txt").unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "trifle", "sync"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env=_path_env(),
    )
    _assert_one_line_error(result, "remote 'shared'", str(remote), "pinned.txt", "lacks 1 file")
    assert not (project / "pinned.txt").exists() and list(remote.iterdir()) == []
