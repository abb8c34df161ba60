"""Real signals against real stage processes: Ctrl-C (SIGINT), SIGTERM and kill -9 during GPT training.

What must hold: an interrupted stage exits non-zero with one line naming the stage and the signal, and
leaves no final output, no `.run.json` sidecar and no temporary file DVC could pin; the only thing kept
is the partial checkpoint the next run resumes from, and that resumed run ends with exactly the model
an uninterrupted run gives.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TASK = "task=taxi-stochastic"
STEPS = 400
EVERY = 50

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRIFLE_COMPOSE_CACHE="")
    env.pop("TRIFLE_DEBUG", None)
    return env


def _trifle(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trifle", *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    raw, labeled, tok = root / "raw.hdf5", root / "labeled.npz", root / "tokens.npz"
    for args in (
        ("data", TASK, f"paths.raw={raw}"),
        ("labels", TASK, f"paths.raw={raw}", f"paths.labeled={labeled}"),
        ("tokens", TASK, f"paths.labeled={labeled}", f"paths.tokens={tok}"),
    ):
        result = _trifle(*args, "threads=1", cwd=root)
        assert result.returncode == 0, result.stderr
    return tok


def _train_args(tokens: Path, out: Path) -> list[str]:
    return [
        "train_gpt",
        TASK,
        "gpt=small",
        "threads=1",
        f"gpt.steps={STEPS}",
        f"gpt.checkpoint_every={EVERY}",
        f"gpt.eval_every={STEPS}",
        f"paths.tokens={tokens}",
        f"paths.gpt={out / 'gpt.pt'}",
        f"paths.gpt_metrics={out / 'gpt.metrics.json'}",
    ]


def _start_and_signal(tokens: Path, out: Path, signum: int) -> subprocess.CompletedProcess[str]:
    """Start a training, wait for its first partial checkpoint, send ``signum``, wait for the end."""
    out.mkdir()
    # A shell without job control starts background jobs (CI's, nohup's) with SIGINT ignored, and a
    # child inherits that: Python then installs no Ctrl-C handler. Ctrl-C reaches a foreground job with
    # the default disposition, which is what this test is about, so the child gets it back.
    proc = subprocess.Popen(
        [sys.executable, "-m", "trifle", *_train_args(tokens, out)],
        cwd=out,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = out / "gpt.pt.partial.pt"
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the training ended before it could be interrupted: raise STEPS"
    assert partial.exists(), "no partial checkpoint within 300 s"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _dvc_ignored(name: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dvcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _assert_clean(out: Path) -> None:
    """Nothing but the resumable partial checkpoint (and files DVC ignores) is left in ``out``."""
    left = sorted(p.name for p in out.iterdir())
    assert "gpt.pt" not in left and "gpt.metrics.json" not in left, left
    assert not [n for n in left if n.endswith(".run.json")], left
    stray = [n for n in left if n != "gpt.pt.partial.pt" and not _dvc_ignored(n)]
    assert stray == [], left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_training_says_so_in_one_line_and_leaves_only_its_partial_checkpoint(
    tokens, tmp_path, signum
):
    result = _start_and_signal(tokens, tmp_path / "run", signum)
    assert result.returncode == 130, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trifle train_gpt: error: interrupted"), result.stderr
    assert "Traceback" not in result.stderr
    _assert_clean(tmp_path / "run")
    assert (tmp_path / "run" / "gpt.pt.partial.pt").exists()


def test_kill_9_then_rerun_gives_the_uninterrupted_model(tokens, tmp_path):
    killed = tmp_path / "killed"
    result = _start_and_signal(tokens, killed, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    _assert_clean(killed)

    resumed = _trifle(*_train_args(tokens, killed), cwd=killed)
    assert resumed.returncode == 0, resumed.stderr
    assert not (killed / "gpt.pt.partial.pt").exists()

    straight = tmp_path / "straight"
    straight.mkdir()
    whole = _trifle(*_train_args(tokens, straight), cwd=straight)
    assert whole.returncode == 0, whole.stderr

    a = torch.load(killed / "gpt.pt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(straight / "gpt.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
