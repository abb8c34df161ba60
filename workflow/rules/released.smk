# `protocol: pretrained`: a task's GPT and circuit are the released ones (Trajectory Transformer's GPT, the
# Trifle authors' circuit), imported once per task from data/released/ and planned with every seed
# (docs/workflow.md#released-models). The task's tokens use TT's bins (PROTOCOL_OVERRIDES).


rule import_gpt:
    input:
        released=lambda wildcards: released_sources(wildcards.task)["gpt"],
        tokens="data/tokens/{task}.npz",
    output:
        model="results/checkpoints/{task}/gpt/released.pt",
        metrics="results/checkpoints/{task}/gpt/released.metrics.json",
    log:
        "logs/import_gpt/{task}.log",
    params:
        cfg=stage_config("import_gpt"),
        code=code("import_gpt"),
        overrides=cli_overrides("import_gpt"),
        directory=lambda wildcards, input: os.path.dirname(input.released[0]),
    priority: PRIORITY["import_gpt"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(1),
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle import_gpt {params.overrides} threads={threads} paths.released_gpt={params.directory:q}"
        " paths.tokens={input.tokens:q} paths.gpt={output.model:q} paths.gpt_metrics={output.metrics:q} > {log:q} 2>&1"


rule import_pc:
    input:
        released=lambda wildcards: released_sources(wildcards.task)["pc"],
        tokens="data/tokens/{task}.npz",
    output:
        model="results/checkpoints/{task}/pc/released.jpc",
        metrics="results/checkpoints/{task}/pc/released.metrics.json",
        # Where the circuit came from (path, sha256, format) and the layout it was checked against.
        source="results/checkpoints/{task}/pc/released.source.json",
    log:
        "logs/import_pc/{task}.log",
    params:
        cfg=stage_config("import_pc"),
        code=code("import_pc"),
        overrides=cli_overrides("import_pc"),
    priority: PRIORITY["import_pc"]
    threads: 1
    resources:
        mem_mb=8000,
        runtime=hours(1),
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle import_pc {params.overrides} threads={threads} paths.released_pc={input.released:q}"
        " paths.tokens={input.tokens:q} paths.pc={output.model:q} paths.pc_metrics={output.metrics:q} > {log:q} 2>&1"
