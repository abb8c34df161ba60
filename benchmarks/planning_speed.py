"""Planning speed of tt, trifle-s and trifle-m, with and without the GPT's KV cache, on stochastic Taxi.

Builds one small GPT and one K = 7 circuit on generated Taxi data with the project's own functions
(kept under ``--cache-dir`` and reused by later runs), then times ``Policy.act`` for a batch of
environments stepping through real episodes. Every configuration replays the same environment seed.
The training budgets are tiny on purpose: the point is the cost of planning on a fixed model, not
the quality of the plans.

    .venv/bin/python benchmarks/planning_speed.py            # writes docs/benchmarks/planning_speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trifle.config import compose
from trifle.data.circuit_windows import circuit_num_cats, token_windows
from trifle.data.labels import label_trajectories
from trifle.data.tokens import load_tokens, save_tokens, tokenize
from trifle.data.toy_datasets import generate_taxi_dataset
from trifle.data.windows import split_episodes
from trifle.envs import VectorTabularEnv, make_mdp
from trifle.models.circuits import train_circuit
from trifle.models.gpt_training import SMALL_CONFIG, train_gpt
from trifle.planning.planners import build_planner

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "trifle" / "conf"
METHODS = ("tt", "trifle-s", "trifle-m")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def build_models(cache: Path, gpt_steps: int, pc_epochs: int) -> tuple[Path, Path, Path, int, float]:
    """Tokens, GPT and circuit for Taxi (created once, then reused)."""
    task = _yaml(CONF / "task" / "taxi-stochastic.yaml")
    window, discount = task["pc_window"], task["labels"]["discount"]
    tokens_path, gpt_path, pc_path = cache / "tokens.npz", cache / "gpt.pt", cache / "pc.jpc"
    if not tokens_path.is_file():
        params = {k: v for k, v in task["dataset"].items() if k != "generator"}
        arrays, attrs = generate_taxi_dataset(**params, progress=False)
        labeled = label_trajectories(arrays, discount=discount, termination_penalty=None, attrs=attrs)
        data = tokenize(
            labeled,
            task["discretizer"],
            obs_cardinalities=attrs["obs_cardinalities"],
            num_actions=attrs["num_actions"],
        )
        save_tokens(tokens_path, data)
    data = load_tokens(tokens_path)
    if not gpt_path.is_file():
        cfg = {
            **SMALL_CONFIG,
            **_yaml(CONF / "gpt" / "small.yaml"),
            "steps": gpt_steps,
            "eval_every": gpt_steps,
        }
        train_gpt(
            cfg,
            tokens=data.tokens,
            episode_starts=data.episode_starts,
            episode_terminal=data.episode_terminal,
            obs_dim=data.obs_dim,
            act_dim=data.act_dim,
            vocab_size=data.vocab_size,
            seed=0,
            out_path=gpt_path,
            progress=False,
        )
    if not pc_path.is_file():
        pc = _yaml(CONF / "pc" / "small.yaml")
        train_ids, valid_ids = split_episodes(data.episode_starts, len(data.tokens), pc["valid_fraction"], 0)

        def windows(ids):
            rows = token_windows(data, window=window, episode_ids=ids)
            return torch.from_numpy(rows)

        train_circuit(
            windows(train_ids),
            windows(valid_ids),
            num_cats=circuit_num_cats(data.vocab_size, window),
            num_latents=pc["num_latents"],
            epochs=pc_epochs,
            batch_size=pc["batch_size"],
            pseudocount=pc["pseudocount"],
            seed=0,
            out_path=pc_path,
            backend="torch",
            progress=False,
        )
    return tokens_path, gpt_path, pc_path, window, discount


class Rollout:
    """One planner driving ``num_envs`` Taxi episodes; ``step`` times one batched ``act`` call."""

    def __init__(self, planner, num_envs: int, seed: int):
        self.planner, self.env = planner, VectorTabularEnv(make_mdp("taxi-stochastic"), num_envs, seed)
        self.obs = self.env.reset()
        planner.reset(num_envs, seed)
        self.times: list[float] = []

    def step(self) -> None:
        ids = np.flatnonzero(~self.env.done)
        start = time.perf_counter()
        actions = self.planner.act(ids, self.obs[ids])
        self.times.append(time.perf_counter() - start)
        full = np.zeros(self.env.num_envs, np.int64)
        full[ids] = actions[:, 0].astype(np.int64)
        self.obs, reward, *_ = self.env.step(full)
        self.planner.record(ids, actions, reward[ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="environment steps timed per configuration")
    parser.add_argument("--gpt-steps", type=int, default=400)
    parser.add_argument("--pc-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "planning-speed")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "planning_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tokens_path, gpt_path, pc_path, window, discount = build_models(
        args.cache_dir, args.gpt_steps, args.pc_epochs
    )
    tokens = load_tokens(tokens_path)
    rollouts = {}
    for method in METHODS:
        for use_cache in (True, False):
            composed = compose(["task=taxi-stochastic", f"planner={method}"])["planner"]
            cfg = {**composed, "use_cache": use_cache}
            planner = build_planner(
                cfg,
                gpt_path=str(gpt_path),
                circuit_path=str(pc_path),
                tokens=tokens,
                circuit_window=window,
                discount=discount,
            )
            rollouts[method, use_cache] = Rollout(planner, args.envs, seed=0)
    # Round robin over the configurations, so load from other jobs on the machine hits all of them alike.
    for _ in range(args.steps):
        for rollout in rollouts.values():
            rollout.step()
    rows = [(method, use_cache, r.times) for (method, use_cache), r in rollouts.items()]
    for method, use_cache, times in rows:
        print(f"{method:9s} cache={use_cache!s:5s} act seconds: {' '.join(f'{t:.2f}' for t in times)}")
    report = render(rows, args, cfg, planner, window)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def render(rows, args, cfg: dict, planner, window: int) -> str:
    """The markdown report: setup, then one row per (method, cache) with per-call and per-env seconds."""
    gpt = planner.model.cfg
    lines = [
        "# Planning speed (benchmarks/planning_speed.py)",
        "",
        f"Stochastic Taxi, {args.envs} environments planned together per `act` call, {args.steps} environment "
        f"steps per configuration, run round-robin (median over the calls; the first call has no context yet).",
        f"Planner configs: `trifle/conf/planner/*.yaml` (beam width {cfg['beam_width']}, horizon {cfg['horizon']}, "
        f"expansion {cfg['expansion_factor']}, context {cfg['max_context_transitions']} transitions).",
        f"GPT: {gpt.n_layer} layers, {gpt.n_head} heads, {gpt.n_embd}-d, block {gpt.block_size} tokens "
        f"({args.gpt_steps} training steps). Circuit: HCLT over a K = {window} window "
        f"({window * (gpt.obs_dim + gpt.act_dim + 2)} variables), `TorchCircuit` float32 ({args.pc_epochs} EM epochs).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} torch thread(s), CPU; load average "
        f"{os.getloadavg()[0]:.1f} when the run ended (the machine is shared: treat the numbers as ±30%).",
        "",
        "| method | KV cache | s per `act` (batch) | ms per environment step | min–max s per `act` |",
        "|---|---|---|---|---|",
    ]
    for method, use_cache, times in rows:
        med = float(np.median(times))
        lines.append(
            f"| {method} | {'yes' if use_cache else 'no'} | {med:.3f} | {1000 * med / args.envs:.1f} | "
            f"{min(times):.3f}–{max(times):.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
