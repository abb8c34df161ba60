# Aggregation: results/tables/models.csv (+ .md) from every training job's metrics, with the training-curves
# figure; the toy tasks' summary table and figure; the MuJoCo score tables (paper Tables 1 and 2) and figure.
# Each table rule also writes `<table>.html`, the table as the report shows it (a CSV would only be a
# download link there), and the tables `dvc metrics show` reads get a JSON copy
# (trifle/evaluation/report_tables.py; docs/evaluation.md#report-and-training-curves).


rule models_table:
    input:
        metrics=model_metrics,
        curves=training_curves,
    output:
        csv="results/tables/models.csv",
        md="results/tables/models.md",
        html=report(
            "results/tables/models.html",
            caption="../report/models.rst",
            category="Training",
            labels={"table": "models"},
        ),
        json="results/tables/models.json",
        curves=report(
            "results/figures/curves.png",
            caption="../report/curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        "logs/models_table.log",
    params:
        code=code("tables"),
        report_code=report_code,
        runs=lambda wildcards: report_runs(config["tasks"], aux=True),
        metrics=lambda wildcards, input: file_list(wildcards, input.metrics),
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
        " > {log:q} 2>&1 && python -m trifle.evaluation.report_tables table {output.csv:q} --html {output.html:q}"
        " --json {output.json:q} --keys task model seed >> {log:q} 2>&1"
        " && python -m trifle.evaluation.report_tables curves --out {output.curves:q} {input.curves:q} >> {log:q} 2>&1"


rule summary:
    input:
        toy_evaluation_files,
    output:
        csv="results/tables/summary.csv",
        md="results/tables/summary.md",
        html=report(
            "results/tables/summary.html",
            caption="../report/summary.rst",
            category="Results",
            labels={"table": "summary"},
        ),
        json="results/tables/summary.json",
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
        report_code=report_code,
        runs=lambda wildcards: report_runs(TOY_TASKS),
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
        " && python -m trifle.evaluation.report_tables table {output.csv:q} --html {output.html:q}"
        " --notes {output.md:q} --json {output.json:q} --keys task method >> {log:q} 2>&1"


rule mujoco_tables:
    input:
        evals=mujoco_evaluation_files,
        # The raw datasets: the table shows the score of the policy behind each one.
        raw=mujoco_raw_files,
    output:
        csv="results/tables/mujoco.csv",
        md="results/tables/mujoco.md",
        html=report(
            "results/tables/mujoco.html",
            caption="../report/mujoco.rst",
            category="Results",
            labels={"table": "mujoco"},
        ),
        safe="results/tables/safe_rl.csv",
        safe_md="results/tables/safe_rl.md",
        safe_html=report(
            "results/tables/safe_rl.html",
            caption="../report/safe_rl.rst",
            category="Results",
            labels={"table": "safe_rl"},
        ),
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
        report_code=report_code,
        runs=lambda wildcards: report_runs(MUJOCO_TASKS),
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
        " && python -m trifle.evaluation.report_tables table {output.csv:q} --html {output.html:q} >> {log:q} 2>&1"
        " && python -m trifle.evaluation.report_tables table {output.safe:q} --html {output.safe_html:q} >> {log:q} 2>&1"
