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
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from tqdm import tqdm

from trifle.envs.mujoco import check_env_name, make_mujoco_env
from trifle.errors import CheckpointError, ConfigError

TRAIN_EPISODE_STEPS = 1000  # D4RL's step limit; the behaviour policy is trained on full-length episodes.
MAX_LEARNING_STARTS = 5000
ARGS_FILE = "sac_args.json"
FINAL_FILE = "sac_final.zip"
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
    progress: bool = True,
) -> SAC:
    """Train SB3's SAC (default ``MlpPolicy``) on ``env`` for ``steps`` env steps, resuming from ``work_dir``.

    Every ``checkpoint_every`` steps the model and its replay buffer are saved atomically into ``work_dir``;
    a later call with the same ``env``/``seed``/``steps`` continues from the latest checkpoint, and once
    training has finished (``sac_final.zip``) a call only loads the result. The arguments are recorded in
    ``sac_args.json``; a directory made with other arguments raises :class:`CheckpointError` instead of
    being reused silently.

    Reproducibility: an uninterrupted training is deterministic for a seed on one machine (one torch
    thread, CPU). An interrupted-then-resumed training is *not* bit-identical to an uninterrupted one:
    SB3 does not save the RNG states or the simulator state, so the resumed run starts a fresh episode and
    reseeds its generators from ``(seed, checkpoint step)`` (which keeps a resumed run repeatable). Like
    SB3 itself, training reseeds the global ``random``, ``numpy`` and ``torch`` generators.
    """
    check_env_name(env)
    if steps < 1:
        raise ConfigError(f"SAC training steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    work_dir = Path(work_dir)
    _claim_work_dir(work_dir, {"algo": "sac", "env": env, "seed": seed, "steps": steps})
    with torch_threads(1):
        if (work_dir / FINAL_FILE).exists():
            return SAC.load(work_dir / FINAL_FILE, device="cpu")
        model = _resume_or_create(env, steps, seed, work_dir)
        callbacks = [_Checkpointer(work_dir, checkpoint_every), _ProgressBar(f"{env} SAC", steps, progress)]
        model.learn(steps - model.num_timesteps, callback=callbacks, reset_num_timesteps=False)
        _atomic_write(work_dir / FINAL_FILE, model.save)
        _remove_checkpoints(work_dir, keep=None)
    return model


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
    for key, value in args.items():
        if not isinstance(stored, dict) or stored.get(key) != value:
            found = stored.get(key) if isinstance(stored, dict) else stored
            raise CheckpointError(
                f"{work_dir}: SAC checkpoint was made with {key}={found!r}, not {key}={value!r}; "
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
    model.set_random_seed(_resume_seed(seed, latest))
    return model


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


class _Checkpointer(BaseCallback):
    """Checkpoint at the start of a rollout, when every update for the steps taken so far is done."""

    def __init__(self, work_dir: Path, every: int) -> None:
        super().__init__()
        self.work_dir = work_dir
        self.every = every
        self.start = 0

    def _on_training_start(self) -> None:
        self.start = self.model.num_timesteps

    def _on_rollout_start(self) -> None:
        step = self.model.num_timesteps
        if step > self.start and step % self.every == 0:
            _save_checkpoint(self.model, self.work_dir, step)

    def _on_step(self) -> bool:
        return True


class _ProgressBar(BaseCallback):
    """A plain tqdm bar over env steps (SB3's own ``progress_bar`` needs ``rich``)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        super().__init__()
        self.desc, self.total, self.enabled = desc, total, enabled
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        n = self.model.num_timesteps
        self.bar = tqdm(
            total=self.total, initial=n, desc=f"{self.desc} training (steps)", disable=not self.enabled
        )

    def _on_step(self) -> bool:
        self.bar.update(self.model.num_timesteps - self.bar.n)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


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
