# Aggregation: results/tables/models.csv (+ .md) from every training job's metrics.


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
        evaluation_files,
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
