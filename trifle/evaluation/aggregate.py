"""The one aggregation core of the result tables: evaluation records grouped by (task, method), checked,
and reduced to means and standard errors with one convention.

Both table families call it: the toy tasks' summary (:mod:`trifle.evaluation.summary`) and the Gym-MuJoCo
tables (:mod:`trifle.evaluation.mujoco_tables`); what is specific to each (paired differences, DT's
target, normalized scores, published numbers, violation rates, layouts, figures) lives there.

The convention (:func:`estimate`), for any per-episode quantity of a (task, method):

- **several seeds** (``over = "seeds"``): the mean is the mean over seeds of each seed's mean over its
  episodes (every seed weighs the same, whatever its episode count); the standard error is the std
  (ddof=1) of those seed means / sqrt(number of seeds). It measures the spread across training runs (and
  their evaluations), which is what the paper's +- reports.
- **one seed** (``over = "episodes"``): the mean over its episodes; the standard error is the std
  (ddof=1) over episodes / sqrt(number of episodes). Evaluation noise only: it understates the spread
  across training runs. NaN when there is a single episode.

Every table says which applied to each row (a ``sem_over`` column and a sentence in the Markdown note).

Methods are ordered and checked through the method registry (:mod:`trifle.planning.methods`), never by
comparing their names here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trifle.errors import ConfigError, DataError
from trifle.io import read_json
from trifle.planning.methods import method, sort_key

#: Keys every evaluation file must have to be tabulated (written by the evaluate stage).
REQUIRED_KEYS = ("task", "method", "seed", "episodes", "plan_seconds", "env_steps")
#: Where :func:`load_evaluation` notes the file a record came from, so errors can name it.
SOURCE_KEY = "_source"
#: The two values of ``Estimate.over`` (and of the tables' ``sem_over`` column).
OVER_SEEDS, OVER_EPISODES = "seeds", "episodes"
SEEDS_RULE = "std (ddof=1) of the per-seed means / sqrt(number of seeds)"
EPISODES_RULE = "std (ddof=1) over the episodes / sqrt(number of episodes)"


# --------------------------------------------------------------------------- the convention


@dataclass(frozen=True)
class Estimate:
    """A mean, its standard error, and what the error is over (``"seeds"`` or ``"episodes"``)."""

    mean: float
    sem: float
    over: str


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")


def estimate(per_seed: Sequence[Sequence[float]]) -> Estimate:
    """Mean and standard error of per-episode values given one sequence per seed (the module's convention).

    Several seeds: mean of the seed means, std (ddof=1) of the seed means / sqrt(seeds). One seed: mean
    and std (ddof=1) / sqrt(episodes) of its episodes.
    """
    episodes = [np.asarray(values, dtype=float) for values in per_seed]
    if not episodes or any(e.size == 0 for e in episodes):
        raise ValueError("estimate: every seed needs at least one episode")
    if len(episodes) == 1:
        return Estimate(float(episodes[0].mean()), _sem(episodes[0]), OVER_EPISODES)
    seed_means = np.array([e.mean() for e in episodes])
    return Estimate(float(seed_means.mean()), _sem(seed_means), OVER_SEEDS)


def convention_phrase(cells: Mapping[str, str]) -> str:
    """What the standard errors of ``cells`` (name -> ``Estimate.over``) are over, as one phrase.

    E.g. "over seeds (std (ddof=1) of the per-seed means / sqrt(number of seeds))", or, when some cells
    have a single seed, that phrase followed by "except over the episodes of the single seed (...) for
    <their names>".
    """
    by_episodes = [name for name, over in cells.items() if over == OVER_EPISODES]
    if len(by_episodes) == len(cells):
        return f"over the episodes of the single seed ({EPISODES_RULE})"
    phrase = f"over seeds ({SEEDS_RULE})"
    if by_episodes:
        phrase += (
            f", except over the episodes of the single seed ({EPISODES_RULE}) for {', '.join(by_episodes)}"
        )
    return phrase


# --------------------------------------------------------------------------- records and groups


def describe(record: Mapping[str, Any]) -> str:
    """The record's file when it was read by :func:`load_evaluation`, else its task, method and seed."""
    if SOURCE_KEY in record:
        return str(record[SOURCE_KEY])
    ids = (f"{k}={record.get(k, '?')}" for k in ("task", "method", "seed"))
    return "evaluation record " + " ".join(ids)


def load_evaluation(path: Path) -> dict[str, Any]:
    """Read one ``results/eval/{task}/{method}/seed{seed}.json``, checking the keys every table needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: evaluation file not found")
    record = read_json(path)
    for key in REQUIRED_KEYS:
        if key not in record:
            raise DataError(f"{path}: evaluation file lacks key '{key}'")
    record[SOURCE_KEY] = str(path)
    return record


def check_record(record: Mapping[str, Any], episode_keys: Iterable[str], keys: Iterable[str] = ()) -> None:
    """Fail, naming the file, when a record lacks a key or its episode series are empty or of unequal length."""
    for key in (*REQUIRED_KEYS, *keys):
        if key not in record:
            raise DataError(f"{describe(record)}: lacks key '{key}'")
    episodes = record["episodes"]
    episode_keys = tuple(episode_keys)
    for key in episode_keys:
        if key not in episodes:
            raise DataError(f"{describe(record)}: lacks key 'episodes.{key}'")
    lengths = {key: len(episodes[key]) for key in episode_keys}
    if lengths and (len(set(lengths.values())) != 1 or not next(iter(lengths.values()))):
        raise DataError(
            f"{describe(record)}: episodes.{'/'.join(episode_keys)} must be non-empty lists of one length, "
            f"got lengths {lengths}"
        )


@dataclass(frozen=True)
class Group:
    """The evaluation records of one (task, method), one per seed, ordered by seed."""

    task: str
    method: str
    records: tuple[dict[str, Any], ...]
    #: The per-episode series checked in every record (the first one counts the episodes).
    episode_keys: tuple[str, ...]

    @property
    def files(self) -> str:
        return ", ".join(describe(r) for r in self.records)

    @property
    def seeds(self) -> list[Any]:
        return [r["seed"] for r in self.records]

    @property
    def n_episodes(self) -> int:
        return sum(len(r["episodes"][self.episode_keys[0]]) for r in self.records)

    def episodes(self, key: str) -> list[np.ndarray]:
        """``episodes[key]`` of each seed, as float arrays."""
        return [np.asarray(r["episodes"][key], dtype=float) for r in self.records]

    def estimate(self, key: str) -> Estimate:
        """Mean and standard error of ``episodes[key]`` (the module's convention)."""
        return estimate(self.episodes(key))

    def total(self, key: str) -> float:
        return sum(r[key] for r in self.records)

    def step_seconds(self) -> float:
        """Planning wall time per environment step over all seeds (NaN without steps)."""
        steps = self.total("env_steps")
        return self.total("plan_seconds") / steps if steps else float("nan")

    def single(self, key: str) -> Any:
        """The one value of ``key`` the seeds share; different values mean mixed-up files."""
        values = {r[key] for r in self.records}
        if len(values) != 1:
            raise DataError(
                f"task {self.task!r}, method {self.method!r}: the seeds' files disagree on '{key}' "
                f"({sorted(map(str, values))}): {self.files}"
            )
        return values.pop()


def group_records(
    records: Iterable[Mapping[str, Any]], episode_keys: Iterable[str], keys: Iterable[str] = ()
) -> dict[tuple[str, str], Group]:
    """Records grouped by (task, method), in display order: by task, then by the registry's method order.

    Checks, each failure a DataError naming the files: every record has :data:`REQUIRED_KEYS`, ``keys`` and
    non-empty ``episodes.<episode_keys>`` of one length; its method is in the method registry; a group has
    one file per seed; the seeds of a group record the same per-episode series (no mixed keys).
    """
    keys, episode_keys = tuple(keys), tuple(episode_keys)
    if not episode_keys:
        raise ValueError("group_records: name at least one per-episode series (episode_keys)")
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        check_record(record, episode_keys, keys)
        group = grouped[(record["task"], record["method"])]
        clash = [r for r in group if r["seed"] == record["seed"]]
        if clash:
            raise DataError(
                f"two evaluation files for task {record['task']!r}, method {record['method']!r}, "
                f"seed {record['seed']}: {describe(clash[0])} and {describe(record)}; expected one per seed"
            )
        group.append(dict(record))
    groups = {}
    for (task, name), members in sorted(grouped.items(), key=lambda kv: (kv[0][0], sort_key(kv[0][1]))):
        group = Group(task, name, tuple(sorted(members, key=lambda r: r["seed"])), episode_keys)
        try:
            method(name)
        except ConfigError as exc:
            raise DataError(f"{group.files}: method {name!r} is not in the method registry ({exc})") from exc
        series = {tuple(sorted(r["episodes"])) for r in group.records}
        if len(series) != 1:
            found = "; ".join(f"{describe(r)}: {sorted(r['episodes'])}" for r in group.records)
            raise DataError(
                f"task {task!r}, method {name!r}: the seeds' files record different episode keys ({found})"
            )
        groups[(task, name)] = group
    return groups
