"""GPU timings at the paper's Gym-MuJoCo scale: one GPT epoch, one circuit EM epoch, planning per env step.

A GPU session has only minutes of device time, so nothing here runs a whole epoch. Each training
measurement times a fixed number of the project's own optimizer steps (GPT) or EM mini-batches (circuit)
after a few untimed warm-up ones, and scales that to a full epoch; the report prints both, labelled
"measured" and "extrapolated". Planning reuses ``benchmarks/mujoco_planning_speed.py``'s model and
rollout helpers (tt and trifle-s with the KV cache, the released N = 32, H = 5 settings).

Data are synthetic: uniformly random tokens (100 bins per column) shaped like a D4RL "medium" dataset
(1M transitions in 1000-step episodes) for Hopper (obs 11, act 3) and HalfCheetah (obs 17, act 6).
Training and EM cost depend on the shapes (windows, tokens, batch, model and circuit size), not on the
values, so the timings hold for the real datasets. Models are untrained for the same reason.

    python benchmarks/gpu_timings.py --device cuda --out $OUT/gpu_timings.md    # H200, a few minutes
    python benchmarks/gpu_timings.py --smoke --device cpu --out /tmp/gpu_timings_smoke.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trifle.config import compose
from trifle.data.circuit_windows import circuit_num_cats
from trifle.data.windows import TransitionWindows
from trifle.devices import resolve_device
from trifle.io import atomic_path
from trifle.models.circuits import TorchCircuit, build_hclt, em_step, resolve_backend
from trifle.models.circuits.training import pyjuice_epoch
from trifle.models.gpt import TrajectoryGPT
from trifle.models.gpt_training import make_optimizer, model_config, resolve_config, train_step
from trifle.models.training_common import batch_indices, derived_seed, learning_rate
from trifle.planning.methods import method

REPO = Path(__file__).resolve().parents[1]
ENVS = {"hopper": (11, 3), "halfcheetah": (17, 6)}  # (obs_dim, act_dim)
TASKS = {"hopper": "hopper-medium-v2", "halfcheetah": "halfcheetah-medium-v2"}
VOCAB = 100  # the MuJoCo tasks' quantile discretizer: 100 bins per dimension
EPISODE_LEN = 1000
TT_EPOCHS = 50  # TT trains 50 epochs per 1M samples (gpt/tt-mujoco.yaml: 50e6 / 256 = 195313 steps)
PLAN_METHODS = ("tt", "trifle-s")
SEED = 0


@dataclass(frozen=True)
class Scale:
    """Sizes of one run: the paper's (for the GPU) or tiny ones (so the script is testable on a CPU)."""

    name: str
    transitions: int  # synthetic dataset size: GPT windows and circuit rows per epoch
    gpt: str  # trifle/conf/gpt name
    pc: str  # trifle/conf/pc name
    hclt_sample: int  # rows the Chow-Liu tree is learned from (its size does not depend on this)
    warmup: int  # untimed GPT steps / EM mini-batches before the timer starts
    gpt_steps: int
    em_batches: int
    plan_steps: int  # timed act calls per planning row (after one untimed call)
    plan_budget_s: float  # a planning row stops early once it has spent this long
    plan_batches: tuple[int, ...]
    data_steps: int  # random-policy MuJoCo steps the planning models are built from
    em_steps: int  # EM epochs fitting the planning circuit
    plan_gpt: tuple[str, ...] = ()  # extra overrides of the planning GPT (the block must hold the plans)


PAPER = Scale(
    name="paper",
    transitions=1_000_000,
    gpt="tt-mujoco",
    pc="paper",
    hclt_sample=50_000,
    gpt_steps=200,
    em_batches=100,
    plan_steps=10,
    plan_budget_s=15.0,
    data_steps=5000,
    em_steps=2,
    warmup=10,
    plan_batches=(1, 8),
)
# gpt/small.yaml's 5-transition block cannot hold 5 context + 5 planned transitions: widen it for planning.
SMOKE = replace(
    PAPER,
    name="smoke",
    transitions=20_000,
    gpt="small",
    pc="small",
    hclt_sample=5_000,
    warmup=2,
    gpt_steps=5,
    em_batches=3,
    plan_steps=1,
    plan_budget_s=5.0,
    data_steps=1000,
    em_steps=1,
    plan_gpt=("gpt.seq_transitions=10",),
)


@dataclass
class Section:
    """One measurement's Markdown table, or why it is missing (not run yet, or the error it raised)."""

    title: str
    lines: list[str]


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timers measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    """Peak GPU memory since :func:`reset_peak`, or '–' on the CPU."""
    if device.type != "cuda":
        return "–"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def synthetic_tokens(obs_dim: int, act_dim: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, episode_starts, episode_terminal): random tokens per column, 1000-step timeout episodes.

    Values do not change the cost of a training step or an EM pass; shapes and episode layout do.
    """
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, VOCAB, size=(rows, obs_dim + act_dim + 2), dtype=np.int64)
    starts = np.arange(0, rows, EPISODE_LEN, dtype=np.int64)
    return tokens, starts, np.zeros(len(starts), dtype=bool)


# ----------------------------------------------------------------------------------------------- GPT


@dataclass(frozen=True)
class GptTiming:
    env: str
    window_tokens: int
    batch: int
    warmup: int
    steps: int
    seconds: float
    data_seconds: float  # of which: drawing and assembling the batches on the CPU (batch_indices + get)
    windows: int
    peak_gib: str

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.windows / self.batch)


def time_gpt(env: str, scale: Scale, steps: int, device: torch.device) -> GptTiming:
    """Time the training loop's own step (``batch_indices`` + ``TransitionWindows.get`` + ``train_step``)."""
    cfg = resolve_config(compose([f"task={TASKS[env]}", f"gpt={scale.gpt}"])["gpt"])
    obs_dim, act_dim = ENVS[env]
    tokens, starts, terminal = synthetic_tokens(obs_dim, act_dim, scale.transitions)
    mcfg = model_config(cfg, obs_dim, act_dim, VOCAB)
    windows = TransitionWindows(tokens, starts, terminal, cfg["seq_transitions"], mcfg.stop_token)
    torch.manual_seed(SEED)
    model = TrajectoryGPT(mcfg).to(device).train()
    optimizer = make_optimizer(model, cfg)
    total = cfg["steps"] or math.ceil(TT_EPOCHS * len(windows) / cfg["batch_size"])
    seconds = data_seconds = 0.0
    reset_peak(device)
    for step in range(scale.warmup + steps):
        if step == scale.warmup:
            sync(device)
            start, data_seconds = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = windows.get(batch_indices(SEED, step, cfg["batch_size"], len(windows)))
        data_seconds += time.perf_counter() - t0
        lr = learning_rate(cfg, step, total)
        train_step(model, optimizer, batch, lr, cfg["grad_clip"], derived_seed(SEED, 2, step))
    sync(device)
    seconds = time.perf_counter() - start
    return GptTiming(
        env,
        mcfg.block_size,
        cfg["batch_size"],
        scale.warmup,
        steps,
        seconds,
        data_seconds,
        len(windows),
        peak_gib(device),
    )


def gpt_section(rows: Sequence[GptTiming], scale: Scale) -> list[str]:
    """Measured steps, and the epoch and TT-training times extrapolated from their mean."""
    lines = [
        f"One epoch = one pass over all {scale.transitions:,} windows (every transition starts one), i.e. "
        f"ceil(windows / batch) optimizer steps; a full TT training is {TT_EPOCHS} such epochs "
        f"(gpt/tt-mujoco.yaml: 195313 steps). The real split holds out 5% of the episodes, so real epochs are "
        "~5% shorter. 'CPU batch' is the part of a step spent drawing and assembling the batch on the CPU "
        "(`batch_indices` + `TransitionWindows.get`), included in the step time.",
        "",
        "| env | tokens / window | batch | measured steps (after warm-up) | measured s | ms / step | "
        "of which CPU batch ms | peak GPU GiB | steps / epoch | **extrapolated** epoch | "
        f"**extrapolated** {TT_EPOCHS} epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epoch = r.per_step * r.steps_per_epoch
        lines.append(
            f"| {r.env} | {r.window_tokens} | {r.batch} | {r.steps} (+{r.warmup}) | {r.seconds:.2f} | "
            f"{1000 * r.per_step:.1f} | {1000 * r.data_seconds / r.steps:.1f} | {r.peak_gib} | "
            f"{r.steps_per_epoch} | {_duration(epoch)} | {_duration(TT_EPOCHS * epoch)} |"
        )
    return lines


# ------------------------------------------------------------------------------------------- circuit


@dataclass(frozen=True)
class EmTiming:
    env: str
    backend: str
    num_vars: int
    num_cats: int
    num_latents: int
    batch: int
    warmup: int
    batches: int
    seconds: float
    rows: int
    epochs: int  # pc config's EM epochs of a full training
    build_seconds: float
    peak_gib: str

    @property
    def per_batch(self) -> float:
        return self.seconds / self.batches

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.rows / self.batch)


def em_runner(root_ns: Any, backend: str, device: torch.device, pseudocount: float) -> Callable[[list], Any]:
    """The project's per-epoch EM call for ``backend``, applied to a list of mini-batches.

    pyjuice: ``pyjuice_epoch`` (forward + flow backward per mini-batch, one ``mini_batch_em``), the loop
    body of ``_train_pyjuice``; torch: ``em_step`` (flows by autograd, one update), that of ``_train_torch``,
    which keeps the circuit on the CPU (``device`` is then the CPU).
    """
    if backend == "pyjuice":
        import pyjuice as juice

        pc = juice.compile(root_ns)
        pc.to(device)
        return lambda batches: pyjuice_epoch(pc, batches, pseudocount, device)
    circuit = TorchCircuit.from_nodes(root_ns, device=device)
    return lambda batches: em_step(circuit, batches, pseudocount=pseudocount)


def circuit_backends(env: str, scale: Scale, device: torch.device) -> list[str]:
    """The backend the project picks (pc.backend; ``auto`` = pyjuice on CUDA) first, then the torch one.

    On CUDA both are timed: ``pc.backend=torch`` is the project's fallback (EM on the CPU; planning with
    TorchCircuit on the GPU), and its rows say whether pyjuice is the faster choice for each use, and
    still give numbers should pyjuice fail on the GPU machine.
    """
    if device.type != "cuda":
        return ["torch"]
    chosen = resolve_backend(compose([f"task={TASKS[env]}", f"pc={scale.pc}"])["pc"]["backend"])
    return list(dict.fromkeys([chosen, "torch"]))


def time_em(env: str, backend: str, scale: Scale, batches: int, device: torch.device) -> EmTiming:
    """Time ``batches`` EM mini-batches (one parameter update included) after an untimed warm-up pass."""
    pc = compose([f"task={TASKS[env]}", f"pc={scale.pc}"])["pc"]
    device = device if backend == "pyjuice" else torch.device("cpu")  # where the project runs this backend
    obs_dim, act_dim = ENVS[env]
    tokens, _, _ = synthetic_tokens(obs_dim, act_dim, scale.transitions)
    train = torch.from_numpy(tokens)  # pc_window = 1: a circuit row is one transition's tokens
    num_cats = circuit_num_cats(VOCAB, 1)
    t0 = time.perf_counter()
    root_ns = build_hclt(train[: scale.hclt_sample], num_cats=num_cats, num_latents=pc["num_latents"], seed=0)
    run = em_runner(root_ns, backend, device, pc["pseudocount"])
    build_seconds = time.perf_counter() - t0
    size = pc["batch_size"]
    mini = [train[i * size : (i + 1) * size] for i in range(scale.warmup + batches)]
    reset_peak(device)
    run(mini[: scale.warmup])
    sync(device)
    start = time.perf_counter()
    run(mini[scale.warmup :])
    sync(device)
    seconds = time.perf_counter() - start
    return EmTiming(
        env,
        backend,
        train.size(1),
        num_cats,
        pc["num_latents"],
        size,
        scale.warmup,
        batches,
        seconds,
        len(train),
        pc["epochs"],
        build_seconds,
        peak_gib(device),
    )


def em_section(rows: Sequence[EmTiming], scale: Scale) -> list[str]:
    """Measured mini-batches, and the epoch and full-EM times extrapolated from their mean."""
    epochs = rows[0].epochs if rows else 0
    lines = [
        f"HCLT over one transition (`task.pc_window` = 1), learned from {scale.hclt_sample:,} synthetic rows; "
        f"one full-batch EM epoch = flows of all {scale.transitions:,} rows in mini-batches, then one "
        f"parameter update; a full training is {epochs} epochs (pc/{scale.pc}.yaml). The measured part "
        "includes one update, which a real epoch also does once, so the extrapolation slightly over-counts "
        "it. 'build' = Chow-Liu tree + compile, once per training, not extrapolated. The torch backend "
        "runs EM on the CPU, as `_train_torch` does (on CUDA it is timed as the fallback to pyjuice).",
        "",
        "| env | backend | vars × cats | latents | batch | measured mini-batches (after warm-up) | "
        "measured s | ms / mini-batch | peak GPU GiB | build s | mini-batches / epoch | "
        f"**extrapolated** epoch | **extrapolated** {epochs} epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epoch = r.per_batch * r.batches_per_epoch
        lines.append(
            f"| {r.env} | {r.backend} | {r.num_vars} × {r.num_cats} | {r.num_latents} | {r.batch} | "
            f"{r.batches} (+{r.warmup}) | {r.seconds:.2f} | {1000 * r.per_batch:.1f} | {r.peak_gib} | "
            f"{r.build_seconds:.1f} | {r.batches_per_epoch} | {_duration(epoch)} | "
            f"{_duration(r.epochs * epoch)} |"
        )
    return lines


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class PlanTiming:
    env: str
    method: str
    backend: str
    batch: int
    calls: int
    env_steps: int
    seconds: float

    @property
    def per_env_step(self) -> float:
        return self.seconds / max(self.env_steps, 1)


def planned_with(backend: str, backends: Sequence[str]) -> tuple[str, ...]:
    """The planning methods to time with ``backend``: all of them with the first backend, and only those
    that query the circuit (the method registry's ``needs``) with the others, whose tt rows would repeat."""
    if backend == backends[0]:
        return PLAN_METHODS
    return tuple(m for m in PLAN_METHODS if "pc" in method(m).needs)


def planning_models(env: str, backend: str, scale: Scale, device: torch.device) -> Any:
    """``mujoco_planning_speed``'s Models, built with this scale's GPT and circuit configs.

    Its ``build_models`` always composes the paper configs; composing here lets ``--smoke`` use tiny ones.
    """
    from mujoco_planning_speed import Models, make_circuit, make_gpt, make_tokens

    start = time.perf_counter()
    cfg = compose([f"task={TASKS[env]}", f"gpt={scale.gpt}", f"pc={scale.pc}", *scale.plan_gpt])
    data = make_tokens(cfg, scale.data_steps)
    circuit = make_circuit(cfg, data, scale.em_steps, str(device), backend)
    gpt = make_gpt(cfg, data, str(device))
    return Models(cfg, data, gpt, circuit, backend, time.perf_counter() - start)


def time_planning(
    env: str, backend: str, methods: Sequence[str], scale: Scale, steps: int, device: torch.device
) -> list[PlanTiming]:
    """``methods`` (of tt and trifle-s; KV cache, released settings) on real MuJoCo episodes, round-robin
    per batch, with the circuit run by ``backend`` on ``device``."""
    from mujoco_planning_speed import Rollout, Variant, make_variant_planner

    from trifle.envs.mujoco import VectorMujocoEnv

    models = planning_models(env, backend, scale, device)
    print(f"{env}: planning models built in {models.build_seconds:.1f} s ({models.circuit_backend})")
    out = []
    for batch in scale.plan_batches:
        rollouts = [
            Rollout(
                Variant(m, True),
                make_variant_planner(models, Variant(m, True), str(device)),
                VectorMujocoEnv(env, batch, seed=0),
            )
            for m in methods
        ]
        while any(r.wants_more(steps, scale.plan_budget_s) for r in rollouts):
            for r in rollouts:
                if r.wants_more(steps, scale.plan_budget_s):
                    r.step()
        for r in rollouts:
            r.env.close()
            out.append(
                PlanTiming(
                    env, r.variant.method, models.circuit_backend, batch, r.calls, r.env_steps, r.seconds
                )
            )
            print(f"  {env} {r.variant.method} batch={batch}: {out[-1].per_env_step:.3f} s/env-step")
    return out


def plan_section(rows: Sequence[PlanTiming], scale: Scale) -> list[str]:
    """Measured seconds per environment step, and the planning time of one 1000-step episode."""
    lines = [
        "`Policy.act` only, on real `VectorMujocoEnv` episodes (seed 0), after 1 untimed warm-up call; "
        f"up to {scale.plan_steps} timed calls per row, fewer once a row has spent {scale.plan_budget_s:g} s. "
        "Released MuJoCo settings (`task.planning`: N = 32, H = 5, λ = 2, 5 context transitions), KV cache "
        f"on; untrained models of gpt/{scale.gpt}.yaml{_overrides(scale.plan_gpt)} and pc/{scale.pc}.yaml size. The context fills over "
        "the first 5 steps, so short runs sit slightly below the steady-state cost. s / env step = "
        "planning seconds / environment steps (a batch-8 call plans 8 steps). With the pyjuice circuit, "
        "Triton kernels compile on the first use of each shape; one first seen during a timed call counts "
        "in it (as it would in a real evaluation's first steps).",
        "",
        "| env | method | circuit backend | batch | measured calls | measured s | s / call | s / env step | "
        "**extrapolated** 1000 env steps (one episode) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_call = r.seconds / max(r.calls, 1)
        lines.append(
            f"| {r.env} | {r.method} | {r.backend} | {r.batch} | {r.calls} | {r.seconds:.2f} | "
            f"{per_call:.3f} | {r.per_env_step:.3f} | {_duration(1000 * r.per_env_step)} |"
        )
    return lines


# -------------------------------------------------------------------------------------------- report


def _overrides(overrides: Sequence[str]) -> str:
    """' (with a=1, b=2)' for config overrides, '' for none."""
    return f" (with {', '.join(o.split('.', 1)[-1] for o in overrides)})" if overrides else ""


def _duration(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_line(device: torch.device) -> str:
    """What ran the numbers: accelerator, library versions, CPU."""
    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU run)"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (
        f"Machine: {accel}{cuda}; torch {torch.__version__}, pyjuice {_version('pyjuice')}, "
        f"Python {platform.python_version()}; {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"{torch.get_num_threads()} torch thread(s)."
    )


def render(args: argparse.Namespace, scale: Scale, device: torch.device, sections: Sequence[Section]) -> str:
    """The whole report; sections not measured yet or failed say so, so a partial report is still valid."""
    lines = [
        "# GPU timings at Gym-MuJoCo scale (benchmarks/gpu_timings.py)",
        "",
        machine_line(device),
        "",
        f"Scale: **{scale.name}**{' (tiny CPU smoke sizes, not the paper scale)' if args.smoke else ''}. "
        f"Device `{device}`. Synthetic data: uniformly random tokens ({VOCAB} bins per column) shaped like "
        f"D4RL medium, {scale.transitions:,} transitions in {EPISODE_LEN}-step episodes, for Hopper "
        "(obs 11, act 3) and HalfCheetah (obs 17, act 6). Training and EM cost depend on shapes, not token "
        "values, so the timings carry over to the real datasets. **Measured** columns are wall-clock times "
        "of the given number of steps after untimed warm-up ones (CUDA synchronised around the timers); "
        "**extrapolated** columns scale their mean to full epochs / episodes.",
        "",
        f"Command: `python benchmarks/gpu_timings.py {' '.join(sys.argv[1:])}`",
    ]
    for s in sections:
        lines += ["", f"## {s.title}", "", *s.lines]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Atomically, so an interrupted run leaves the previous complete (or partial) report in place."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def run_section(
    section: Section,
    units: Sequence[tuple[str, ...]],
    measure: Callable[..., list[Any]],
    table: Callable[[list[Any]], list[str]],
    save: Callable[[], None],
) -> None:
    """Fill ``section`` with ``table`` of ``measure(*unit)`` for every unit (env, ...), saving after each.

    An error is reported in the section and the run goes on, and the report is saved after every unit,
    so one failing part (a missing package, OOM) or a run killed at its time limit loses nothing else.
    """
    rows: list[Any] = []
    failures: list[str] = []
    for unit in units:
        start, label = time.perf_counter(), " / ".join(unit)
        try:
            rows.extend(measure(*unit))
        except Exception as exc:
            traceback.print_exc()
            took = time.perf_counter() - start
            failures.append(f"**{label} failed** after {took:.0f} s: `{type(exc).__name__}: {exc}`")
        print(f"[{section.title}] {label}: {time.perf_counter() - start:.1f} s", flush=True)
        section.lines = (table(rows) if rows else []) + ([""] if rows and failures else []) + failures
        save()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu, ...")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, so the script runs on a CPU")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gpu_timings.md")
    parser.add_argument("--gpt-steps", type=int, help="timed GPT optimizer steps per env (default by scale)")
    parser.add_argument("--em-batches", type=int, help="timed EM mini-batches per env (default by scale)")
    parser.add_argument("--plan-steps", type=int, help="timed act calls per planning row (default by scale)")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = SMOKE if args.smoke else PAPER
    scale = replace(
        base,
        gpt_steps=args.gpt_steps or base.gpt_steps,
        em_batches=args.em_batches or base.em_batches,
        plan_steps=args.plan_steps or base.plan_steps,
    )
    device = torch.device(resolve_device(args.device))
    if device.type == "cpu":
        # As mujoco_planning_speed: planning's many small ops slow down badly with several torch threads
        # on a shared machine (over 10x here with another job running), while one thread is steady.
        torch.set_num_threads(1)
    print(machine_line(device))
    began = time.perf_counter()
    sections = [
        Section("1. GPT training: one epoch", ["(not run)"]),
        Section("2. Circuit EM: one epoch", ["(not run)"]),
        Section("3. Planning time per environment step", ["(not run)"]),
    ]
    envs = [(env,) for env in args.envs]
    parts = (
        (envs, lambda env: [time_gpt(env, scale, scale.gpt_steps, device)], gpt_section),
        (
            [(env, b) for env in args.envs for b in circuit_backends(env, scale, device)],
            lambda env, b: [time_em(env, b, scale, scale.em_batches, device)],
            em_section,
        ),
        (
            [(env, b) for env in args.envs for b in circuit_backends(env, scale, device)],
            lambda env, b: time_planning(
                env, b, planned_with(b, circuit_backends(env, scale, device)), scale, scale.plan_steps, device
            ),
            plan_section,
        ),
    )

    def save() -> None:
        write(args.out, render(args, scale, device, sections))

    for section, (units, measure, table) in zip(sections, parts, strict=True):
        run_section(section, units, measure, partial(table, scale=scale), save)
    report = render(args, scale, device, sections)
    report += f"\nTotal wall time {time.perf_counter() - began:.0f} s.\n"
    write(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
