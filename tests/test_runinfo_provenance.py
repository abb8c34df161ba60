"""What ``<output>.run.json`` records about the software a result came from: the versions of the
packages the numbers depend on, and the uncommitted changes of the code (``git diff HEAD``, in a
``<output>.run.diff`` beside it), so that a result made from a dirty tree can still be traced to its code.

The git tests build a small repository in a temporary folder, with the user's and the system's git
config switched off so that colour, signing or a diff tool set there cannot change what git prints."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from trifle import runinfo
from trifle.runinfo import git_revision, prepare_outputs, write_run_info

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")


@pytest.fixture(autouse=True)
def _plain_git(monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A committed repository, the process's working directory (where a stage reads its git state)."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a.txt").write_text("one\ntwo\n")
    (root / "b.txt").write_text("bee\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    monkeypatch.chdir(root)
    return root


def record(out_dir: Path, **kwargs) -> tuple[Path, dict]:
    """Write the provenance of a (pretend) output in ``out_dir``, outside the repository."""
    out_dir.mkdir(exist_ok=True)
    output = out_dir / "model.pt"
    output.write_bytes(b"weights")
    path = write_run_info(output, stage="train_gpt", cfg={"seed": 3}, seconds=1.5, **kwargs)
    return output, json.loads(path.read_text())


def test_versions_are_the_installed_packages_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(runinfo, "VERSIONED_PACKAGES", (*runinfo.VERSIONED_PACKAGES, "no-such-package-x"))
    _, info = record(tmp_path)
    versions = info["versions"]
    assert {"torch", "triton", "pyjuice", "mujoco", "numpy", "trifle"} <= versions.keys()
    for name, version in versions.items():
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = None
        assert version == expected, name
    assert versions["no-such-package-x"] is None
    assert versions["torch"] is not None and versions["numpy"] is not None
    assert info["python"] == platform.python_version()


@needs_git
def test_a_dirty_tree_saves_git_diff_head_beside_the_record(repo, tmp_path):
    (repo / "a.txt").write_text("one\nTWO\n")  # modified
    git(repo, "mv", "b.txt", "c.txt")  # a staged rename: two paths in one status entry
    (repo / "new.txt").write_text("untracked\n")
    (repo / "scratch").mkdir()
    (repo / "scratch" / "x.npz").write_bytes(b"\0")
    expected = git(repo, "diff", "HEAD")
    assert expected

    output, info = record(tmp_path / "out")
    state = info["git"]
    assert state["commit"] == git(repo, "rev-parse", "HEAD").decode().strip()
    assert state["dirty"] is True
    assert state["untracked"] == ["new.txt", "scratch/"]
    sidecar = output.parent / state["diff"]["file"]
    assert sidecar == Path(f"{output}.run.diff")
    assert sidecar.read_bytes() == expected
    assert state["diff"]["sha256"] == hashlib.sha256(expected).hexdigest()
    assert state["diff"]["bytes"] == len(expected)


@needs_git
def test_the_diff_replays_onto_the_commit(repo, tmp_path):
    """The saved diff is what `git apply` needs to rebuild the tree the result came from."""
    (repo / "a.txt").write_text("one\nTWO\nthree\n")
    output, info = record(tmp_path / "out")
    git(repo, "checkout", "-q", "--", "a.txt")
    assert (repo / "a.txt").read_text() == "one\ntwo\n"
    git(repo, "apply", str(output.parent / info["git"]["diff"]["file"]))
    assert (repo / "a.txt").read_text() == "one\nTWO\nthree\n"


@needs_git
def test_a_clean_tree_writes_no_diff(repo, tmp_path):
    (repo / "new.txt").write_text("untracked files do not make the tree dirty\n")
    output, info = record(tmp_path / "out")
    assert info["git"]["dirty"] is False
    assert info["git"]["diff"] is None
    assert info["git"]["untracked"] == ["new.txt"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.pt", "model.pt.run.json"]


@needs_git
def test_a_snapshot_taken_at_the_start_is_what_is_recorded(repo, tmp_path):
    """A long stage records the code it started with, not an edit made while it ran."""
    (repo / "a.txt").write_text("edited before the start\n")
    at_start = git_revision()
    diff_at_start = git(repo, "diff", "HEAD")
    git(repo, "checkout", "-q", "--", "a.txt")  # clean again by the time the stage ends
    output, info = record(tmp_path / "out", git=at_start)
    assert info["git"]["dirty"] is True
    assert (output.parent / info["git"]["diff"]["file"]).read_bytes() == diff_at_start


@needs_git
def test_a_rerun_from_a_clean_tree_leaves_no_diff_of_the_earlier_run(repo, tmp_path):
    (repo / "a.txt").write_text("dirty\n")
    output, _ = record(tmp_path / "out")
    assert Path(f"{output}.run.diff").is_file()
    git(repo, "commit", "-qam", "second")
    prepare_outputs({"gpt": output})
    assert not Path(f"{output}.run.diff").exists() and not Path(f"{output}.run.json").exists()
    _, info = record(tmp_path / "out")
    assert info["git"]["diff"] is None
    assert not Path(f"{output}.run.diff").exists()


def _unknown(info: dict) -> None:
    assert info["git"] == {"commit": "unknown", "dirty": None, "untracked": None, "diff": None}


def test_outside_a_git_checkout_the_state_is_unknown(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # /tmp itself might sit in a checkout
    output, info = record(tmp_path / "out")
    _unknown(info)
    assert not Path(f"{output}.run.diff").exists()


@needs_git
def test_without_the_git_binary_the_state_is_unknown(repo, tmp_path, monkeypatch):
    (repo / "a.txt").write_text("dirty, but nobody can tell\n")
    empty = tmp_path / "no-git-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    output, info = record(tmp_path / "out")
    _unknown(info)
    assert not Path(f"{output}.run.diff").exists()


@needs_git
def test_a_stage_run_from_a_dirty_checkout_saves_its_diff(repo, tmp_path):
    """Through the command line: the stage's output gets the sidecar, and a rerun once the tree is
    clean removes it (Snakemake, which does not know of the file, would not)."""
    from trifle.__main__ import main

    (repo / "a.txt").write_text("dirty\n")
    raw = tmp_path / "out" / "raw.hdf5"
    args = ["data", "task.dataset.num_episodes=5", f"paths.raw={raw}", "progress=false"]
    assert main(args) == 0
    info = json.loads(Path(f"{raw}.run.json").read_text())
    assert Path(f"{raw}.run.diff").read_bytes() == git(repo, "diff", "HEAD")
    assert info["git"]["diff"]["file"] == "raw.hdf5.run.diff"

    git(repo, "commit", "-qam", "second")
    assert main(args) == 0
    assert json.loads(Path(f"{raw}.run.json").read_text())["git"]["diff"] is None
    assert not Path(f"{raw}.run.diff").exists()
