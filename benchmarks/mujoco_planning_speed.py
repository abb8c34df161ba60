"""Planning time per environment step at the paper's Gym-MuJoCo scale (Hopper, HalfCheetah).

The MuJoCo evaluations are the expensive part of the reproduction, and their cost is set by the planner,
not by how well the models are trained. So this benchmark builds, in memory and in seconds, models of the
paper's *size* -- a randomly initialised GPT of ``trifle/conf/gpt/paper.yaml`` (4 layers, 4 heads, 128-d,
10-transition block, 100-token vocabulary) and an HCLT circuit over one transition (``pc/paper.yaml``'s 32
latents, fitted with a couple of EM steps on a small random-policy dataset) -- and times ``Policy.act``
of the released code's beam settings (``task.planning``: N = 32, H = 5, λ = 2, cdf_act 0.6, 5 context
transitions) on real ``VectorMujocoEnv`` episodes.

Variants, per environment and batch size: tt, trifle-s, tt-safe and trifle-s-safe with the KV cache, and
trifle-s scoring each action dimension's candidates as one evidence row each (the per-candidate reference
path, circuit_queries.PerCandidate) instead of in one circuit pass; at the ``--slow-batches`` sizes also tt
and trifle-s without the cache (TT's original recompute-everything search) and tt at horizon 15, whose
plans outrun the 10-transition block (TT-style cropping), with and without the cache. All variants of one
environment and batch run round-robin, so load from other jobs hits them alike. Writes the Markdown
report and, next to it, the rows as JSON.

    .venv/bin/python benchmarks/mujoco_planning_speed.py   # writes docs/benchmarks/mujoco_planning_speed.md
    .venv/bin/python benchmarks/mujoco_planning_speed.py --device cuda --steps 20 \
        --batches 1 8 64 --slow-batches 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.config import compose
from trifle.data.circuit_windows import circuit_num_cats, token_windows
from trifle.data.labels import label_trajectories
from trifle.data.mujoco_datasets import generate_mujoco_dataset
from trifle.data.tokens import TokenData, tokenize
from trifle.envs.mujoco import VectorMujocoEnv
from trifle.io import atomic_path
from trifle.models.circuits import PyjuiceCircuit, TorchCircuit, build_hclt, em_step, resolve_backend
from trifle.models.gpt import TrajectoryGPT
from trifle.models.gpt_training import model_config, resolve_config
from trifle.planning.circuit_queries import PerCandidate
from trifle.planning.planners import BeamPlanner, make_planner

REPO = Path(__file__).resolve().parents[1]
TASKS = {"hopper": "hopper-medium-v2", "halfcheetah": "halfcheetah-medium-v2"}


@dataclass(frozen=True)
class Variant:
    """One planner configuration: a ``trifle/conf/planner`` name, the KV cache switch, an optional horizon."""

    method: str
    use_cache: bool
    horizon: int | None = None  # None: the task's task.planning.horizon
    per_candidate: bool = False  # the circuit scores candidates one evidence row each (the reference)

    @property
    def name(self) -> str:
        """The method as the report shows it."""
        return f"{self.method} (per-candidate)" if self.per_candidate else self.method

    def label(self) -> str:
        return f"{self.name} cache={'on' if self.use_cache else 'off'} H={self.horizon or 'task'}"


def variants(long_horizon: int, slow: bool) -> list[Variant]:
    """The compared configurations; the first (tt with cache at the task's horizon) is the reference.

    ``slow`` adds the rows without the cache and at the long horizon: on a CPU one of their calls costs
    minutes at large batches, so by default they run at batch 1 only.
    """
    out = [Variant(m, True) for m in ("tt", "trifle-s", "tt-safe", "trifle-s-safe")]
    out.append(Variant("trifle-s", True, per_candidate=True))
    if slow:
        out += [Variant(m, False) for m in ("tt", "trifle-s")]
    if slow and long_horizon:
        out += [Variant("tt", True, long_horizon), Variant("tt", False, long_horizon)]
    return out


@dataclass
class Models:
    """What every planner of one environment shares: composed config, tokens, GPT and circuit."""

    cfg: dict[str, Any]
    data: TokenData
    gpt: TrajectoryGPT
    circuit: Any
    circuit_backend: str
    build_seconds: float


def make_tokens(cfg: dict[str, Any], num_steps: int) -> TokenData:
    """A random-policy dataset run through the data -> labels -> tokens stages (100 quantile bins)."""
    task = cfg["task"]
    arrays, attrs = generate_mujoco_dataset(env=task["env"], num_steps=num_steps, seed=0, progress=False)
    labels = task["labels"]
    labeled = label_trajectories(
        arrays, discount=labels["discount"], termination_penalty=labels["termination_penalty"], attrs=attrs
    )
    return tokenize(labeled, task["discretizer"])


def make_gpt(cfg: dict[str, Any], data: TokenData, device: str) -> TrajectoryGPT:
    """An untrained GPT of the configured size: planning cost depends on the shapes, not on the weights."""
    torch.manual_seed(0)
    mcfg = model_config(resolve_config(cfg["gpt"]), data.obs_dim, data.act_dim, data.vocab_size)
    return TrajectoryGPT(mcfg).to(device).eval()


def make_circuit(cfg: dict[str, Any], data: TokenData, em_steps: int, device: str, backend: str) -> Any:
    """HCLT over ``task.pc_window`` transitions, a few EM steps so its parameters are data-shaped.

    EM runs on the CPU TorchCircuit; on CUDA with the ``auto`` backend the fitted nodes are compiled with
    pyjuice, which is what the evaluate stage loads there.
    """
    window, pc = cfg["task"]["pc_window"], cfg["pc"]
    rows = token_windows(data, window=window, episode_ids=np.arange(len(data.episode_starts)))
    train = torch.from_numpy(rows)
    num_cats = circuit_num_cats(data.vocab_size, window)
    root_ns = build_hclt(train, num_cats=num_cats, num_latents=pc["num_latents"], seed=0)
    circuit = TorchCircuit.from_nodes(root_ns)
    batches = [train[i : i + pc["batch_size"]] for i in range(0, len(train), pc["batch_size"])]
    for _ in range(em_steps):
        em_step(circuit, batches, pseudocount=pc["pseudocount"])
    if backend == "pyjuice":
        circuit.write_to_nodes(root_ns)
        return PyjuiceCircuit(root_ns, device=device)
    return circuit.to(device)


def build_models(env: str, args: argparse.Namespace) -> Models:
    """Compose the task's config and build the shared models for ``env``."""
    start = time.perf_counter()
    cfg = compose([f"task={TASKS[env]}", "gpt=paper", "pc=paper"])
    data = make_tokens(cfg, args.data_steps)
    backend = resolve_backend(args.circuit_backend) if torch.device(args.device).type == "cuda" else "torch"
    circuit = make_circuit(cfg, data, args.em_steps, args.device, backend)
    gpt = make_gpt(cfg, data, args.device)
    return Models(cfg, data, gpt, circuit, backend, time.perf_counter() - start)


def make_variant_planner(models: Models, variant: Variant, device: str) -> BeamPlanner:
    """The planner the evaluate stage would build for this variant, from the in-memory models."""
    composed = compose([f"task={models.cfg['task']['name']}", f"planner={variant.method}"])["planner"]
    planner_cfg = {**composed, "use_cache": variant.use_cache}
    if variant.horizon is not None:
        planner_cfg["horizon"] = variant.horizon
    task = models.cfg["task"]
    return make_planner(
        planner_cfg,
        model=models.gpt,
        discretizer=models.data.discretizer,
        obs_dim=models.data.obs_dim,
        act_dim=models.data.act_dim,
        discount=task["labels"]["discount"],
        circuit=PerCandidate(models.circuit) if variant.per_candidate else models.circuit,
        circuit_window=task["pc_window"],
        constraint=task["action_constraint"],
        device=device,
    )


@dataclass
class Rollout:
    """One planner driving ``num_envs`` MuJoCo episodes; only its ``act`` calls are timed."""

    variant: Variant
    planner: BeamPlanner
    env: VectorMujocoEnv
    obs: np.ndarray = field(init=False)
    seconds: float = 0.0
    env_steps: int = 0
    calls: int = 0
    warm: bool = False

    def __post_init__(self) -> None:
        self.obs = self.env.reset()
        self.planner.reset(self.env.num_envs, seed=0)

    @property
    def alive(self) -> bool:
        return bool((~self.env.done).any())

    def step(self) -> None:
        """Plan and take one step for every running environment; the first call is an untimed warm-up."""
        ids = np.flatnonzero(~self.env.done)
        start = time.perf_counter()
        actions = np.asarray(self.planner.act(ids, self.obs[ids]), np.float64)
        elapsed = time.perf_counter() - start
        if self.warm:
            self.seconds += elapsed
            self.env_steps += len(ids)
            self.calls += 1
        self.warm = True
        full = np.zeros((self.env.num_envs, actions.shape[1]))
        full[ids] = actions
        self.obs, reward, *_ = self.env.step(full)
        self.planner.record(ids, actions, reward[ids])

    def wants_more(self, steps: int, budget_s: float) -> bool:
        """At least one timed call; then stop at ``steps`` calls or once ``budget_s`` seconds are spent."""
        if not self.alive:
            return False
        return not self.warm or self.calls == 0 or (self.calls < steps and self.seconds < budget_s)


def run_batch(models: Models, env: str, num_envs: int, args: argparse.Namespace) -> list[Rollout]:
    """Time every variant on ``num_envs`` environments of ``env``, round-robin, same episode seeds."""
    rollouts = [
        Rollout(v, make_variant_planner(models, v, args.device), VectorMujocoEnv(env, num_envs, seed=0))
        for v in variants(args.long_horizon, slow=num_envs in args.slow_batches)
    ]
    while any(r.wants_more(args.steps, args.budget_s) for r in rollouts):
        for r in rollouts:
            if r.wants_more(args.steps, args.budget_s):
                r.step()
    for r in rollouts:
        r.env.close()
        per_step = r.seconds / max(r.env_steps, 1)
        label = f"{env} batch={num_envs} {r.variant.label()}"
        print(f"{label:42s} calls={r.calls:<3d} {per_step:.3f} s/env-step")
    return rollouts


@dataclass(frozen=True)
class Row:
    """One measured configuration, reduced to what the report shows."""

    env: str
    variant: Variant
    horizon: int
    batch: int
    calls: int
    env_steps: int
    per_step: float
    ratio: float


def to_rows(env: str, batch: int, rollouts: Sequence[Rollout], task_horizon: int) -> list[Row]:
    """Seconds per environment step, and the ratio to this (env, batch)'s tt-with-cache reference."""
    per = [r.seconds / max(r.env_steps, 1) for r in rollouts]
    ref = per[0] or float("nan")  # 0 only if every episode ended before a timed call
    return [
        Row(env, r.variant, r.variant.horizon or task_horizon, batch, r.calls, r.env_steps, p, p / ref)
        for r, p in zip(rollouts, per, strict=True)
    ]


def _find(
    rows: Sequence[Row], method: str, cache: bool, horizon: int, per_candidate: bool = False
) -> list[Row]:
    return [
        r
        for r in rows
        if r.variant.method == method
        and r.variant.use_cache == cache
        and r.horizon == horizon
        and r.variant.per_candidate == per_candidate
    ]


def _span(values: Sequence[float], fmt: str) -> str:
    """'a' or 'a–b' for a range of numbers (over batch sizes, or environments and batch sizes)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _per_env(pairs: Sequence[tuple[str, float]], fmt: str = "{:.1f}") -> str:
    """'1.8–2.1× on hopper, 3.1× on halfcheetah': the environments differ more than the batch sizes do."""
    envs = list(dict.fromkeys(env for env, _ in pairs))
    return ", ".join(f"{_span([v for e, v in pairs if e == env], fmt)}× on {env}" for env in envs)


def _pairs(rows: Sequence[Row], a: tuple, b: tuple) -> list[tuple[str, float]]:
    """(env, ratio a / b of seconds per env step), matched on (env, batch)."""
    out = []
    for x in _find(rows, *a):
        y = [r for r in _find(rows, *b) if (r.env, r.batch) == (x.env, x.batch)]
        if y:
            out.append((x.env, x.per_step / y[0].per_step))
    return out


def findings(rows: Sequence[Row], plan: dict[str, Any], long_horizon: int, block: int) -> list[str]:
    """Findings computed from the measured numbers, per environment, ranges over batch sizes.

    ``plan`` is ``task.planning``; ``block`` the GPT's block in transitions (to say whether plans crop).
    """
    horizon = plan["horizon"]
    lines = []
    for method in ("tt", "trifle-s"):
        gain = _pairs(rows, (method, False, horizon), (method, True, horizon))
        if gain:
            lines.append(
                f"Speed-up of {method} from the KV cache over recomputing the sequence (H = {horizon}): "
                f"{_per_env(gain)}."
            )
    extra = _pairs(rows, ("trifle-s", True, horizon), ("tt", True, horizon))
    safe = _pairs(rows, ("trifle-s-safe", True, horizon), ("tt-safe", True, horizon))
    if extra:
        text = (
            f"Cost of trifle-s's circuit correction, trifle-s / tt planning time: {_per_env(extra, '{:.2f}')}"
        )
        lines.append(text + (f"; trifle-s-safe / tt-safe: {_per_env(safe, '{:.2f}')}." if safe else "."))
    reference = _pairs(rows, ("trifle-s", True, horizon, True), ("tt", True, horizon))
    one_pass = _pairs(rows, ("trifle-s", True, horizon, True), ("trifle-s", True, horizon))
    if reference and one_pass:
        lines.append(
            "The same with the per-candidate scores (one circuit evidence row per candidate, the reference "
            f"path): {_per_env(reference, '{:.2f}')}; speed-up of trifle-s from the one-pass scores, "
            f"per-candidate / one-pass planning time: {_per_env(one_pass, '{:.2f}')}."
        )
    batches = sorted({r.batch for r in rows})
    if len(batches) > 1:
        small = _find([r for r in rows if r.batch == batches[0]], "tt", True, horizon)
        big = _find([r for r in rows if r.batch == batches[-1]], "tt", True, horizon)
        ratio = [(b.env, b.per_step / s.per_step) for s in small for b in big if s.env == b.env]
        lines.append(
            f"Batching, tt's time per environment step at batch {batches[-1]} / at batch {batches[0]}: "
            f"{_per_env(ratio, '{:.2f}')}."
        )
    if long_horizon:
        longer = _pairs(rows, ("tt", True, long_horizon), ("tt", True, horizon))
        gain = _pairs(rows, ("tt", False, long_horizon), ("tt", True, long_horizon))
        if longer and gain:
            span = plan["max_context_transitions"] + long_horizon
            crop = "cropped to" if span > block else "within"
            lines.append(
                f"Long plans ({plan['max_context_transitions']} context + {long_horizon} planned = {span} "
                f"transitions, {crop} the {block}-transition block), tt with the cache at H = {long_horizon} "
                f"/ at H = {horizon}: {_per_env(longer)}; speed-up from the cache at H = {long_horizon}: "
                f"{_per_env(gain)}."
            )
    for env in list(dict.fromkeys(r.env for r in rows)):
        batch = max(r.batch for r in rows if r.env == env)
        cached = [
            r
            for r in rows
            if (r.env, r.batch, r.horizon) == (env, batch, horizon)
            and r.variant.use_cache
            and not r.variant.per_candidate
        ]
        fast, slow = min(cached, key=lambda r: r.per_step), max(cached, key=lambda r: r.per_step)
        lines.append(
            f"{env}: one 1000-step episode needs {1000 * fast.per_step / 60:.0f} ({fast.variant.name}) to "
            f"{1000 * slow.per_step / 60:.0f} ({slow.variant.name}) minutes of planning per environment "
            f"at batch {batch} with the cache."
        )
    return [f"- {line}" for line in lines]


def render(
    rows: Sequence[Row], args: argparse.Namespace, models: dict[str, Models], load_start: float, wall_s: float
) -> str:
    """The Markdown report: machine (with the load around the run, since others share it), settings, table."""
    any_models = next(iter(models.values()))
    plan, gpt = any_models.cfg["task"]["planning"], any_models.gpt.cfg
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    lines = [
        "# MuJoCo planning speed (benchmarks/mujoco_planning_speed.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
        f"torch {torch.__version__}, {args.threads} torch thread(s). 1-minute load average {load_start:.1f} "
        f"at the start and {os.getloadavg()[0]:.1f} at the end of the {wall_s / 60:.1f}-minute run "
        "(a shared machine: treat the numbers as ±30%).",
        "",
        f"Planner: the released code's MuJoCo settings (`task.planning`): N = {plan['beam_width']}, "
        f"H = {plan['horizon']}, λ = {plan['expansion_factor']}, cdf_act {plan['cdf_act']}, k_obs "
        f"{plan['k_obs']}, {plan['max_context_transitions']} context transitions, top_ratio "
        f"{plan['top_ratio']}; safe variants use the task's `action_constraint`. "
        f"H = {args.long_horizon} rows override the horizon only.",
        f"GPT: randomly initialised, `gpt/paper.yaml` size ({gpt.n_layer} layers, {gpt.n_head} heads, "
        f"{gpt.n_embd}-d, block {gpt.block_size // gpt.transition_dim} transitions, "
        f"vocabulary {gpt.vocab_size}). "
        f"Circuit: HCLT over one transition, {any_models.cfg['pc']['num_latents']} latents, "
        f"{circuit_num_cats(gpt.vocab_size, 1)} categories, {args.em_steps} EM steps on {args.data_steps} "
        f"random-policy steps ({any_models.circuit_backend} backend). The models are untrained on purpose: "
        "planning time depends on the model shapes and the search settings, not on training quality.",
        f"Timing: `Policy.act` only, on real `VectorMujocoEnv` episodes (seed 0), after 1 untimed warm-up "
        f"step; up to {args.steps} timed steps per row, fewer once a row has spent {args.budget_s:g} s "
        f"(the `steps` column); all rows of one environment and batch run round-robin. The no-cache and "
        f"H = {args.long_horizon} rows run at batch {', '.join(map(str, args.slow_batches))} only "
        f"(`--slow-batches`). The context fills up over the first {plan['max_context_transitions']} steps, "
        "so short runs sit slightly below the steady-state cost. "
        "s / env step = planning seconds / environment steps; ratio = that / tt with cache at "
        f"H = {plan['horizon']} (same environment and batch).",
        "",
        "| env | method | KV cache | H | batch | steps | s / env step | ratio vs tt (cache) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.env} | {r.variant.name} | {'yes' if r.variant.use_cache else 'no'} | {r.horizon} | "
            f"{r.batch} | {r.calls} | {r.per_step:.3f} | {r.ratio:.2f} |"
        )
    lines += ["", "Findings (computed from the table):", ""]
    lines += findings(rows, plan, args.long_horizon, gpt.block_size // gpt.transition_dim)
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="environments per act call")
    parser.add_argument(
        "--slow-batches",
        nargs="+",
        type=int,
        default=[1],
        help="batch sizes that also time the no-cache and long-horizon rows",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed environment steps per row (at most)")
    parser.add_argument(
        "--budget-s", type=float, default=8.0, help="stop timing a row after this many seconds"
    )
    parser.add_argument("--long-horizon", type=int, default=15, help="0 skips the long-horizon rows")
    parser.add_argument("--data-steps", type=int, default=5000, help="random-policy steps for tokens/circuit")
    parser.add_argument("--em-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--circuit-backend", default="auto", choices=["auto", "torch", "pyjuice"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "benchmarks" / "mujoco_planning_speed.md",
        help="the Markdown report; the JSON rows go next to it (.json)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    rows: list[Row] = []
    models: dict[str, Models] = {}
    for env in args.envs:
        models[env] = build_models(env, args)
        print(f"{env}: models built in {models[env].build_seconds:.1f} s")
        horizon = models[env].cfg["task"]["planning"]["horizon"]
        for batch in args.batches:
            rows += to_rows(env, batch, run_batch(models[env], env, batch, args), horizon)
    wall_s = time.perf_counter() - start
    report = render(rows, args, models, load_start, wall_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(report)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(to_json(rows, args, load_start, wall_s), indent=1) + "\n")
    print(report)


def to_json(rows: Sequence[Row], args: argparse.Namespace, load_start: float, wall_s: float) -> dict:
    """The measured rows and the run's conditions, for reading the ratios without parsing Markdown."""
    return {
        "device": args.device,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_s": wall_s,
        "rows": [
            {
                "env": r.env,
                "method": r.variant.method,
                "per_candidate": r.variant.per_candidate,
                "kv_cache": r.variant.use_cache,
                "horizon": r.horizon,
                "batch": r.batch,
                "steps": r.calls,
                "env_steps": r.env_steps,
                "s_per_env_step": r.per_step,
                "ratio_vs_tt": r.ratio,
            }
            for r in rows
        ],
    }


if __name__ == "__main__":
    main()
