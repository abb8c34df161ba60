# trifle: the experiment DAG. Hyperparameters live in trifle/conf (Hydra); this file and
# workflow/config/*.yaml only say *what* to run (tasks x seeds x config groups).
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config/default.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/released.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/optimality.smk"


rule all:
    default_target: True
    input:
        final_targets(),
