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
        metrics=lambda wildcards, input: "[" + ",".join(input) + "]",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle tables paths.model_metrics={params.metrics:q} paths.models_table={output.csv:q}"
        " > {log:q} 2>&1"
