# Ablation studies (workflow config `ablations:`): methods evaluated with one planner setting varied,
# each study tabulated with its figure (docs/evaluation.md#ablations). The models are the task's own:
# an ablation only adds evaluations. Config checks and helpers: common.smk.


rule evaluate_ablation:
    input:
        unpack(evaluation_inputs),
    output:
        eval="results/eval/ablations/{study}/{task}/{method}/{value}/seed{seed}.json",
        steps="results/eval/ablations/{study}/{task}/{method}/{value}/seed{seed}.steps.npz",
    log:
        "logs/ablations/{study}/{task}/{method}/{value}/seed{seed}.log",
    params:
        cfg=lambda wildcards: stage_slice(compose(ablation_overrides(wildcards)), "evaluate"),
        code=evaluate_code,
        overrides=lambda wildcards: " ".join(
            shlex.quote(o) for o in stage_overrides(ablation_overrides(wildcards), "evaluate")
        ),
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


rule ablation_table:
    input:
        ablation_files,
    output:
        csv="results/tables/ablation_{study}.csv",
        md="results/tables/ablation_{study}.md",
        html=report(
            "results/tables/ablation_{study}.html",
            caption="../report/ablation.rst",
            category="Ablations",
            labels={"study": "{study}", "view": "table"},
        ),
        figure=report(
            "results/figures/ablation_{study}.png",
            caption="../report/ablation.rst",
            category="Ablations",
            labels={"study": "{study}", "view": "figure"},
        ),
    log:
        "logs/ablation_table/{study}.log",
    params:
        code=code("ablation_table"),
        report_code=report_code,
        runs=lambda wildcards: report_runs(ABLATIONS[wildcards.study]["tasks"]),
        methods=method_registry,
        setting=lambda wildcards: ABLATIONS[wildcards.study]["setting"],
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
        "python -m trifle ablation_table ablation.study={wildcards.study} ablation.setting={params.setting}"
        " paths.eval_files={params.files} paths.ablation_table={output.csv:q}"
        " paths.ablation_figure={output.figure:q} > {log:q} 2>&1"
        " && python -m trifle.evaluation.report_tables table {output.csv:q} --html {output.html:q}"
        " --notes {output.md:q} >> {log:q} 2>&1"
