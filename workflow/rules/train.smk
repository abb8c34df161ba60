# One GPT and one circuit per task and seed, both trained on the same token file; an IQL critic (TT(+Q))
# per task and seed on the labeled transitions, where a configured method needs it.


rule train_gpt:
    input:
        "data/tokens/{task}.npz",
    output:
        model="results/checkpoints/{task}/gpt/seed{seed}.pt",
        metrics="results/checkpoints/{task}/gpt/seed{seed}.metrics.json",
        # The training curve, one row per evaluation, from the metrics' history (trifle.models.curves).
        curve="results/checkpoints/{task}/gpt/seed{seed}.curve.csv",
    log:
        "logs/train_gpt/{task}/seed{seed}.log",
    params:
        cfg=stage_config("train_gpt"),
        code=code("train_gpt"),
        overrides=cli_overrides("train_gpt"),
    priority: PRIORITY["train_gpt"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(12),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle train_gpt {params.overrides} threads={threads} paths.tokens={input:q} paths.gpt={output.model:q}"
        " paths.gpt_metrics={output.metrics:q} > {log:q} 2>&1"
        " && python -m trifle.models.curves {output.metrics:q} {output.curve:q} >> {log:q} 2>&1"


rule train_pc:
    input:
        "data/tokens/{task}.npz",
    output:
        model="results/checkpoints/{task}/pc/seed{seed}.jpc",
        metrics="results/checkpoints/{task}/pc/seed{seed}.metrics.json",
        # The training curve, one row per evaluation, from the metrics' history (trifle.models.curves).
        curve="results/checkpoints/{task}/pc/seed{seed}.curve.csv",
    log:
        "logs/train_pc/{task}/seed{seed}.log",
    params:
        cfg=stage_config("train_pc"),
        code=code("train_pc"),
        overrides=cli_overrides("train_pc"),
    priority: PRIORITY["train_pc"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(4),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle train_pc {params.overrides} threads={threads} paths.tokens={input:q} paths.pc={output.model:q}"
        " paths.pc_metrics={output.metrics:q} > {log:q} 2>&1"
        " && python -m trifle.models.curves {output.metrics:q} {output.curve:q} >> {log:q} 2>&1"


rule train_critic:
    input:
        "data/labeled/{task}.npz",
    output:
        model="results/checkpoints/{task}/critic/seed{seed}.pt",
        metrics="results/checkpoints/{task}/critic/seed{seed}.metrics.json",
        # The training curve, one row per evaluation, from the metrics' history (trifle.models.curves).
        curve="results/checkpoints/{task}/critic/seed{seed}.curve.csv",
    log:
        "logs/train_critic/{task}/seed{seed}.log",
    params:
        cfg=stage_config("train_critic"),
        code=code("train_critic"),
        overrides=cli_overrides("train_critic"),
    priority: PRIORITY["train_critic"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(12),
        gpu=training_gpus,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle train_critic {params.overrides} threads={threads} paths.labeled={input:q} paths.critic={output.model:q}"
        " paths.critic_metrics={output.metrics:q} > {log:q} 2>&1"
        " && python -m trifle.models.curves {output.metrics:q} {output.curve:q} >> {log:q} 2>&1"
