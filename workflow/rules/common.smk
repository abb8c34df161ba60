# Helpers shared by all rules: config validation, Hydra composition per job, code fingerprints.
import shlex

from snakemake.utils import validate

from trifle.config import available, compose, stage_overrides, stage_slice
from trifle.fingerprint import code_fingerprint


validate(config, schema="../schemas/config.schema.yaml")

_unknown_methods = sorted(set(config.get("methods", [])) - set(available("planner")))
if _unknown_methods:
    raise ValueError(
        f"workflow config 'methods': unknown method(s) {_unknown_methods}; expected names from "
        f"trifle/conf/planner: {', '.join(available('planner'))}"
    )
_unknown = sorted(set(config["tasks"]) - set(available("task")))
if _unknown:
    raise ValueError(
        f"workflow config 'tasks': unknown task(s) {_unknown}; expected names from trifle/conf/task: "
        f"{', '.join(available('task'))}"
    )


wildcard_constraints:
    task="|".join(re.escape(t) for t in available("task")),
    seed=r"\d+",
    method="|".join(re.escape(m) for m in available("planner")),


def hydra_overrides(wildcards):
    """The Hydra overrides of one job: its wildcards, the group choices, the extra overrides."""
    seed = getattr(wildcards, "seed", 0)
    groups = [f"{group}={name}" for group, name in sorted(config.get("groups", {}).items())]
    method = [f"planner={wildcards.method}"] if hasattr(wildcards, "method") else []
    return (f"task={wildcards.task}", f"seed={seed}", *groups, *method, *config.get("overrides", []))


def stage_config(stage):
    """params function: the plain-dict slice of the composed config that `stage` reads.

    Snakemake compares params between runs, so a changed hyperparameter reruns exactly the jobs whose
    stage reads it (notes: plain dicts only; DictConfig objects are not compared).
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
    """Fingerprint of the package code `stage` runs (Snakemake's code trigger sees only the rule)."""
    return code_fingerprint(f"trifle.stages.{stage}")


def training_gpus(wildcards):
    return config.get("gpus_per_training_job", 0)


def hours(n):
    """runtime resource (minutes) that grows with each retry."""

    def runtime(wildcards, attempt):
        return int(60 * n * attempt)

    return runtime


def trained_models():
    """Models the configured methods need: the GPT and circuit always, DT when it is evaluated."""
    return ["gpt", "pc"] + (["dt"] if "dt" in config.get("methods", []) else [])


def model_metrics(wildcards):
    """Metrics files of every training job of the configured grid."""
    return expand(
        "results/checkpoints/{task}/{model}/seed{seed}.metrics.json",
        task=config["tasks"],
        model=trained_models(),
        seed=config["seeds"],
    )


def evaluation_files(wildcards):
    """Evaluation files of every task x method x seed of the configured grid."""
    return expand(
        "results/eval/{task}/{method}/seed{seed}.json",
        task=config["tasks"],
        method=config.get("methods", []),
        seed=config["seeds"],
    )


def evaluation_inputs(wildcards):
    """The checkpoints a method plans with (named as the `paths.*` keys the evaluate stage reads)."""
    ckpt = "results/checkpoints/{task}/{model}/seed{seed}.{ext}"
    fill = dict(task=wildcards.task, seed=wildcards.seed)
    if wildcards.method == "dt":
        return {"labeled": f"data/labeled/{wildcards.task}.npz", "dt": ckpt.format(model="dt", ext="pt", **fill)}
    inputs = {"tokens": f"data/tokens/{wildcards.task}.npz", "gpt": ckpt.format(model="gpt", ext="pt", **fill)}
    if wildcards.method != "tt":
        inputs["pc"] = ckpt.format(model="pc", ext="jpc", **fill)
    return inputs


def path_overrides(wildcards, input):
    """`paths.<name>=<file>` for each named input of a job."""
    return " ".join(shlex.quote(f"paths.{name}={path}") for name, path in input.items())


def file_list(wildcards, input):
    """All inputs as one Hydra list value."""
    return shlex.quote("[" + ",".join(input) + "]")
