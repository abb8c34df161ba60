# The inference-time optimality score (docs/evaluation.md#optimality-score), when the workflow config has
# `optimality: true`: two return models per task and seed (train_aux, kind state and action), a score file
# per evaluated run of every method whose registry lists the `optimality` table, and the table + figure.
# A run's score file sits beside its evaluation record and steps (results/eval/), which DVC pins whether or
# not a config scores anything: a results/optimality/ output would have to exist for every `dvc repro`.
# Helpers (optimality_files, aux_overrides): common.smk.


rule train_aux:
    input:
        tokens="data/tokens/{task}.npz",
        labeled="data/labeled/{task}.npz",
    output:
        model="results/checkpoints/{task}/aux/{kind}/seed{seed}.pt",
        metrics="results/checkpoints/{task}/aux/{kind}/seed{seed}.metrics.json",
        # The training curve, one row per evaluation, from the metrics' history (trifle.models.curves).
        curve="results/checkpoints/{task}/aux/{kind}/seed{seed}.curve.csv",
    log:
        "logs/train_aux/{task}/{kind}/seed{seed}.log",
    params:
        cfg=lambda wildcards: stage_slice(compose(aux_overrides(wildcards)), "train_aux"),
        code=code("train_aux"),
        overrides=lambda wildcards: " ".join(
            shlex.quote(o) for o in stage_overrides(aux_overrides(wildcards), "train_aux")
        ),
    priority: PRIORITY["train_aux"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(12),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle train_aux {params.overrides} threads={threads} paths.tokens={input.tokens:q}"
        " paths.labeled={input.labeled:q} paths.aux={output.model:q} paths.aux_metrics={output.metrics:q}"
        " > {log:q} 2>&1 && python -m trifle.models.curves {output.metrics:q} {output.curve:q} >> {log:q} 2>&1"


rule optimality:
    input:
        eval="results/eval/{task}/{method}/seed{seed}.json",
        eval_steps="results/eval/{task}/{method}/seed{seed}.steps.npz",
        aux_state="results/checkpoints/{task}/aux/state/seed{seed}.pt",
        aux_action="results/checkpoints/{task}/aux/action/seed{seed}.pt",
    output:
        "results/eval/{task}/{method}/seed{seed}.optimality.json",
    log:
        "logs/optimality/{task}/{method}/seed{seed}.log",
    params:
        cfg=stage_config("optimality"),
        code=code("optimality"),
        overrides=cli_overrides("optimality"),
        paths=path_overrides,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=hours(1),
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle optimality {params.overrides} threads={threads} {params.paths}"
        " paths.optimality={output:q} > {log:q} 2>&1"


rule optimality_table:
    input:
        optimality_files,
    output:
        csv="results/tables/optimality.csv",
        md="results/tables/optimality.md",
        html=report(
            "results/tables/optimality.html",
            caption="../report/optimality.rst",
            category="Results",
            labels={"table": "optimality"},
        ),
        figure=report(
            "results/figures/optimality.png",
            caption="../report/optimality_figure.rst",
            category="Results",
            labels={"figure": "optimality"},
        ),
    log:
        "logs/optimality_table.log",
    params:
        code=code("optimality_table"),
        report_code=report_code,
        runs=lambda wildcards: report_runs(sorted({path.split("/")[2] for path in optimality_files()}), aux=True),
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
        "python -m trifle optimality_table paths.optimality_files={params.files}"
        " paths.optimality_table={output.csv:q} paths.optimality_figure={output.figure:q} > {log:q} 2>&1"
        " && python -m trifle.evaluation.report_tables table {output.csv:q} --html {output.html:q}"
        " --notes {output.md:q} >> {log:q} 2>&1"
