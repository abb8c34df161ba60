# Helpers shared by all rules: config validation, Hydra composition per job, code fingerprints.
import shlex

from snakemake.utils import validate

from trifle.config import available, compose, stage_overrides, stage_slice
from trifle.fingerprint import code_fingerprint


validate(config, schema="../schemas/config.schema.yaml")

_unknown = sorted(set(config["tasks"]) - set(available("task")))
if _unknown:
    raise ValueError(
        f"workflow config 'tasks': unknown task(s) {_unknown}; expected names from trifle/conf/task: "
        f"{', '.join(available('task'))}"
    )


wildcard_constraints:
    task="|".join(re.escape(t) for t in available("task")),
    seed=r"\d+",


def hydra_overrides(wildcards):
    """The Hydra overrides of one job: its wildcards, the group choices, the extra overrides."""
    seed = getattr(wildcards, "seed", 0)
    groups = [f"{group}={name}" for group, name in sorted(config.get("groups", {}).items())]
    return (f"task={wildcards.task}", f"seed={seed}", *groups, *config.get("overrides", []))


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


def model_metrics(wildcards):
    """Metrics files of every training job of the configured grid."""
    return expand(
        "results/checkpoints/{task}/{model}/seed{seed}.metrics.json",
        task=config["tasks"],
        model=["gpt", "pc"],
        seed=config["seeds"],
    )
