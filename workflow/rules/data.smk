# Raw dataset -> labeled trajectories -> tokens with their fitted discretizer.


rule dataset:
    output:
        "data/raw/{task}.hdf5",
    log:
        "logs/dataset/{task}.log",
    params:
        cfg=stage_config("data"),
        code=code("data"),
        overrides=cli_overrides("data"),
    priority: PRIORITY["dataset"]
    threads: 1
    resources:
        # A D4RL download (up to 475 MB) or a behaviour policy's training (SAC: ~20 min per 100k steps).
        mem_mb=4000,
        runtime=hours(2),
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle data {params.overrides} threads={threads} paths.raw={output:q} > {log:q} 2>&1"


rule labels:
    input:
        "data/raw/{task}.hdf5",
    output:
        "data/labeled/{task}.npz",
    log:
        "logs/labels/{task}.log",
    params:
        cfg=stage_config("labels"),
        code=code("labels"),
        overrides=cli_overrides("labels"),
    priority: PRIORITY["labels"]
    threads: 1
    resources:
        mem_mb=4000,
        runtime=hours(0.5),
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle labels {params.overrides} threads={threads} paths.raw={input:q} paths.labeled={output:q} > {log:q} 2>&1"


rule tokens:
    input:
        "data/labeled/{task}.npz",
    output:
        "data/tokens/{task}.npz",
    log:
        "logs/tokens/{task}.log",
    params:
        cfg=stage_config("tokens"),
        code=code("tokens"),
        overrides=cli_overrides("tokens"),
    priority: PRIORITY["tokens"]
    threads: 1
    resources:
        mem_mb=4000,
        runtime=hours(0.5),
        gpu=0,
    conda:
        "../envs/trifle.yaml"
    shell:
        "python -m trifle tokens {params.overrides} threads={threads} paths.labeled={input:q} paths.tokens={output:q} > {log:q} 2>&1"
