# The Decision Transformer baseline and the evaluation of every method by batched rollouts.


rule train_dt:
    input:
        "data/labeled/{task}.npz",
    output:
        model="results/checkpoints/{task}/dt/seed{seed}.pt",
        metrics="results/checkpoints/{task}/dt/seed{seed}.metrics.json",
        # The training curve, one row per evaluation, from the metrics' history (trifle.models.curves).
        curve="results/checkpoints/{task}/dt/seed{seed}.curve.csv",
    log:
        "logs/train_dt/{task}/seed{seed}.log",
    params:
        cfg=stage_config("train_dt"),
        code=code("train_dt"),
        overrides=cli_overrides("train_dt"),
    priority: PRIORITY["train_dt"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(12),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle train_dt {params.overrides} threads={threads} paths.labeled={input:q} paths.dt={output.model:q}"
        " paths.dt_metrics={output.metrics:q} > {log:q} 2>&1"
        " && python -m trifle.models.curves {output.metrics:q} {output.curve:q} >> {log:q} 2>&1"


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        eval="results/eval/{task}/{method}/seed{seed}.json",
        # The reported episodes' executed states, actions and rewards (read by the optimality score).
        steps="results/eval/{task}/{method}/seed{seed}.steps.npz",
    log:
        "logs/evaluate/{task}/{method}/seed{seed}.log",
    params:
        cfg=stage_config("evaluate"),
        code=evaluate_code,
        overrides=cli_overrides("evaluate"),
        paths=path_overrides,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(4),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle evaluate {params.overrides} threads={threads} {params.paths} paths.eval={output.eval:q}"
        " paths.eval_steps={output.steps:q} > {log:q} 2>&1"
