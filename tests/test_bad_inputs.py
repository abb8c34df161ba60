"""Bad inputs through the command line: each fails with one line naming the key or file and what was
expected, a non-zero exit status, no traceback, and no output left behind.

These run ``python -m trifle`` in a subprocess, as a user (or a Snakemake job) does, so what is checked is
what a user sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _trifle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trifle", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


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
