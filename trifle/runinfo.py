"""Provenance saved beside every stage output: resolved config, seed, git revision, versions, timing."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from trifle.io import write_json


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


def write_run_info(output: str | Path, *, stage: str, cfg: dict[str, Any], seconds: float) -> Path:
    """Write ``<output>.run.json`` and return its path."""
    path = Path(f"{output}.run.json")
    write_json(
        path,
        {
            "stage": stage,
            "seed": cfg.get("seed"),
            "config": cfg,
            "git": git_revision(),
            "argv": sys.argv,
            "seconds": round(seconds, 3),
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("trifle", "torch", "pyjuice", "numpy", "gymnasium")},
        },
    )
    return path
