"""The Snakemake workflow: lint, dry runs of the default and paper configs, config validation."""

import re

import pytest

from workflow_support import GPU_RULES, REPO, copy_project, job_counts, snakemake


def test_lint_is_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_dry_run_lists_every_rule():
    out = snakemake(REPO, "-n", "--forceall").stdout
    assert job_counts(out) == {
        "dataset": 2,
        "labels": 2,
        "tokens": 2,
        "train_gpt": 2,
        "train_pc": 2,
        "train_dt": 2,
        # Taxi: dt, tt, trifle-s, trifle-m, trifle-dt and the three TT + Q_taxi; FrozenLake: the first five.
        "evaluate": 8 + 5,
        "models_table": 1,
        "summary": 1,
        "all": 1,
    }


def test_a_job_never_waits_behind_a_job_it_unblocks():
    """Among ready jobs, the stage nearer the data runs first (workflow/rules/common.smk PRIORITY): every
    file a job reads is made by a job of at least its priority, and training outranks evaluation."""
    out = snakemake(REPO, "-n", "--forceall").stdout
    jobs = []
    for rule, block in _jobs(out):
        fields = dict(re.findall(r"^\s+(input|output|priority): (.*)$", block, flags=re.M))
        jobs.append(
            (
                rule,
                int(fields.get("priority", 0)),
                fields.get("input", "").split(", "),
                fields.get("output", "").split(", "),
            )
        )
    producer = {path: (rule, prio) for rule, prio, _, outputs in jobs for path in outputs if path}
    checked = 0
    for rule, prio, inputs, _ in jobs:
        for path in inputs:
            if path in producer:
                made_by, made_prio = producer[path]
                assert made_prio >= prio, (
                    f"{rule} ({prio}) outranks {made_by} ({made_prio}), which makes {path}"
                )
                checked += 1
    assert checked > 20
    prio = {rule: p for rule, p, _, _ in jobs}
    assert prio["train_gpt"] > prio["train_pc"] > prio["train_dt"] > prio["evaluate"] == 0


@pytest.fixture(scope="module")
def paper_dry_run() -> str:
    """The README's paper command, dry: the paper config through the SLURM profile."""
    args = ("--configfile", "workflow/config/paper.yaml", "--workflow-profile", "workflow/profiles/slurm")
    return snakemake(REPO, "-n", "--forceall", *args).stdout


def _jobs(out: str) -> list[tuple[str, str]]:
    """(rule, block) of every job listed by a dry run."""
    jobs = []
    for block in out.split("\n\n"):
        rule = re.search(r"rule (\w+):", block)
        if rule:
            jobs.append((rule.group(1), block))
    return jobs


@pytest.mark.slow  # the paper DAG: 631 jobs, over a minute to build
def test_paper_dry_run_has_every_job_with_gpu_resources(paper_dry_run):
    counts = job_counts(paper_dry_run)
    # 4 toy tasks x 3 seeds; 9 Gym-MuJoCo datasets x 12 seeds.
    assert counts["dataset"] == 13 and counts["train_gpt"] == 4 * 3 + 9 * 12 and counts["train_pc"] == 120
    assert counts["train_dt"] == 12
    # One IQL critic per seed where TT(+Q) runs: Taxi (3 seeds) and the 9 MuJoCo datasets (12 seeds).
    assert counts["train_critic"] == 3 + 9 * 12
    # Toy (3 seeds): 5 methods on the FrozenLakes, 10 on Taxi (also tt-q, trifle-s-q and the three
    # TT + Q_taxi); MuJoCo: tt, trifle-s, tt-q and trifle-s-q on 9 datasets, tt-safe and trifle-s-safe on 3.
    assert counts["evaluate"] == 3 * 5 * 3 + 10 * 3 + 9 * 12 * 4 + 3 * 12 * 2
    assert counts["mujoco_tables"] == counts["summary"] == counts["models_table"] == 1
    # The optimality score (optimality: true): a state and an action return model per trained GPT's task
    # and seed, one table.
    assert counts["train_aux"] == 2 * counts["train_gpt"] and counts["optimality_table"] == 1
    for rule, block in _jobs(paper_dry_run):
        if rule in GPU_RULES:
            assert "gpu=1" in block and "slurm_partition=gpu" in block, block
            assert re.search(r"runtime=\d+", block) and "mem_mb=" in block
        elif rule in ("dataset", "labels", "tokens"):
            assert "gpu=0" in block and "slurm_partition=cpu" in block, block


@pytest.mark.slow
def test_paper_mujoco_jobs_use_tt_training_and_the_paper_methods(paper_dry_run):
    jobs = _jobs(paper_dry_run)
    gpt = {
        re.search(r"output: results/checkpoints/([\w.-]+)/gpt/seed(\d+)\.pt", b).groups(): b
        for r, b in jobs
        if r == "train_gpt"
    }
    assert len(gpt) == 120
    assert (
        "gpt=tt-mujoco" in gpt[("hopper-medium-v2", "11")]
        and "gpt.steps" not in gpt[("hopper-medium-v2", "0")]
    )
    assert "gpt.steps=312500" in gpt[("walker2d-medium-replay-v2", "3")]
    assert "gpt=paper" in gpt[("taxi-stochastic", "2")] and ("taxi-stochastic", "3") not in gpt
    evals = {
        re.search(r"output: results/eval/([\w.-]+)/([\w-]+)/seed(\d+)\.json", b).groups()
        for r, b in jobs
        if r == "evaluate"
    }
    assert ("hopper-medium-expert-v2", "trifle-s-safe", "11") in evals
    assert ("hopper-medium-v2", "trifle-s-safe", "0") not in evals and (
        "hopper-medium-v2",
        "dt",
        "0",
    ) not in evals


def test_smoke_dry_run_trains_a_critic_where_tt_q_runs():
    """The smoke config runs tt-q and trifle-s-q on Taxi and the MuJoCo task: each trains one critic (with
    the smoke's tiny step count), and their evaluations are given it as paths.critic."""
    out = snakemake(REPO, "-n", "--forceall", "--configfile", "workflow/config/smoke.yaml").stdout
    counts = job_counts(out)
    # Taxi (trifle-dt and the three TT + Q_taxi too), FrozenLake, Hopper
    assert counts["train_critic"] == 2 and counts["evaluate"] == 10 + 4 + 6
    jobs = _jobs(out)
    critic = [b for r, b in jobs if r == "train_critic"]
    assert all("critic.steps=20" in b and "gpt.steps" not in b for b in critic)
    assert {re.search(r"task=([\w.-]+)", b).group(1) for b in critic} == {
        "taxi-stochastic",
        "hopper-random-local",
    }
    tt_q = [b for r, b in jobs if r == "evaluate" and "planner=tt-q " in b]
    assert len(tt_q) == 2 and all("paths.critic=results/checkpoints/" in b for b in tt_q)
    tt = [b for r, b in jobs if r == "evaluate" and "planner=tt " in b]
    assert tt and not any("paths.critic" in b or "critic/seed" in b for b in tt)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("tasks: [taxi-stochastic, atari]\nseeds: [0]\n", "unknown task.*atari"),
        ("tasks: [taxi-stochastic]\nseeds: [-1]\n", "seeds"),
        ("tasks: [taxi-stochastic]\nmethods: [tt, cql]\nseeds: [0]\n", "unknown method.*cql"),
        ("tasks: [taxi-stochastic]\nseeds: [0]\nbeam: 3\n", "beam"),
        ("tasks: [taxi-stochastic]\nseeds: [0]\noverrides: [gpt.n_embd=65]\n", "gpt.n_embd"),
        (
            "tasks: [taxi-stochastic]\nseeds: [0]\nper_task: {hopper-medium-v2: {seeds: [1]}}\n",
            "per_task.*hopper",
        ),
        (
            "tasks: [taxi-stochastic]\nseeds: [0]\nper_task: {taxi-stochastic: {methods: [sac]}}\n",
            "unknown method.*sac",
        ),
        ("tasks: [taxi-stochastic]\nseeds: [0]\nper_task: {taxi-stochastic: {beam: 3}}\n", "beam"),
        # The planner is chosen by `methods`; a planner group choice would silently do nothing.
        ("tasks: [taxi-stochastic]\nseeds: [0]\ngroups: {planner: trifle-m}\n", "planner.*unexpected"),
    ],
)
def test_bad_workflow_config_fails_before_any_job(tmp_path, config, message):
    project = copy_project(tmp_path / "p", config=config)
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stdout + result.stderr


def test_every_workflow_output_is_pinned_by_dvc():
    import yaml

    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for o in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["reproduce"]["outs"]
    ]
    summary = snakemake(REPO, "--summary").stdout.splitlines()
    files = [line.split("\t")[0] for line in summary[1:] if line.strip()]
    assert files, summary
    unpinned = [f for f in files if not any(f.startswith(o.rstrip("/") + "/") for o in outs)]
    assert unpinned == []


@pytest.mark.parametrize("name", ["mujoco_cpu", "ablations", "smoke"])
def test_shipped_configs_that_extend_the_default_build_their_dag(name):
    """`--configfile X` merges X into default.yaml: the default's per_task entries for tasks X does not
    run are inherited and must not fail the build (paper.yaml runs every default task, so it is not here)."""
    result = snakemake(REPO, "-n", "--configfile", f"workflow/config/{name}.yaml", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_given_configs_own_per_task_entry_must_name_a_task_it_runs(tmp_path):
    project = copy_project(tmp_path / "p")
    extra = project / "extra.yaml"
    extra.write_text("tasks: [frozenlake-eps0.5]\nper_task: {hopper-random-local: {seeds: [1]}}\n")
    result = snakemake(project, "-n", "--configfile", str(extra), check=False)
    assert result.returncode != 0
    assert (
        "per_task" in result.stderr + result.stdout and "hopper-random-local" in result.stderr + result.stdout
    )


def _finished_run(project):
    """Every output of the default DAG created empty and touched in DAG order: a finished run as far as
    Snakemake's rerun decision goes (it does not read the files)."""
    for line in snakemake(project, "-n", "--forceall").stdout.splitlines():
        if line.strip().startswith("output:"):
            for name in line.split(":", 1)[1].split(","):
                path = project / name.strip()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    snakemake(project, "--touch", "--cores", "1")


@pytest.mark.parametrize(
    "missing, rebuilt",
    [
        ("results/checkpoints/taxi-stochastic/pc/seed0.jpc", "train_pc"),
        ("results/checkpoints/frozenlake-eps0.5/dt/seed0.pt", "train_dt"),
        ("data/tokens/taxi-stochastic.npz", "tokens"),
        ("results/eval/taxi-stochastic/tt/seed0.steps.npz", "evaluate"),
    ],
)
def test_a_deleted_intermediate_file_is_rebuilt_before_dvc_pins_the_folder(tmp_path, missing, rebuilt):
    """The tables read only metrics and evaluation records; every checkpoint and dataset is a target too,
    so `snakemake` (and `dvc repro`, which runs it) rebuilds a missing one instead of reporting nothing to
    do and letting DVC record a folder with one file fewer."""
    project = copy_project(tmp_path / "p")
    _finished_run(project)
    assert "Nothing to be done" in snakemake(project, "-n").stdout
    (project / missing).unlink()
    counts = job_counts(snakemake(project, "-n").stdout)
    assert counts.get(rebuilt, 0) >= 1, counts
