"""A trained behaviour policy for the MuJoCo datasets: stable-baselines3's SAC, stopped partway.

D4RL's "medium" datasets were collected by a SAC agent trained for part of its budget; random data alone
cannot show whether an offline-RL planner does anything useful, so :func:`train_sac` trains such an agent
locally and :class:`SACBehaviour` rolls it out with noise from the dataset's own random generator.

Training is resumable because it is the slowest step of dataset generation (hours on one CPU thread for
D4RL-sized budgets): checkpoints (model + replay buffer) land in a work directory that a later call with
the same arguments continues from.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from tqdm import tqdm

from trifle.envs.mujoco import check_env_name, make_mujoco_env, normalized_score
from trifle.errors import CheckpointError, ConfigError
from trifle.io import read_json, write_json

TRAIN_EPISODE_STEPS = 1000  # D4RL's step limit; the behaviour policy is trained on full-length episodes.
MAX_LEARNING_STARTS = 5000
ARGS_FILE = "sac_args.json"
FINAL_FILE = "sac_final.zip"
# The whole replay buffer at the end of training: every transition the agent saw while learning, the
# raw material of a D4RL "medium-replay"-style dataset (trifle.data.mujoco_datasets, policy sac-replay).
FINAL_REPLAY_FILE = "sac_final_replay.pkl"
# A target-return training's evaluations (one row per checkpoint) and where it stopped.
EVALS_FILE = "sac_evals.csv"
EVAL_FIELDS = ("step", "mean_return", "std_return", "normalized_score", "episodes")
RESULT_FILE = "sac_result.json"
LOCK_FILE = ".lock"
CHECKPOINT_RE = re.compile(r"sac_(model|replay)_(\d+)\.(zip|pkl)")
LOG_2PI = float(np.log(2.0 * np.pi))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, then restore: SAC's small MLPs are fastest on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def learning_starts(steps: int) -> int:
    """Random-action warm-up before the first update: SB3's usual 5000, shortened for tiny budgets."""
    return min(MAX_LEARNING_STARTS, steps // 10)


def train_sac(
    env: str,
    *,
    steps: int,
    seed: int,
    work_dir: Path | str,
    checkpoint_every: int = 10_000,
    target_return: float | None = None,
    eval_episodes: int = 10,
    progress: bool = True,
) -> SAC:
    """Train SB3's SAC (default ``MlpPolicy``) on ``env`` for up to ``steps`` env steps, resuming from ``work_dir``.

    Every ``checkpoint_every`` steps the model and its replay buffer are saved atomically into ``work_dir``;
    a later call with the same arguments continues from the latest checkpoint, and once training has
    finished (``sac_final.zip``) a call only loads the result. The arguments are recorded in
    ``sac_args.json``; a directory made with other arguments raises :class:`CheckpointError` instead of
    being reused silently.

    ``target_return`` stops training early, D4RL's recipe for a "medium" policy: at every checkpoint the
    stochastic policy plays ``eval_episodes`` episodes (its own simulator and generator, so training is
    not perturbed) and the first checkpoint whose mean return reaches the target becomes the final agent.
    A fixed step count is a poor recipe for "medium" because RL's progress is not smooth: the same seed's
    agent returned 820 at 200k steps and 3360 at 280k (docs/mujoco.md#medium-quality-data). Every
    evaluation is kept in ``sac_evals.csv`` (the agent's learning curve) and the stop in
    ``sac_result.json``.

    Reproducibility: an uninterrupted training is deterministic for a seed on one machine (one torch
    thread, CPU); training in checkpoint-sized pieces gives the same updates as one call. An
    interrupted-then-resumed training is *not* bit-identical to an uninterrupted one: SB3 does not save
    the RNG states or the simulator state, so the resumed run starts a fresh episode and reseeds its
    generators from ``(seed, checkpoint step)`` (which keeps a resumed run repeatable). Like SB3 itself,
    training reseeds the global ``random``, ``numpy`` and ``torch`` generators.
    """
    check_env_name(env)
    if steps < 1:
        raise ConfigError(f"SAC training steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if eval_episodes < 1:
        raise ConfigError(f"sac_eval_episodes must be >= 1, got {eval_episodes}")
    work_dir = Path(work_dir)
    args: dict[str, Any] = {"algo": "sac", "env": env, "seed": seed, "steps": steps}
    if target_return is not None:
        # What decides where training stops is part of the agent's identity.
        args.update(
            target_return=float(target_return), eval_episodes=eval_episodes, eval_every=checkpoint_every
        )
    _claim_work_dir(work_dir, args)
    # Datasets drawn from one agent (its rollouts, its replay buffer) may be generated by concurrent jobs:
    # the first trains, the others wait for it and load the result.
    with _exclusive(work_dir / LOCK_FILE), torch_threads(1):
        if (work_dir / FINAL_FILE).exists():
            return SAC.load(work_dir / FINAL_FILE, device="cpu")
        model = _resume_or_create(env, steps, seed, work_dir)
        evals = _read_evals(work_dir, up_to=model.num_timesteps)
        reached = None
        with tqdm(
            total=steps, initial=model.num_timesteps, desc=f"{env} SAC training (steps)", disable=not progress
        ) as bar:
            while model.num_timesteps < steps:
                stop = min(steps, (model.num_timesteps // checkpoint_every + 1) * checkpoint_every)
                model.learn(stop - model.num_timesteps, callback=_BarUpdate(bar), reset_num_timesteps=False)
                step = model.num_timesteps
                if target_return is not None:
                    evals.append(_evaluate(model, env, seed, step, eval_episodes))
                    _write_evals(work_dir, evals)
                    bar.set_postfix(eval_return=f"{evals[-1]['mean_return']:.0f}")
                    if evals[-1]["mean_return"] >= target_return:
                        reached = step
                        break
                if step < steps:
                    _save_checkpoint(model, work_dir, step)
        if target_return is not None:
            last = evals[-1] if evals else None
            result = {
                "steps": model.num_timesteps,
                "target_return": float(target_return),
                "reached": reached is not None,
            }
            result["eval_return"] = None if last is None else last["mean_return"]
            write_json(work_dir / RESULT_FILE, result)
            if reached is None:
                warnings.warn(
                    f"{work_dir}: SAC's stochastic policy did not reach task.dataset.sac_target_return="
                    f"{target_return} within sac_steps={steps} (last evaluation: {result['eval_return']}); "
                    "the final agent is used",
                    stacklevel=2,
                )
        # The replay buffer first: the model file marks a finished training.
        _atomic_write(work_dir / FINAL_REPLAY_FILE, model.save_replay_buffer)
        _atomic_write(work_dir / FINAL_FILE, model.save)
        _remove_checkpoints(work_dir, keep=None)
    return model


def training_result(work_dir: Path | str) -> dict[str, Any] | None:
    """Where a target-return training stopped (``sac_result.json``), or ``None`` for a fixed budget."""
    path = Path(work_dir) / RESULT_FILE
    return read_json(path) if path.exists() else None


def _evaluate(model: SAC, env: str, seed: int, step: int, episodes: int) -> dict[str, float]:
    """Mean return of the stochastic policy over ``episodes`` full episodes, in a simulator of its own.

    The noise comes from a generator seeded by ``(seed, step)`` and the simulator is not the training one,
    so evaluating leaves the training's random streams and episode untouched.
    """
    rng = np.random.default_rng(np.random.SeedSequence((seed, step, 1)))
    sim = make_mujoco_env(env, max_episode_steps=TRAIN_EPISODE_STEPS)
    try:
        act = SACBehaviour(model, sim.action_space.low, sim.action_space.high)
        returns = []
        for _ in range(episodes):
            obs, _ = sim.reset(seed=int(rng.integers(2**31)))
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = sim.step(act(obs, rng)[0])
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        sim.close()
    values = np.asarray(returns)
    return {
        "step": step,
        "mean_return": float(values.mean()),
        "std_return": float(values.std()),
        "normalized_score": float(normalized_score(env, values).mean()),
        "episodes": episodes,
    }


def _read_evals(work_dir: Path, up_to: int) -> list[dict[str, float]]:
    """The evaluations recorded so far, up to the checkpoint being resumed (later ones were lost with it)."""
    path = work_dir / EVALS_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [
            {k: (int(v) if k in ("step", "episodes") else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    return [row for row in rows if row["step"] <= up_to]


def _write_evals(work_dir: Path, evals: list[dict[str, float]]) -> None:
    def write(f: BinaryIO) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(EVAL_FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(evals)
        f.write(text.getvalue().encode())

    _atomic_write(work_dir / EVALS_FILE, write)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (released by the OS if the process dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def final_replay(work_dir: Path | str) -> dict[str, np.ndarray]:
    """Every transition of a finished training's replay buffer, in the order the agent collected them.

    Keys: ``obs``, ``action``, ``reward``, ``terminal``, ``timeout``, ``next_obs`` (SB3 stores the true
    last observation of an episode as ``next_obs`` and flags step-limit ends as timeouts, not terminals).
    """
    from stable_baselines3.common.save_util import load_from_pkl

    path = Path(work_dir) / FINAL_REPLAY_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path}: missing; the agent in {work_dir} was trained before its replay buffer was kept. "
            "Remove the directory to train it again"
        )
    buffer = load_from_pkl(path)
    order = _collection_order(buffer)
    dones = buffer.dones[order, 0].astype(bool)
    timeouts = buffer.timeouts[order, 0].astype(bool) & dones
    return {
        "obs": buffer.observations[order, 0],
        "action": buffer.actions[order, 0],
        "reward": buffer.rewards[order, 0],
        "terminal": dones & ~timeouts,
        "timeout": timeouts,
        "next_obs": buffer.next_observations[order, 0],
    }


def _collection_order(buffer: Any) -> np.ndarray:
    """Indices of a replay buffer's transitions in the order they were collected (oldest first, also
    after the buffer has wrapped around)."""
    size = buffer.buffer_size if buffer.full else buffer.pos
    return (buffer.pos + np.arange(size)) % buffer.buffer_size if buffer.full else np.arange(size)


def _claim_work_dir(work_dir: Path, args: dict[str, Any]) -> None:
    """Record ``args`` in a fresh directory, or check that an existing one was made with the same ones."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / ARGS_FILE
    if not path.exists():
        leftovers = sorted(p.name for p in work_dir.glob("sac_*") if not p.name.endswith(".tmp"))
        if leftovers:
            raise CheckpointError(f"{work_dir}: holds SAC files {leftovers} but no {ARGS_FILE}; remove them")
        _atomic_write(path, lambda f: f.write(json.dumps(args, indent=2, sort_keys=True).encode()))
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable SAC arguments ({err}); remove {work_dir}") from err
    if not isinstance(stored, dict):
        stored = {}
    keys = [key for key in [*args, *(k for k in stored if k not in args)] if stored.get(key) != args.get(key)]
    if keys:  # a key missing on one side differs too
        made = ", ".join(f"{key}={stored.get(key)!r}" for key in keys)
        asked = ", ".join(f"{key}={args.get(key)!r}" for key in keys)
        raise CheckpointError(
            f"{work_dir}: SAC checkpoint was made with {made}, not with {asked}; "
            "use another work directory or remove this one"
        )


def _resume_or_create(env: str, steps: int, seed: int, work_dir: Path) -> SAC:
    """Load the latest checkpoint with its replay buffer, or build a fresh SAC seeded by ``seed``."""
    train_env = make_mujoco_env(env, max_episode_steps=TRAIN_EPISODE_STEPS)  # gymnasium adds the TimeLimit
    latest = _latest_checkpoint(work_dir)
    if latest is None:
        return SAC(
            "MlpPolicy",
            train_env,
            learning_starts=learning_starts(steps),
            # Holding every transition makes this the same as SB3's 1M default (nothing is ever
            # overwritten) while keeping the pickled replay buffer in each checkpoint small.
            buffer_size=max(1, min(steps, 1_000_000)),
            seed=seed,
            device="cpu",
            verbose=0,
        )
    model = SAC.load(work_dir / f"sac_model_{latest}.zip", env=train_env, device="cpu")
    model.load_replay_buffer(work_dir / f"sac_replay_{latest}.pkl")
    _grow_replay_buffer(model, max(1, min(steps, 1_000_000)))
    model.set_random_seed(_resume_seed(seed, latest))
    return model


def _grow_replay_buffer(model: SAC, size: int) -> None:
    """Give a resumed agent a buffer of ``size`` if its checkpoint's is smaller (a training continued past
    the budget it was started with), keeping every transition in order, so nothing is ever overwritten."""
    buffer = model.replay_buffer
    if buffer.buffer_size >= size:
        return
    order = _collection_order(buffer)
    held = len(order)
    grown = type(buffer)(
        size,
        buffer.observation_space,
        buffer.action_space,
        device="cpu",
        n_envs=buffer.n_envs,
        optimize_memory_usage=buffer.optimize_memory_usage,
        handle_timeout_termination=buffer.handle_timeout_termination,
    )
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(grown, name)[:held] = getattr(buffer, name)[order]
    grown.pos, grown.full = held, False
    model.replay_buffer = grown


def _resume_seed(seed: int, step: int) -> int:
    """Seed for a run resumed at ``step``: repeatable, and different from the original stream's start."""
    return int(np.random.SeedSequence((seed, step)).generate_state(1)[0])


def _latest_checkpoint(work_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (its model file is written last, so it marks completion)."""
    found: dict[str, set[int]] = {"model": set(), "replay": set()}
    for path in work_dir.iterdir():
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match:
            found[match.group(1)].add(int(match.group(2)))
    complete = found["model"] & found["replay"]
    return max(complete) if complete else None


def _save_checkpoint(model: SAC, work_dir: Path, step: int) -> None:
    """Replay buffer first, then the model, each atomically; then drop older checkpoints."""
    _atomic_write(work_dir / f"sac_replay_{step}.pkl", model.save_replay_buffer)
    _atomic_write(work_dir / f"sac_model_{step}.zip", model.save)
    _remove_checkpoints(work_dir, keep=step)


def _remove_checkpoints(work_dir: Path, keep: int | None) -> None:
    """Delete checkpoint files other than step ``keep`` (all of them for ``None``); models first."""
    paths = [p for p in work_dir.iterdir() if CHECKPOINT_RE.fullmatch(p.name)]
    for path in sorted(paths, key=lambda p: "replay" in p.name):
        if int(CHECKPOINT_RE.fullmatch(path.name).group(2)) != keep:
            path.unlink()


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through a temporary file and ``os.replace``, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _BarUpdate(BaseCallback):
    """Advance a tqdm bar over env steps (SB3's own ``progress_bar`` needs ``rich``)."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def _on_step(self) -> bool:
        self.bar.update(self.model.num_timesteps - self.bar.n)
        return True


def squashed_gaussian_log_prob(u: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> float:
    """Exact log-density of ``tanh(u)`` for ``u ~ N(mean, exp(log_std)^2)``, summed over action dims.

    Uses ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, which stays finite where ``tanh`` rounds
    to +-1; SB3's own formula adds 1e-6 inside the log instead, so it differs slightly near the bounds.
    """
    z = (u - mean) / np.exp(log_std)
    gaussian = -0.5 * z**2 - log_std - 0.5 * LOG_2PI
    log_det = 2.0 * (np.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))
    return float((gaussian - log_det).sum())


class SACBehaviour:
    """SAC's stochastic policy with its Gaussian noise drawn from the caller's numpy Generator.

    Sampling here rather than through ``model.predict`` makes a dataset a function of its seed alone (no
    global torch RNG) and gives the exact log-density of the stored action: the action is
    ``low + (tanh(u) + 1) (high - low) / 2`` with ``u ~ N(mean(obs), std(obs)^2)`` from SB3's actor, as
    ``predict(deterministic=False)`` would sample it.
    """

    def __init__(self, model: SAC, low: np.ndarray, high: np.ndarray) -> None:
        self.model = model
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.half_range = (self.high - self.low) / 2.0
        self.log_scale = float(np.log(self.half_range).sum())

    def gaussian(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (clamped) log-std of the pre-tanh Gaussian for one observation, as float64."""
        obs_t, _ = self.model.policy.obs_to_tensor(np.asarray(obs))
        with torch.no_grad():
            mean, log_std, _ = self.model.actor.get_action_dist_params(obs_t)
        return mean[0].double().numpy(), log_std[0].double().numpy()

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Sample one action (float32, the stored dtype) and its log-density in the env's action box."""
        mean, log_std = self.gaussian(obs)
        u = mean + np.exp(log_std) * rng.standard_normal(mean.shape)
        action = np.clip(self.low + (np.tanh(u) + 1.0) * self.half_range, self.low, self.high)
        return action.astype(np.float32), squashed_gaussian_log_prob(u, mean, log_std) - self.log_scale
