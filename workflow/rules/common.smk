# Helpers shared by all rules: config validation, Hydra composition per job, code fingerprints.
import os
import shlex
from types import SimpleNamespace

from snakemake.utils import validate

from trifle.config import COMPOSE_CACHE_ENV, available, compose, stage_overrides, stage_slice
from trifle.fingerprint import code_fingerprint
from trifle.planning.methods import method


validate(config, schema="../schemas/config.schema.yaml")

# Compositions of the group selections persist under .snakemake/ (trifle.config), so a rerun composes
# nothing with Hydra; jobs inherit the directory. An empty TRIFLE_COMPOSE_CACHE turns it off.
os.environ.setdefault(COMPOSE_CACHE_ENV, os.path.abspath(".snakemake/trifle-compose"))

# Which ready job runs first when there are more than cores: the stage nearer the data, since it unblocks
# more of the DAG. Without an order Snakemake's choice among ready jobs put the default run's Taxi GPT (the
# start of its longest chain: GPT, then m-Trifle's evaluation) behind FrozenLake's whole pipeline, 4 of its
# 10 minutes on 2 cores (docs/workflow.md#measured-2-core-cpu-default-config). Rules not named here
# (tables, reports) keep 0.
PRIORITY = {
    "dataset": 60,
    "labels": 50,
    "tokens": 40,
    "import_gpt": 30,
    "import_pc": 30,
    "train_gpt": 30,
    "train_pc": 20,
    "train_critic": 20,
    "train_aux": 20,
    "train_dt": 10,
}

_unknown = sorted(set(config["tasks"]) - set(available("task")))
if _unknown:
    raise ValueError(
        f"workflow config 'tasks': unknown task(s) {_unknown}; expected names from trifle/conf/task: "
        f"{', '.join(available('task'))}"
    )


def _inherited_per_task():
    """per_task entries that only default.yaml (the Snakefile's configfile) holds, when --configfile gave
    another config: a config extending the default must not have to run the default's tasks. Entries
    of the given config itself must name tasks it runs."""
    import yaml

    if not workflow.overwrite_configfiles:
        return set()
    with open("workflow/config/default.yaml") as f:
        inherited = set((yaml.safe_load(f) or {}).get("per_task") or {})
    for path in workflow.overwrite_configfiles:
        with open(path) as f:
            inherited -= set((yaml.safe_load(f) or {}).get("per_task") or {})
    return inherited


_stray = sorted(set(config.get("per_task", {})) - set(config["tasks"]) - _inherited_per_task())
if _stray:
    raise ValueError(f"workflow config 'per_task': {_stray} not in 'tasks' ({', '.join(config['tasks'])})")


# What `protocol: pretrained` changes in a task's jobs: its tokens use Trajectory Transformer's bins, which
# the released GPT and circuit were fitted to (docs/workflow.md#released-models).
PROTOCOL_OVERRIDES = {"trained": [], "pretrained": ["task.discretizer.quantile=tt"]}


def task_settings(task):
    """Seeds, methods, group choices, overrides and protocol of one task: the global ones, where
    `per_task` replaces seeds / methods / protocol, updates groups and appends overrides (e.g. TT's longer
    GPT training on the medium-replay datasets); the protocol's own overrides come last."""
    own = config.get("per_task", {}).get(task, {})
    protocol = own.get("protocol", config.get("protocol", "trained"))
    if protocol == "pretrained" and "protocol" not in own and not has_released_models(task):
        protocol = "trained"  # the global choice covers the tasks released models exist for
    return {
        "seeds": own.get("seeds", config["seeds"]),
        "methods": own.get("methods", config.get("methods", [])),
        "groups": {**config.get("groups", {}), **own.get("groups", {})},
        "overrides": [*config.get("overrides", []), *own.get("overrides", []), *PROTOCOL_OVERRIDES[protocol]],
        "protocol": protocol,
    }


def has_released_models(task):
    """Released models exist for the published D4RL datasets only (TT's and the authors' releases cover
    the Gym-MuJoCo ones): a global `protocol: pretrained` leaves every other task trained."""
    return compose([f"task={task}"])["task"]["dataset"].get("generator") == "d4rl"


def released(task):
    """Whether the task's GPT and circuit are the released ones (`protocol: pretrained`)."""
    return task_settings(task)["protocol"] == "pretrained"


def released_sources(task):
    """The released files a pretrained task imports, checked at DAG build: TT's GPT directory (its two
    config pickles and its latest state_<epoch>.pt, the one TT's loader takes) and the authors' circuit."""
    from trifle.errors import CheckpointError
    from trifle.models.tt_import import find_state_file  # TT's own choice of epoch, as the import makes it

    cfg = compose([f"task={task}"])
    gpt_dir, pc_file = cfg["paths"]["released_gpt"], cfg["paths"]["released_pc"]
    gpt_files = [f"{gpt_dir}/model_config.pkl", f"{gpt_dir}/data_config.pkl"]
    missing = [f for f in [*gpt_files, pc_file] if not os.path.isfile(f)]
    try:
        state = f"{gpt_dir}/{find_state_file(gpt_dir)[0].name}"
    except CheckpointError:
        missing.append(f"{gpt_dir}/state_<epoch>.pt")
    if missing:
        raise ValueError(
            f"workflow config: task {task} has protocol pretrained, but released files are missing: "
            f"{', '.join(missing)}; expected Trajectory Transformer's logs/{task}/gpt/pretrained/ files in "
            f"{gpt_dir}/ and the Trifle authors' circuit at {pc_file} (docs/workflow.md#released-models)"
        )
    return {"gpt": [*gpt_files, state], "pc": [pc_file]}


for _task in config["tasks"]:
    _unknown_methods = sorted(set(task_settings(_task)["methods"]) - set(available("planner")))
    if _unknown_methods:
        raise ValueError(
            f"workflow config 'methods' of task {_task}: unknown method(s) {_unknown_methods}; expected "
            f"names from trifle/conf/planner: {', '.join(available('planner'))}"
        )
    for _method in task_settings(_task)["methods"]:
        method(_method)  # its registry block, checked at DAG build
    if released(_task):
        if not has_released_models(_task):
            raise ValueError(
                f"workflow config 'per_task.{_task}.protocol': pretrained, but no released models exist for "
                f"{_task} (only for the published D4RL datasets); expected protocol: trained"
            )
        released_sources(_task)  # every released file present, or one line naming the missing ones


def is_mujoco(task):
    """Gym-MuJoCo tasks are scored and tabulated apart from the toy tasks (normalized D4RL scores)."""
    from trifle.envs.mujoco import MUJOCO_ENVS

    return compose([f"task={task}"])["task"]["env"] in MUJOCO_ENVS


MUJOCO_TASKS = [t for t in config["tasks"] if is_mujoco(t)]
TOY_TASKS = [t for t in config["tasks"] if t not in MUJOCO_TASKS]


wildcard_constraints:
    task="|".join(re.escape(t) for t in available("task")),
    seed=r"\d+",
    method="|".join(re.escape(m) for m in available("planner")),


def hydra_overrides(wildcards):
    """The Hydra overrides of one job: its wildcards, the group choices, the extra overrides."""
    seed = getattr(wildcards, "seed", 0)
    settings = task_settings(wildcards.task)
    groups = [f"{group}={name}" for group, name in sorted(settings["groups"].items())]
    method = [f"planner={wildcards.method}"] if hasattr(wildcards, "method") else []
    return (f"task={wildcards.task}", f"seed={seed}", *groups, *method, *settings["overrides"])


def stage_config(stage):
    """params function: the plain-dict slice of the composed config that `stage` reads.

    Snakemake compares params between runs, so a changed hyperparameter reruns exactly the jobs whose
    stage reads it (plain dicts only: Snakemake silently leaves DictConfig objects out of the comparison;
    docs/workflow.md).
    """

    def params(wildcards):
        return stage_slice(compose(hydra_overrides(wildcards)), stage)

    return params


def cli_overrides(stage):
    """params function: the overrides `stage` reads, quoted for the job's shell command."""

    def overrides(wildcards):
        return " ".join(shlex.quote(o) for o in stage_overrides(hydra_overrides(wildcards), stage))

    return overrides


def code(stage):
    """params function: fingerprint of the package code `stage` runs (Snakemake's code trigger sees only
    the rule). Computed at the first job of the stage, not at parse time: stages outside the DAG cost
    nothing."""
    return lambda wildcards: code_fingerprint(f"trifle.stages.{stage}")


def method_registry(wildcards):
    """params of the table rules: every method's registry entry (labels, order, tables), which the
    tables read from the planner files; a relabelled method reruns the tables and nothing else."""
    import dataclasses

    from trifle.planning.methods import available_methods

    return {m: dataclasses.asdict(method(m)) for m in available_methods()}


def evaluate_code(wildcards):
    """The evaluate stage's fingerprint with the module of the method's policy function, which the
    stage loads by name (the import walk cannot see it): editing one method reruns only its jobs."""
    return code_fingerprint("trifle.stages.evaluate", method(wildcards.method).module)


def training_gpus(wildcards):
    return config.get("gpus_per_training_job", 0)


def hours(n):
    """runtime resource (minutes) that grows with each retry."""

    def runtime(wildcards, attempt):
        return int(60 * n * attempt)

    return runtime


# The files behind each input a method's registry entry can need (trifle.planning.methods.INPUTS); for a
# pretrained task the GPT and circuit are RELEASED_FILES instead (model_file).
INPUT_FILES = {
    "tokens": "data/tokens/{task}.npz",
    "labeled": "data/labeled/{task}.npz",
    "gpt": "results/checkpoints/{task}/gpt/seed{seed}.pt",
    "pc": "results/checkpoints/{task}/pc/seed{seed}.jpc",
    "dt": "results/checkpoints/{task}/dt/seed{seed}.pt",
    "critic": "results/checkpoints/{task}/critic/seed{seed}.pt",
}
# The inputs that are trained models (their jobs write results/checkpoints/).
TRAINED = tuple(k for k, f in INPUT_FILES.items() if f.startswith("results/checkpoints/"))
# A pretrained task's imported models (rules import_gpt, import_pc): one per task, planned with every seed.
RELEASED_FILES = {
    "gpt": "results/checkpoints/{task}/gpt/released.pt",
    "pc": "results/checkpoints/{task}/pc/released.jpc",
}


def model_file(need, task, seed):
    """The file of one input of a (task, seed) job: the released model where the task imports it."""
    if need in RELEASED_FILES and released(task):
        return RELEASED_FILES[need].format(task=task)
    return INPUT_FILES[need].format(task=task, seed=seed)


def metrics_file(model_path):
    """The metrics file beside a model checkpoint (every training and import stage writes one)."""
    return model_path.rsplit(".", 1)[0] + ".metrics.json"


def trained_models(task):
    """Models the task trains: the GPT and circuit always (the models table reports them), plus any
    other model a configured method needs (its registry entry)."""
    needed = {need for m in task_settings(task)["methods"] for need in method(m).needs}
    return [m for m in TRAINED if m in ("gpt", "pc") or m in needed]


def model_metrics(wildcards):
    """Metrics files of every training and import job of the configured grid (an imported model once)."""
    return list(
        dict.fromkeys(
            metrics_file(model_file(model, task, seed))
            for task in config["tasks"]
            for model in trained_models(task)
            for seed in task_settings(task)["seeds"]
        )
    )


def aux_checkpoints():
    """The optimality score's return models (checkpoint names without extension): a state and an action
    model per seed of every task that has runs to score."""
    scored_tasks = sorted({path.split("/")[2] for path in optimality_files()})
    return [
        f"results/checkpoints/{task}/aux/{kind}/seed{seed}"
        for task in scored_tasks
        for kind in ("state", "action")
        for seed in task_settings(task)["seeds"]
    ]


def training_curves(wildcards=None):
    """The training curve (trifle.models.curves) of every model the configuration trains, the optimality
    score's return models included: the curves figure plots them all."""
    released_metrics = {metrics_file(f.format(task=t)) for t in config["tasks"] for f in RELEASED_FILES.values()}
    trained = [m[: -len(".metrics.json")] for m in model_metrics(None) if m not in released_metrics]
    return [f"{name}.curve.csv" for name in trained + aux_checkpoints()]


def report_code(wildcards):
    """params of the rules that also write the report's views of their tables (HTML, JSON) or the curves
    figure: a change to that code reruns those cheap rules, never a training."""
    return code_fingerprint("trifle.evaluation.report_tables")


def report_runs(tasks, aux=False):
    """params: what a report table or figure covers, per task, as reStructuredText for its caption (the
    report's templating renders `snakemake.params.runs`): seeds, evaluated methods, trained models (with
    ``aux``: the optimality score's return models too), config-group choices and extra overrides."""
    scored = {path.split("/")[2] for path in optimality_files()}

    def literal(items):
        return ", ".join(f"``{item}``" for item in items) or "none"

    runs = []
    for task in tasks:
        settings = task_settings(task)
        models = trained_models(task) + (["aux/state", "aux/action"] if aux and task in scored else [])
        runs.append(
            {
                "task": task,
                "seeds": ", ".join(str(s) for s in settings["seeds"]),
                "methods": literal(settings["methods"]),
                "models": literal(models),
                "groups": literal(f"{g}={n}" for g, n in sorted(settings["groups"].items())),
                "overrides": literal(settings["overrides"]),
                "protocol": settings["protocol"],
            }
        )
    return runs


def evaluation_files_of(tasks):
    """Evaluation files of every method x seed of ``tasks``."""
    return [
        f"results/eval/{task}/{method}/seed{seed}.json"
        for task in tasks
        for method in task_settings(task)["methods"]
        for seed in task_settings(task)["seeds"]
    ]


def toy_evaluation_files(wildcards):
    return evaluation_files_of(TOY_TASKS)


def mujoco_evaluation_files(wildcards):
    return evaluation_files_of(MUJOCO_TASKS)


def mujoco_raw_files(wildcards):
    """The raw dataset of every MuJoCo task with evaluations (for the tables' behaviour column)."""
    return sorted({f"data/raw/{f.split('/')[2]}.hdf5" for f in evaluation_files_of(MUJOCO_TASKS)})


def final_targets():
    """The default target: the models table, plus each task family's tables that has evaluations."""
    targets = ["results/tables/models.csv"]
    if evaluation_files_of(TOY_TASKS):
        targets.append("results/tables/summary.csv")
    if evaluation_files_of(MUJOCO_TASKS):
        targets.append("results/tables/mujoco.csv")
    targets += [f"results/tables/ablation_{study}.csv" for study in config.get("ablations", {})]
    targets += optimality_targets()  # optimality.smk: the optimality table when the config asks for it
    return targets + pinned_files()


def pinned_files():
    """Every dataset, checkpoint (with its metrics and training curve) and evaluation file the configuration
    implies (DVC pins these folders).

    The tables need only the metrics and evaluation files, so without these targets a deleted checkpoint
    (or one removed by an interrupted rerun) left `snakemake -n` with nothing to do and `dvc repro`
    pinning a folder with one file fewer. As targets, a missing one is rebuilt: the set DVC records is
    complete by construction (tests/test_workflow.py)."""
    files = model_metrics(None)
    for task in config["tasks"]:
        files += [f"data/raw/{task}.hdf5", f"data/labeled/{task}.npz", f"data/tokens/{task}.npz"]
        files += [
            model_file(model, task, seed)
            for seed in task_settings(task)["seeds"]
            for model in trained_models(task)
        ]
    evaluations = evaluation_files_of(config["tasks"])
    for study in ABLATIONS:
        evaluations += ablation_files(SimpleNamespace(study=study))
    files += [path for e in evaluations for path in (e, e[: -len(".json")] + ".steps.npz")]
    files += [f"{name}.{ext}" for name in aux_checkpoints() for ext in ("pt", "metrics.json")]
    files += training_curves()
    return sorted(set(files))


def evaluation_inputs(wildcards):
    """The inputs a method plans with, named as the `paths.*` keys the evaluate stage reads."""
    inputs = {need: model_file(need, wildcards.task, wildcards.seed) for need in method(wildcards.method).needs}
    if wildcards.task in MUJOCO_TASKS:
        # Normalized scores use the raw dataset's reference scores where it has its own (Minari's).
        inputs["raw"] = f"data/raw/{wildcards.task}.hdf5"
    return inputs


def path_overrides(wildcards, input):
    """`paths.<name>=<file>` for each named input of a job."""
    return " ".join(shlex.quote(f"paths.{name}={path}") for name, path in input.items())


def file_list(wildcards, input):
    """All inputs as one Hydra list value."""
    return shlex.quote("[" + ",".join(input) + "]")


# The inference-time optimality score (workflow config `optimality: true`; rules in optimality.smk).
wildcard_constraints:
    kind="state|action",


def optimality_files(wildcards=None):
    """Score files of every (task, method, seed) of the grid whose method lists the optimality table."""
    if not config.get("optimality", False):
        return []
    return [
        f"results/eval/{task}/{m}/seed{seed}.optimality.json"
        for task in config["tasks"]
        for m in task_settings(task)["methods"]
        if "optimality" in method(m).tables
        for seed in task_settings(task)["seeds"]
    ]


def optimality_targets():
    """The default target's share: the optimality table, where there is anything to score."""
    return ["results/tables/optimality.csv"] if optimality_files() else []


def aux_overrides(wildcards):
    """The job's Hydra overrides plus the model kind its output names."""
    return (*hydra_overrides(wildcards), f"aux.kind={wildcards.kind}")


# Ablation studies (workflow config `ablations:`; rules in ablations.smk): every variant is checked here.
ABLATIONS = config.get("ablations", {})


def value_text(value):
    """A study value as its path part and Hydra override text (null: the method's default, e.g. the
    adaptive threshold of `planner.fixed_threshold`)."""
    return "null" if value is None else str(value)


for _study, _spec in ABLATIONS.items():
    _stray = sorted(set(_spec["tasks"]) - set(config["tasks"]))
    if _stray:
        raise ValueError(f"workflow config 'ablations.{_study}.tasks': {_stray} not in 'tasks' ({', '.join(config['tasks'])})")
    for _m in _spec["methods"]:
        if _m not in available("planner"):
            raise ValueError(
                f"workflow config 'ablations.{_study}.methods': unknown method {_m!r}; expected names from "
                f"trifle/conf/planner: {', '.join(available('planner'))}"
            )
        method(_m)
    for _task in _spec["tasks"]:
        for _m in _spec["methods"]:
            for _value in _spec["values"]:
                # Every variant composes and validates now, at DAG build (a bad value names its key).
                compose([f"task={_task}", f"planner={_m}", *task_settings(_task)["overrides"], f"{_spec['setting']}={value_text(_value)}"])


wildcard_constraints:
    study="|".join(re.escape(s) for s in ABLATIONS) or "NO_ABLATIONS",
    value=r"[^/]+",


def ablation_overrides(wildcards):
    """The job's Hydra overrides plus the study's setting at this value."""
    return (*hydra_overrides(wildcards), f"{ABLATIONS[wildcards.study]['setting']}={wildcards.value}")


def ablation_files(wildcards):
    spec = ABLATIONS[wildcards.study]
    return [
        f"results/eval/ablations/{wildcards.study}/{task}/{m}/{value_text(value)}/seed{seed}.json"
        for task in spec["tasks"]
        for m in spec["methods"]
        for value in spec["values"]
        for seed in task_settings(task)["seeds"]
    ]
