# Aggregation: results/tables/models.csv (+ .md) from every training job's metrics; the toy tasks'
# summary table and figure; the MuJoCo score tables (paper Tables 1 and 2) and figure.


rule models_table:
    input:
        model_metrics,
    output:
        csv="results/tables/models.csv",
        md="results/tables/models.md",
    log:
        "logs/models_table.log",
    params:
        code=code("tables"),
        metrics=file_list,
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle tables paths.model_metrics={params.metrics} paths.models_table={output.csv:q}"
        " > {log:q} 2>&1"


rule summary:
    input:
        toy_evaluation_files,
    output:
        csv=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Results",
            labels={"table": "summary"},
        ),
        md="results/tables/summary.md",
        figure=report(
            "results/figures/returns.png",
            caption="../report/returns.rst",
            category="Results",
            labels={"figure": "returns"},
        ),
    log:
        "logs/summary.log",
    params:
        code=code("summary"),
        methods=method_registry,
        files=file_list,
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle summary paths.eval_files={params.files} paths.summary_table={output.csv:q}"
        " paths.returns_figure={output.figure:q} > {log:q} 2>&1"


rule mujoco_tables:
    input:
        evals=mujoco_evaluation_files,
        # The raw datasets: the table shows the score of the policy behind each one.
        raw=mujoco_raw_files,
    output:
        csv=report(
            "results/tables/mujoco.csv",
            caption="../report/mujoco.rst",
            category="Results",
            labels={"table": "mujoco"},
        ),
        md="results/tables/mujoco.md",
        safe=report(
            "results/tables/safe_rl.csv",
            caption="../report/safe_rl.rst",
            category="Results",
            labels={"table": "safe_rl"},
        ),
        safe_md="results/tables/safe_rl.md",
        figure=report(
            "results/figures/mujoco_scores.png",
            caption="../report/mujoco_scores.rst",
            category="Results",
            labels={"figure": "mujoco_scores"},
        ),
    log:
        "logs/mujoco_tables.log",
    params:
        code=code("mujoco_tables"),
        methods=method_registry,
        files=lambda wildcards, input: file_list(wildcards, input.evals),
        raw=lambda wildcards, input: file_list(wildcards, input.raw),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle mujoco_tables paths.eval_files={params.files} paths.raw_files={params.raw}"
        " paths.mujoco_table={output.csv:q}"
        " paths.safe_table={output.safe:q} paths.scores_figure={output.figure:q} > {log:q} 2>&1"
