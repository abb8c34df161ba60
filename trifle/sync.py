"""`python -m trifle sync`: use pinned artifacts from the DVC remote instead of recomputing them.

`dvc pull` restores files with fresh, arbitrary modification times, so Snakemake alone would think
every downstream file is stale and retrain everything. After checking that the pulled artifacts are
exactly the ones `dvc.lock` pins for this code and config, the sync marks them up to date with
`snakemake --touch --forceall`, which also records Snakemake's provenance (params, code) for them.
The touch runs under the workflow config `params.yaml` names (`workflow_config`), the one `dvc repro`
ran and `dvc status` has just confirmed against dvc.lock, so the marked jobs are the pinned run's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from trifle.errors import TrifleError

# dvc status words that mean "this checkout is not what dvc.lock pins" (a missing output, from a
# partial pull, is fine: Snakemake will simply produce it).
_BLOCKING = ("modified", "new")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=cmd[:2] == ["dvc", "status"])
    except FileNotFoundError as err:
        raise TrifleError(f"sync: '{cmd[0]}' is not installed or not on PATH") from err
    except subprocess.CalledProcessError as err:
        raise TrifleError(f"sync: '{' '.join(cmd)}' failed with exit code {err.returncode}") from err


PARAMS_FILE = "params.yaml"
CONFIG_KEY = "workflow_config"


def workflow_config(params_file: Path = Path(PARAMS_FILE)) -> str:
    """The workflow config `dvc repro` runs, from ``params_file``'s `workflow_config` (dvc.yaml's
    ``${workflow_config}``), checked to name an existing file."""
    try:
        params = yaml.safe_load(params_file.read_text())
    except OSError as err:
        raise TrifleError(f"sync: cannot read {params_file} ({err}); expected it beside dvc.yaml") from err
    except yaml.YAMLError as err:
        raise TrifleError(f"sync: {params_file} is not valid YAML ({' '.join(str(err).split())})") from err
    value = params.get(CONFIG_KEY) if isinstance(params, dict) else None
    if not isinstance(value, str) or not value:
        raise TrifleError(
            f"sync: {params_file}: expected key '{CONFIG_KEY}' naming the workflow config file "
            f"(e.g. workflow/config/default.yaml), got {value!r}"
        )
    if not (params_file.parent / value).is_file():
        raise TrifleError(f"sync: {params_file}: {CONFIG_KEY} names {value}, which does not exist")
    return value


def blocking_changes(status: dict) -> list[str]:
    """Human-readable reasons from `dvc status --json` that make touching unsafe."""
    problems = []
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for path, state in entry.get("changed deps", {}).items():
                problems.append(f"{stage}: dependency {path} is {state} since dvc.lock was written")
            for path, state in entry.get("changed outs", {}).items():
                if state in _BLOCKING:
                    problems.append(f"{stage}: output {path} is {state} relative to dvc.lock")
    return problems


def _remote(dvc_pull_args: Sequence[str]) -> tuple[str | None, str | None]:
    """The remote `dvc pull` reads (``-r/--remote NAME`` or the default) and its URL, from `dvc config
    --list` (None where there is none; `dvc remote list` wraps long lines when piped)."""
    args = list(dvc_pull_args)
    name = None
    for i, arg in enumerate(args):
        if arg in ("-r", "--remote") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith("--remote="):
            name = arg.partition("=")[2]
    listing = subprocess.run(["dvc", "config", "--list"], capture_output=True, text=True).stdout
    config = dict(line.partition("=")[::2] for line in listing.splitlines())
    name = name or config.get("core.remote")
    return name, config.get(f"remote.{name}.url") if name else None


def _pull_failure(dvc_pull_args: Sequence[str], code: int) -> str:
    """Why `dvc pull` failed, in one line: which remote it read, and which pinned files it lacks
    (`dvc status --cloud`), rather than only an exit code."""
    name, url = _remote(dvc_pull_args)
    if name is None:
        return (
            f"sync: 'dvc pull' failed with exit code {code}: no DVC remote is set; expected a default "
            "remote (`dvc remote add -d <name> <url>`) or `-r <name>`"
        )
    where = f"remote '{name}' ({url or 'unknown URL'})"
    status = subprocess.run(
        ["dvc", "status", "--cloud", "--json", "-r", name], capture_output=True, text=True
    )
    try:
        missing = sorted(p for p, state in json.loads(status.stdout or "{}").items() if state == "missing")
    except (ValueError, AttributeError):
        missing = []
    if not missing:
        return f"sync: 'dvc pull' from {where} failed with exit code {code} (see dvc's messages above)"
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (
        f"sync: 'dvc pull' failed: {where} lacks {len(missing)} file(s) this checkout pins: {shown}; "
        "expected them pushed there (`dvc push` in the checkout that produced them)"
    )


def sync(dvc_pull_args: Sequence[str] = ()) -> None:
    """Pull pinned artifacts, verify them against dvc.lock, then mark them up to date for Snakemake."""
    config = workflow_config()  # a bad params.yaml fails before anything is pulled
    try:
        _run(["dvc", "pull", *dvc_pull_args])
    except TrifleError as err:
        if not isinstance(err.__cause__, subprocess.CalledProcessError):
            raise
        raise TrifleError(_pull_failure(dvc_pull_args, err.__cause__.returncode)) from err
    status = json.loads(_run(["dvc", "status", "--json"]).stdout or "{}")
    problems = blocking_changes(status)
    if problems:
        raise TrifleError(
            "sync: the pulled artifacts do not match this checkout, so they are not marked up to date:\n  "
            + "\n  ".join(problems)
            + "\nCheck out the commit whose dvc.lock you pulled, or rerun "
            + f"`snakemake --cores all --configfile {config}`."
        )
    _run(["snakemake", "--touch", "--forceall", "--cores", "1", "--configfile", config])
    print("sync: pinned artifacts restored and marked up to date; `snakemake -n` should list no jobs.")
