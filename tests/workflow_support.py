"""Running Snakemake and DVC on a copy of the project, as a user would from a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Rules whose jobs train or plan: the profiles send them to GPU partitions (workflow/profiles/slurm).
GPU_RULES = (
    "train_gpt",
    "train_pc",
    "train_dt",
    "train_critic",
    "train_aux",
    "evaluate",
    "evaluate_ablation",
)

PROJECT_FILES = (
    "Snakefile",
    "workflow",
    "profiles",
    "trifle",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".dvc",
    ".gitignore",
)


def env_for(project: Path) -> dict[str, str]:
    """Jobs run `python -m trifle`: make that the test's interpreter and the project copy's package."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project)
    env.setdefault("GIT_AUTHOR_NAME", "trifle-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@trifle.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "trifle-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@trifle.invalid")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env_for(cwd), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def snakemake(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "snakemake", *args], project, check)


def copy_project(dest: Path, config: str | None = None) -> Path:
    """Copy the workflow and package into ``dest``; ``config`` replaces the default workflow config."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "cache", "tmp")
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_symlink():
            (dest / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    if config is not None:
        (dest / "workflow" / "config" / "default.yaml").write_text(config)
    return dest


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    counts: dict[str, int] = {}
    lines = dry_run_output.splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts
