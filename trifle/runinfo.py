"""Provenance saved beside every stage output: resolved config, seed, git revision, versions, timing,
and the path and sha256 of every input file the stage read.

``<output>.run.json`` vouches for a complete output, so it is written (atomically) only once the stage
has returned, and an earlier run's copy is removed before the stage starts: Snakemake deletes a job's
outputs before running it, but not this file it does not know of, and a failed or interrupted run must
not leave it behind without its output. The same start checks that every output can be written.

Inputs are checked against each other before the stage runs (:func:`check_inputs`): a checkpoint's
``.run.json`` names the token file it was trained on, and an evaluation given another token file (from
another dataset seed, other bins) would plan with tokens the model never saw, silently. The hashes make
that one line naming both files.

The versions are read from the installed packages' metadata (:mod:`importlib.metadata`), not by
importing them: importing torch or pyjuice only to learn a version would add seconds to every job, and
a package that is missing is recorded as ``null`` instead of failing the stage after its work is done.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from trifle.errors import ConfigError, DataError
from trifle.io import atomic_path, sha256_of, write_json

#: Packages whose versions ``.run.json`` records: the package itself, the numerical stack a result
#: depends on (torch and the triton kernels pyjuice compiles, numpy) and the simulators that produce
#: the data and the returns (mujoco, gymnasium).
VERSIONED_PACKAGES = ("trifle", "torch", "triton", "pyjuice", "mujoco", "numpy", "gymnasium")

#: Suffix of the file, beside ``<output>.run.json``, that holds the uncommitted changes a run used.
DIFF_SUFFIX = ".run.diff"


def _git(args: list[str], cwd: str | Path) -> bytes | None:
    """``git <args>``'s standard output, or None where git is missing, ``cwd`` is not in a work tree
    or the command fails: provenance is recorded as unknown then, and the stage's output still counts."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout


def git_revision(cwd: str | Path = ".") -> dict[str, Any]:
    """The commit, whether tracked files had uncommitted changes (``dirty``), the names of untracked
    files, and ``git diff HEAD`` of the tracked files when dirty (``diff``, bytes; None when clean).

    Outside a git checkout, or without the git binary, the commit is 'unknown' and the rest None.
    Untracked files are named, not saved: ``git status`` lists them in the same call that tells whether
    the tree is dirty (an untracked folder as one ``name/``, ignored files not at all), while their
    contents may be anything (a scratch dataset, a notebook). The diff is taken without colour or
    external diff tools whatever the user's git config says, so that ``git apply`` can replay it."""
    rev = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], cwd)
    if rev is None or status is None:
        return {"commit": "unknown", "dirty": None, "untracked": None, "diff": None}
    dirty, untracked = False, []
    entries = iter(status.decode("utf-8", errors="replace").split("\0"))
    for entry in entries:
        if not entry:
            continue
        code, name = entry[:2], entry[3:]
        if code == "??":
            untracked.append(name)
            continue
        dirty = True
        if "R" in code or "C" in code:
            next(entries, None)  # a rename or copy is followed by the path it came from
    diff = _git(["diff", "--no-color", "--no-ext-diff", "HEAD"], cwd) if dirty else None
    return {
        "commit": rev.decode().strip(),
        "dirty": dirty,
        "untracked": sorted(untracked),
        "diff": diff or None,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_info_path(output: str | Path) -> Path:
    return Path(f"{output}.run.json")


def run_diff_path(output: str | Path) -> Path:
    return Path(f"{output}{DIFF_SUFFIX}")


def check_writable(key: str, path: Path) -> None:
    """An output must be a file in a folder this process can create or write: checked before a stage
    starts, so a read-only folder, or a file where a folder is needed, is one line naming the path and
    not a PermissionError after hours of training."""
    if path.is_dir():
        raise ConfigError(f"{key}={path}: is a directory, expected the path of a file to write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: cannot be written: {folder} is a file, expected a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot be written: the directory {folder} is not writable")


def prepare_outputs(outputs: Mapping[str, Path]) -> None:
    """Before a stage runs: every output writable, and no earlier run's ``.run.json`` or ``.run.diff``
    left beside them (a run from a clean tree writes no diff, so an older one would otherwise stay)."""
    for key, path in outputs.items():
        check_writable(key, path)
    for path in outputs.values():
        run_info_path(path).unlink(missing_ok=True)
        run_diff_path(path).unlink(missing_ok=True)


def input_digests(inputs: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """``{name: {"path", "sha256"}}`` of a stage's input files, as ``.run.json`` records them."""
    return {name: {"path": str(path), "sha256": sha256_of(path)} for name, path in inputs.items()}


def check_inputs(inputs: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """Before a stage runs: where one input's ``.run.json`` records a file this job also reads (by its
    ``paths.*`` name), the two must be the same file (sha256). Returns the inputs' digests.

    A missing input is left to the stage, which names it; an input without a sidecar, or a sidecar
    from before inputs were recorded, is not checked."""
    present = {name: path for name, path in inputs.items() if path.is_file()}
    digests = input_digests(present)
    for name, path in present.items():
        recorded = _recorded_inputs(run_info_path(path))
        for other, entry in recorded.items():
            if other in digests and entry.get("sha256") != digests[other]["sha256"]:
                raise DataError(
                    f"paths.{name}={path} was made from {other} {entry.get('path')} (sha256 "
                    f"{str(entry.get('sha256'))[:12]}), but this job's paths.{other}={digests[other]['path']} "
                    f"is another file (sha256 {digests[other]['sha256'][:12]}); rebuild {path} or pass the "
                    "file it was made from"
                )
    return digests


def _recorded_inputs(sidecar: Path) -> dict[str, dict[str, Any]]:
    if not sidecar.is_file():
        return {}
    try:
        inputs = json.loads(sidecar.read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return {}
    return inputs if isinstance(inputs, dict) else {}


def write_run_info(
    output: str | Path,
    *,
    stage: str,
    cfg: dict[str, Any],
    seconds: float,
    inputs: Mapping[str, Mapping[str, str]] | None = None,
    git: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<output>.run.json`` (after the output is complete) and return its path; ``inputs`` are
    :func:`check_inputs`' digests of the files the stage read, ``git`` a :func:`git_revision` taken when
    the stage started (by default it is taken now).

    When the work tree was dirty, ``git diff HEAD`` goes to a file of its own, ``<output>.run.diff``,
    written first, and the JSON names it with its sha256 and size (``git.diff``; null when the tree was
    clean or its state unknown). Not inline: a diff can be any size (a regenerated lock file, a
    rewritten config) and any bytes (git prints files in their own encoding, which JSON cannot hold),
    every stage reads its inputs' ``.run.json`` before it runs, and a separate file is what
    ``git apply`` takes to rebuild the code a result came from. The file is named relative to the JSON,
    so the pair can be moved together."""
    path = run_info_path(output)
    state = dict(git_revision() if git is None else git)
    diff = state.pop("diff", None)
    if diff:
        diff_path = run_diff_path(output)
        with atomic_path(diff_path) as tmp:
            tmp.write_bytes(diff)
        state["diff"] = {"file": diff_path.name, "sha256": sha256_of(diff_path), "bytes": len(diff)}
    else:
        state["diff"] = None
    write_json(
        path,
        {
            "stage": stage,
            "seed": cfg.get("seed"),
            "config": cfg,
            "git": state,
            "argv": sys.argv,
            "seconds": round(seconds, 3),
            "inputs": dict(inputs or {}),
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in VERSIONED_PACKAGES},
        },
    )
    return path
