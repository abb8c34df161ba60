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
from trifle.io import sha256_of, write_json


def git_revision(cwd: str | Path = ".") -> dict[str, Any]:
    """The commit and whether the work tree had uncommitted changes ('unknown' outside a git checkout)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_info_path(output: str | Path) -> Path:
    return Path(f"{output}.run.json")


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
    """Before a stage runs: every output writable, and no earlier run's ``.run.json`` left beside them."""
    for key, path in outputs.items():
        check_writable(key, path)
    for path in outputs.values():
        run_info_path(path).unlink(missing_ok=True)


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
) -> Path:
    """Write ``<output>.run.json`` (after the output is complete) and return its path; ``inputs`` are
    :func:`check_inputs`' digests of the files the stage read."""
    path = run_info_path(output)
    write_json(
        path,
        {
            "stage": stage,
            "seed": cfg.get("seed"),
            "config": cfg,
            "git": git_revision(),
            "argv": sys.argv,
            "seconds": round(seconds, 3),
            "inputs": dict(inputs or {}),
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("trifle", "torch", "pyjuice", "numpy", "gymnasium")},
        },
    )
    return path
