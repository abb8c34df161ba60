"""How long Snakemake takes to build the workflow's DAG, with the old and the new config composition.

Every job's params hold the slice of its Hydra-composed config, so building a DAG composes once per
job. This times, in a scratch copy of the project (trifle/, workflow/, profiles/, Snakefile,
pyproject.toml):

1. Snakemake's start-up floor: an empty Snakefile;
2. a no-op rerun of the default config (every output present: created empty, then `--touch`ed);
3. the smoke config's dry run (`-n --forceall`);
4. the paper dry run (README: `-n --forceall --configfile workflow/config/paper.yaml
   --workflow-profile workflow/profiles/slurm`);

each with the old path (`TRIFLE_COMPOSE=hydra`: one full Hydra compose per distinct override list) and
the new one (trifle.config's fast path), the new one cold (empty composition cache under
.snakemake/trifle-compose) and warm (the cache a previous run left). Old and new run interleaved in one
process, so the machine's load (recorded before and after each run) affects both alike; CPU time
(user + sys of the Snakemake process) is less sensitive to other jobs on the machine than wall time.

    python benchmarks/dag_build.py            # writes docs/benchmarks/dag_build.{md,json}
    python benchmarks/dag_build.py --skip-old # the new path only (the old paper dry run takes minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("trifle", "workflow", "profiles", "Snakefile", "pyproject.toml")
SCENARIOS = {
    "noop_default": ("no-op rerun, default config", ["--cores", "1"]),
    "smoke_dry_run": ("smoke dry run", ["-n", "--forceall", "--configfile", "workflow/config/smoke.yaml"]),
    "paper_dry_run": (
        "paper dry run (SLURM profile)",
        [
            "-n",
            "--forceall",
            "--configfile",
            "workflow/config/paper.yaml",
            "--workflow-profile",
            "workflow/profiles/slurm",
        ],
    ),
}


def copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake")
    dest.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        if src.is_symlink():
            (dest / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def environment(project: Path, mode: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project)
    env.pop("TRIFLE_COMPOSE_CACHE", None)  # the workflow's default: .snakemake/trifle-compose
    env["TRIFLE_COMPOSE"] = mode
    return env


def snakemake(project: Path, args: list[str], mode: str = "fast") -> dict:
    """One Snakemake run: wall and CPU seconds, the load average around it, its job count."""
    load_before = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=project,
        env=environment(project, mode),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = result.stdout + result.stderr
    total = re.search(r"^total\s+(\d+)$", out, flags=re.MULTILINE)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime, 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "returncode": result.returncode,
        "jobs": int(total.group(1)) if total else 0,
        "nothing_to_do": "Nothing to be done" in out,
        "error": None if result.returncode == 0 else out[-2000:],
    }


def clear_compose_cache(project: Path) -> None:
    shutil.rmtree(project / ".snakemake" / "trifle-compose", ignore_errors=True)


def create_outputs(project: Path) -> None:
    """Every output of the default DAG, created empty, then touched in DAG order: a finished run as
    far as Snakemake's rerun decision goes (it does not read the files)."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--forceall"],
        cwd=project,
        env=environment(project, "fast"),
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        if line.strip().startswith("output:"):
            for name in line.split(":", 1)[1].split(","):
                path = project / name.strip()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--touch", "--cores", "1"],
        cwd=project,
        env=environment(project, "fast"),
        capture_output=True,
        check=True,
    )


# What a no-op rerun spends outside Snakemake and the composition code: validation imports the trainers'
# key checks (torch), the default config's tasks are classified by env (MuJoCo), and every stage in the
# DAG gets a code fingerprint (each parses the stage's modules anew).
OTHER_COSTS = """
import json, time, yaml
t = time.perf_counter(); import torch; torch_s = time.perf_counter() - t
t = time.perf_counter(); import trifle.envs.mujoco; mujoco_s = time.perf_counter() - t
from trifle.fingerprint import code_fingerprint
from trifle.planning.methods import method
cfg = yaml.safe_load(open("workflow/config/default.yaml"))
methods = set(cfg.get("methods", [])) | {m for t in cfg.get("per_task", {}).values() for m in t.get("methods", [])}
t = time.perf_counter()
for stage in ("data", "labels", "tokens", "train_gpt", "train_pc", "train_dt", "tables", "summary"):
    code_fingerprint(f"trifle.stages.{stage}")
for m in sorted(methods):
    code_fingerprint("trifle.stages.evaluate", method(m).module)
fingerprint_s = time.perf_counter() - t
print(json.dumps({"torch_import_s": torch_s, "mujoco_import_s": mujoco_s, "fingerprints_s": fingerprint_s}))
"""


def other_costs(project: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", OTHER_COSTS],
        cwd=project,
        env=environment(project, "fast"),
        capture_output=True,
        text=True,
        check=True,
    )
    return {key: round(value, 2) for key, value in json.loads(result.stdout.splitlines()[-1]).items()}


def best(runs: list[dict]) -> dict:
    """The run with the least CPU time (the least disturbed by other jobs)."""
    return min(runs, key=lambda r: (r["returncode"] != 0, r["cpu_s"]))


def measure(repeats: int, skip_old: bool) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="trifle-dag-build-"))
    try:
        empty = scratch / "empty"
        empty.mkdir()
        (empty / "Snakefile").write_text("rule all:\n    input: [],\n")
        floor = best([snakemake(empty, ["-n", "--cores", "1"]) for _ in range(repeats)])
        project = copy_project(scratch / "project")
        create_outputs(project)
        results: dict[str, dict] = {}
        for name, (_, args) in SCENARIOS.items():
            runs: dict[str, list[dict]] = {"old": [], "new_cold": [], "new_warm": []}
            for _ in range(repeats):
                if not skip_old:
                    runs["old"].append(snakemake(project, args, mode="hydra"))
                if name != "noop_default":  # a no-op rerun follows a run: its cache is warm
                    clear_compose_cache(project)
                    runs["new_cold"].append(snakemake(project, args))
                runs["new_warm"].append(snakemake(project, args))
            results[name] = {kind: best(r) for kind, r in runs.items() if r}
            print(
                name, json.dumps({k: (v["wall_s"], v["cpu_s"]) for k, v in results[name].items()}), flush=True
            )
        return {"floor": floor, "scenarios": results, "other_costs": other_costs(project)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cell(run: dict | None) -> str:
    if run is None:
        return "-"
    if run["returncode"] != 0:
        return "failed"
    return f"{run['wall_s']:.1f} / {run['cpu_s']:.1f}"


def loads(run: dict | None) -> str:
    if run is None:
        return ""
    return f"{run['load_before'][0]:.1f}→{run['load_after'][0]:.1f}"


def report(data: dict) -> str:
    floor = data["floor"]
    costs = data["other_costs"]
    lines = [
        "# DAG build time",
        "",
        "`benchmarks/dag_build.py` on this machine: "
        f"{data['machine']['cpus']} CPUs, Python {data['machine']['python']}, Snakemake "
        f"{data['machine']['snakemake']}, Hydra {data['machine']['hydra']}. Cells are wall / CPU seconds "
        "(CPU: user + sys of the Snakemake process; other jobs share these cores, so wall time is "
        "noisier); the best of the runs. Load: the 1-minute load average before → after the new warm "
        "run.",
        "",
        f"Snakemake's start-up floor (an empty Snakefile): **{cell(floor)}** s.",
        "",
        "| run | jobs | old (`TRIFLE_COMPOSE=hydra`) | new, cold cache | new, warm cache | load |",
        "|---|---|---|---|---|---|",
    ]
    for name, (label, _) in SCENARIOS.items():
        runs = data["scenarios"][name]
        warm = runs.get("new_warm")
        jobs = (
            warm["jobs"]
            if warm and warm["jobs"]
            else ("0 (nothing to do)" if warm and warm["nothing_to_do"] else "-")
        )
        lines.append(
            f"| {label} | {jobs} | {cell(runs.get('old'))} | {cell(runs.get('new_cold'))} | {cell(warm)} | {loads(warm)} |"
        )
    failed = [
        (name, kind, run["error"])
        for name, runs in data["scenarios"].items()
        for kind, run in runs.items()
        if run["returncode"] != 0
    ]
    for name, kind, error in failed:
        lines += ["", f"`{name}` ({kind}) failed:", "", "```", error.strip()[-1500:], "```"]
    lines += [
        "",
        "## What the time went to",
        "",
        "Profiled before the change (`python -m cProfile -m snakemake -n ...`, paper config): 98% of the",
        "DAG build was `trifle.config.compose`, one full Hydra compose per distinct override list (1,394 of",
        "2,174 calls; each re-reads and re-merges every YAML file and Hydra's own config, then OmegaConf",
        "resolves the interpolations). The jobs' lists differ mostly in plain `key=value` overrides (seed,",
        "per-task settings, ablation values) on top of ~100 distinct group selections.",
        "",
        "The new path (trifle/config.py) composes each group selection once with Hydra, keeps it",
        "unresolved, applies the plain overrides to a plain-dict copy and resolves `${a.b}`",
        "interpolations itself; anything it cannot reproduce exactly (`+`/`~`/`++` overrides, dict",
        "values, resolvers, typed nodes) goes through Hydra's own override application on a copy of the",
        "composed DictConfig, and lists Hydra must see whole (sweeps, `key@package=`, `hydra.*`, parse",
        "errors) through a full compose. The unresolved group selections also persist in",
        "`.snakemake/trifle-compose/<digest of trifle/conf and the Hydra/OmegaConf versions>/`, so a",
        "rerun composes nothing with Hydra (cold: the first run after a config edit).",
        "",
        "What remains in a warm no-op rerun besides Snakemake's floor is outside the composition code:",
        f"the code fingerprints of the DAG's stages, {costs['fingerprints_s']:.1f} s (`trifle/fingerprint.py`;",
        "each module's parse is memoised by its source text, so stages share the work); importing MuJoCo",
        f"to classify the tasks, {costs['mujoco_import_s']:.1f} s. Torch ({costs['torch_import_s']:.1f} s to import) is no",
        "longer on this path: the config checks live in torch-free modules (`trifle.models.*_settings`,",
        "`trifle.planning.planner_settings`; tests/test_config_imports.py keeps it so). Composition itself is",
        "now a",
        "plain-dict copy and a few dozen lookups per job.",
        "",
        "Switches: `TRIFLE_COMPOSE=hydra` selects the old path; `TRIFLE_COMPOSE_CACHE=<dir>` sets the",
        "composition cache (the workflow defaults it to `.snakemake/trifle-compose`; empty: no disk cache).",
        "The fast path's equality with a plain Hydra compose, for every job of the default, smoke and paper",
        "DAGs and for hand-built edge cases, is tests/test_compose_cache.py.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (the best is reported)")
    parser.add_argument("--skip-old", action="store_true", help="skip the old path (minutes for the paper)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "dag_build")
    args = parser.parse_args(argv)
    import hydra
    import snakemake

    data = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "snakemake": snakemake.__version__,
            "hydra": hydra.__version__,
            "load_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    data.update(measure(args.repeats, args.skip_old))
    data["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(data))
    print(report(data))


if __name__ == "__main__":
    main()
