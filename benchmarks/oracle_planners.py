"""Returns of tt, trifle-s and trifle-m on the toy tasks with exact "oracle" models of their datasets.

The oracle GPT and circuit (trifle.models.oracle) are the dataset's own empirical distributions, so
these numbers measure the planners' semantics apart from learning: what each method does with
perfectly trained models of this data. Each task's dataset is generated with the project's functions
(the data, labels and tokens stages), the planner settings are the task's composed Hydra config
(``trifle/conf``; ``--override planner.cdf_act=0.6`` etc. change them), and every method is rolled
out on the same episodes (same evaluation seed: common random numbers). Given checkpoints
(``--learned``), the learned GPT and circuit are evaluated in the same run on the same episodes.

    .venv/bin/python benchmarks/oracle_planners.py                      # 200 episodes per method
    .venv/bin/python benchmarks/oracle_planners.py --episodes 50 --override planner.value_threshold=cdf
    .venv/bin/python benchmarks/oracle_planners.py --learned taxi-stochastic \\
        results/checkpoints/taxi-stochastic/gpt/seed0.pt results/checkpoints/taxi-stochastic/pc/seed0.jpc

Writes ``docs/benchmarks/oracle_planners.md`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.config import compose
from trifle.data.tokens import load_tokens
from trifle.data.toy_datasets import toy_task_tokens
from trifle.envs import evaluate_policy as exact_policy_evaluation
from trifle.envs import make_mdp
from trifle.envs.tabular import greedy_policy, value_iteration
from trifle.evaluation.rollout import env_factory, evaluate_policy
from trifle.models.oracle import EmpiricalCircuit, TabularGPT
from trifle.planning.planners import build_planner, make_planner

REPO = Path(__file__).resolve().parents[1]
TASKS = ("taxi-stochastic", "frozenlake-eps0.5")
METHODS = ("tt", "trifle-s", "trifle-m")


def optimal_return(task: dict[str, Any]) -> float:
    """Exact expected (undiscounted) return of the optimal policy (value iteration, the task's gamma)."""
    mdp = make_mdp(task["env"])
    q, _ = value_iteration(mdp, task["labels"]["discount"])
    return float(exact_policy_evaluation(mdp, greedy_policy(q)).expected_return)


def planner_config(task: str, method: str, overrides: list[str]) -> dict[str, Any]:
    """The composed config of a method; ``planner.*`` overrides the method does not have are skipped."""
    base = compose([f"task={task}", f"planner={method}"])
    keep = []
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key.startswith("planner.") and key.split(".", 1)[1] not in base["planner"]:
            continue
        keep.append(item)
    return compose([f"task={task}", f"planner={method}", *keep])


def run_method(cfg: dict[str, Any], policy, args) -> dict[str, Any]:
    started = time.perf_counter()
    results = evaluate_policy(
        policy,
        env_factory(cfg),
        episodes=args.episodes,
        batch_episodes=args.batch_episodes,
        seed=args.seed,
        progress=False,
        name=cfg["task"]["name"],
    )
    returns = np.asarray(results.returns, np.float64)
    return {
        "episodes": len(returns),
        "return_mean": float(returns.mean()),
        "return_sem": float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else 0.0,
        "success_rate": float(np.mean(results.successes)),
        "penalty_mean": float(np.mean(results.penalties)),
        "steps_mean": float(np.mean(results.steps)),
        "step_seconds": results.step_seconds,
        "seconds": time.perf_counter() - started,
        "returns": returns.tolist(),
    }


def run_task(task_name: str, args, learned: dict[str, list[str]]) -> dict[str, Any]:
    task_overrides = [o for o in args.override if o.partition("=")[0].lstrip("+~").startswith("task.")]
    dataset_seed = [] if args.dataset_seed is None else [f"task.dataset.seed={args.dataset_seed}"]
    task = compose([f"task={task_name}", *dataset_seed, *task_overrides])["task"]
    started = time.perf_counter()
    data, data_mean = toy_task_tokens(task)
    gpt = TabularGPT.from_tokens(data, smoothing=args.smoothing)
    circuit = EmpiricalCircuit.from_tokens(data, window=task["pc_window"])
    build_seconds = time.perf_counter() - started
    print(
        f"{task_name}: {len(data.tokens)} transitions, data mean return {data_mean:.3f} ({build_seconds:.1f} s)"
    )
    rows = []
    for method in args.methods:
        cfg = planner_config(task_name, method, [*dataset_seed, *args.override])
        discount, window = cfg["task"]["labels"]["discount"], cfg["task"]["pc_window"]
        policy = make_planner(
            cfg["planner"],
            model=gpt,
            discretizer=data.discretizer,
            obs_dim=data.obs_dim,
            act_dim=data.act_dim,
            discount=discount,
            circuit=circuit,
            circuit_window=window,
            constraint=cfg["task"]["action_constraint"],
        )
        circuit.backoffs = 0
        row = {"method": cfg["planner"]["name"], "models": "oracle", **run_method(cfg, policy, args)}
        row["circuit_backoffs"] = circuit.backoffs
        row["planner"] = cfg["planner"]
        rows.append(row)
        print(_line(row))
        if task_name in learned:
            gpt_path, pc_path, *rest = learned[task_name]
            tokens = load_tokens(rest[0]) if rest else data
            policy = build_planner(
                cfg["planner"],
                gpt_path=gpt_path,
                circuit_path=pc_path if method != "tt" else None,
                tokens=tokens,
                circuit_window=window,
                discount=discount,
                constraint=cfg["task"]["action_constraint"],
            )
            row = {"method": cfg["planner"]["name"], "models": "learned", **run_method(cfg, policy, args)}
            row["planner"] = cfg["planner"]
            row["checkpoints"] = learned[task_name]
            rows.append(row)
            print(_line(row))
    return {
        "task": task_name,
        "dataset": task["dataset"],
        "transitions": len(data.tokens),
        "data_mean_return": data_mean,
        "optimal_return": optimal_return(task),
        "pc_window": task["pc_window"],
        "circuit_windows": circuit.num_windows,
        "results": rows,
    }


def _line(row: dict[str, Any]) -> str:
    return (
        f"  {row['method']:9s} {row['models']:7s} return {row['return_mean']:9.3f} ± {row['return_sem']:.3f}  "
        f"success {row['success_rate']:.2f}  ({row['seconds']:.1f} s)"
    )


def render(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        "# Planners with exact oracle models (benchmarks/oracle_planners.py)",
        "",
        "The GPT and the circuit are replaced by the dataset's own empirical distributions "
        "(`trifle.models.oracle`: `TabularGPT`, next-token counts given the current and previous "
        "transition; `EmpiricalCircuit`, the circuit's K-transition training windows), so the numbers "
        "measure each planner's semantics apart from learning.",
        f"{setup['episodes']} episodes per method (batches of {setup['batch_episodes']}, evaluation seed "
        f"{setup['seed']}: every method sees the same episodes); planner settings: the task's composed "
        f"config{' with overrides `' + ' '.join(setup['overrides']) + '`' if setup['overrides'] else ''}; "
        f"GPT smoothing {setup['smoothing']:g}. ± is the standard error over episodes.",
        f"Machine: {setup['machine']}; {setup['seconds']:.0f} s in all.",
        "",
        "| task | method | models | return | ± | success rate | illegal actions / episode | steps | "
        "data mean return | optimal policy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in report["tasks"]:
        for row in task["results"]:
            lines.append(
                f"| {task['task']} | {row['method']} | {row['models']} | {row['return_mean']:.3f} | "
                f"{row['return_sem']:.3f} | {row['success_rate']:.2f} | {row['penalty_mean']:.2f} | "
                f"{row['steps_mean']:.1f} | {task['data_mean_return']:.3f} | {task['optimal_return']:.3f} |"
            )
    lines += [
        "",
        "Datasets: "
        + "; ".join(
            f"{t['task']}: {json.dumps(t['dataset'])}, {t['transitions']} transitions, circuit window K = "
            f"{t['pc_window']} ({t['circuit_windows']} windows)"
            for t in report["tasks"]
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="planner configs (not dt)")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--batch-episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed")
    parser.add_argument(
        "--dataset-seed", type=int, default=None, help="task.dataset.seed (default: the task's)"
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="Hydra overrides, e.g. planner.cdf_act=0.6 task.planning.beam_width=16 (a planner.* key a "
        "method does not have is skipped for it)",
    )
    parser.add_argument("--smoothing", type=float, default=1e-6, help="TabularGPT additive smoothing")
    parser.add_argument(
        "--learned",
        nargs="+",
        action="append",
        default=[],
        metavar="ARG",
        help="TASK GPT.pt PC.jpc [TOKENS.npz]: also evaluate trained checkpoints (tokens: the file they "
        "were trained on; default: this run's generated tokens, which must have the same vocabulary)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "oracle_planners.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learned = {}
    for item in args.learned:
        if len(item) not in (3, 4):
            parser.error("--learned takes TASK GPT.pt PC.jpc [TOKENS.npz]")
        learned[item[0]] = item[1:]
    started = time.perf_counter()
    tasks = [run_task(name, args, learned) for name in args.tasks]
    report = {
        "setup": {
            "episodes": args.episodes,
            "batch_episodes": args.batch_episodes,
            "seed": args.seed,
            "dataset_seed": args.dataset_seed,
            "overrides": args.override,
            "smoothing": args.smoothing,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {args.threads} thread(s)",
            "seconds": time.perf_counter() - started,
        },
        "tasks": tasks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
