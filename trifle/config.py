"""Hydra composition, validation and per-stage config slices.

Hydra owns every hyperparameter. Snakemake composes the same config at DAG-build time and passes
each job only the slice its stage reads (``stage_slice``), so a changed hyperparameter reruns exactly
the jobs that read it. Composition is memoised because a DAG composes once per job.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trifle.errors import ConfigError

CONF_DIR = Path(__file__).parent / "conf"
GROUPS = ("task", "gpt", "pc", "dt", "critic", "planner", "eval")

# Which top-level keys (dotted) each stage reads. The paths are excluded on purpose: Snakemake tracks
# files itself, and a path change must not look like a hyperparameter change.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("task.name", "task.env", "task.dataset"),
    "labels": ("task.name", "task.labels"),
    "tokens": ("task.name", "task.discretizer"),
    "train_gpt": ("task.name", "gpt", "seed", "device"),
    "train_pc": ("task.name", "pc", "task.pc_window", "task.labels.discount", "seed"),
    "train_dt": ("task.name", "dt", "seed", "device"),
    "train_critic": ("task.name", "critic", "task.labels.discount", "seed", "device"),
    "evaluate": (
        "task.name",
        "task.env",
        "task.labels.discount",
        "task.pc_window",
        "task.dt_target_returns",
        "task.action_constraint",
        "task.planning",
        "planner",
        "eval",
        "seed",
        "device",
    ),
    "tables": (),
    "summary": (),
    "mujoco_tables": (),
    "ablation_table": (),
}


def available(group: str) -> list[str]:
    """Names of the configs of a Hydra group (files starting with `_` are shared bases, not choices)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _check_choices(overrides: Sequence[str]) -> None:
    """Turn an unknown group choice into a message that lists the valid names."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") in GROUPS and value not in available(key.lstrip("+~")):
            raise ConfigError(
                f"unknown {key} '{value}' (override '{item}'); expected one of: {', '.join(available(key))}"
            )


@functools.lru_cache(maxsize=8192)
def _compose_cached(overrides: tuple[str, ...]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose the config with overrides {list(overrides)}: {err}") from err


def compose(overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Compose and validate the full config as a plain dict (a fresh copy each call)."""
    overrides = tuple(overrides)
    _check_choices(overrides)
    cfg = _compose_cached(overrides)
    validate(cfg)
    import copy

    return copy.deepcopy(cfg)


def get(cfg: dict[str, Any], dotted: str) -> Any:
    """Look up a dotted key; a missing key is a ConfigError naming it."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key '{dotted}' is missing")
        node = node[part]
    return node


# Sub-keys left out of every slice: the method registry block is read by the workflow and the tables,
# never by a stage's computation, so relabelling a method must not rerun its evaluations.
NOT_SLICED: dict[str, tuple[str, ...]] = {"planner": ("registry",)}


def stage_slice(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of ``cfg`` a stage reads, as a plain dict keyed by dotted names."""
    if stage not in STAGE_KEYS:
        raise ConfigError(f"unknown stage '{stage}'; expected one of: {', '.join(STAGE_KEYS)}")
    out = {}
    for key in STAGE_KEYS[stage]:
        value = get(cfg, key)
        if key in NOT_SLICED:
            value = {k: v for k, v in value.items() if k not in NOT_SLICED[key]}
        out[key] = value
    return out


def _related(key: str, stage_key: str) -> bool:
    return key == stage_key or stage_key.startswith(key + ".") or key.startswith(stage_key + ".")


def stage_overrides(overrides: Iterable[str], stage: str) -> list[str]:
    """The overrides that can change what ``stage`` reads (group choices included).

    Snakemake tracks a job's command-line overrides as params, so passing a job overrides it does not
    read (a circuit setting to the dataset job, say) would rerun it for nothing.
    """
    keys = STAGE_KEYS[stage]
    kept = []
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if any(_related(key, stage_key) for stage_key in keys):
            kept.append(item)
    return kept


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def _positive_int(cfg: dict[str, Any], key: str, minimum: int = 1) -> None:
    value = get(cfg, key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        key,
        f"an integer >= {minimum}",
        value,
    )


def _in_unit_interval(cfg: dict[str, Any], key: str) -> None:
    value = get(cfg, key)
    _require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, key, "a number in [0, 1]", value)


def validate(cfg: dict[str, Any]) -> None:
    """Check the values every stage relies on, so bad settings fail before any work starts."""
    _positive_int(cfg, "seed", minimum=0)
    _positive_int(cfg, "threads")
    _require(get(cfg, "device") in ("auto", "cpu", "cuda"), "device", "one of auto, cpu, cuda", cfg["device"])
    _validate_task(cfg)
    _validate_gpt(cfg)
    _validate_pc(cfg)
    _validate_dt(cfg)
    _validate_critic(cfg)
    _validate_planner(cfg)


def _validate_task(cfg: dict[str, Any]) -> None:
    dataset = get(cfg, "task.dataset")
    if "epsilon" in dataset:
        _in_unit_interval(cfg, "task.dataset.epsilon")
    for key in ("num_episodes", "num_steps", "max_episode_steps"):
        if key in dataset:
            _positive_int(cfg, f"task.dataset.{key}")
    _in_unit_interval(cfg, "task.labels.discount")
    penalty = get(cfg, "task.labels.termination_penalty")
    _require(
        penalty is None or isinstance(penalty, (int, float)),
        "task.labels.termination_penalty",
        "null or a number",
        penalty,
    )
    _positive_int(cfg, "task.discretizer.n_bins", minimum=2)
    for field in ("observations", "actions", "rewards", "values"):
        kind = get(cfg, f"task.discretizer.{field}")
        _require(
            kind in ("categorical", "quantile"), f"task.discretizer.{field}", "categorical or quantile", kind
        )
    _positive_int(cfg, "task.pc_window")
    from trifle.planning.constraints import parse_constraint

    parse_constraint(get(cfg, "task.action_constraint"))
    from trifle.planning.dt_policy import parse_target_returns

    parse_target_returns(get(cfg, "task.dt_target_returns"), "task.dt_target_returns")


def _validate_planner(cfg: dict[str, Any]) -> None:
    """DT's conditioning targets: null (the task's list), a number, or a non-empty list of numbers."""
    from trifle.planning.methods import method

    planner = get(cfg, "planner")
    method(planner["name"]).validate(planner)  # the registry block, then the planner's own key checks
    if planner.get("method") == "dt" and planner.get("target_return") is not None:
        from trifle.planning.dt_policy import parse_target_returns

        parse_target_returns(planner["target_return"], "planner.target_return")


def _validate_gpt(cfg: dict[str, Any]) -> None:
    """The trainer owns the GPT key checks; they run here so bad values fail before any stage starts."""
    from trifle.models.gpt_training import resolve_config

    resolve_config(get(cfg, "gpt"))


def _validate_dt(cfg: dict[str, Any]) -> None:
    """The DT trainer owns its key checks, as the GPT trainer does."""
    from trifle.models.dt_training import resolve_config

    resolve_config(get(cfg, "dt"))


def _validate_critic(cfg: dict[str, Any]) -> None:
    """The IQL critic's trainer owns its key checks, as the GPT trainer does."""
    from trifle.models.iql_training import resolve_config

    resolve_config(get(cfg, "critic"))


def _validate_pc(cfg: dict[str, Any]) -> None:
    for key in ("num_latents", "epochs", "batch_size"):
        _positive_int(cfg, f"pc.{key}")
    pseudocount = get(cfg, "pc.pseudocount")
    _require(
        isinstance(pseudocount, (int, float)) and pseudocount >= 0,
        "pc.pseudocount",
        "a number >= 0",
        pseudocount,
    )
    _in_unit_interval(cfg, "pc.valid_fraction")
    backend = get(cfg, "pc.backend")
    _require(backend in ("auto", "torch", "pyjuice"), "pc.backend", "one of auto, torch, pyjuice", backend)
    structure = get(cfg, "pc.structure")
    _require(structure in ("exact-mi", "pyjuice"), "pc.structure", "one of exact-mi, pyjuice", structure)
    init = get(cfg, "pc.init")
    _require(init in ("random", "lvd"), "pc.init", "one of random, lvd", init)
    lvd = get(cfg, "pc.lvd")
    _require(isinstance(lvd, dict), "pc.lvd", "a mapping of LVD settings", lvd)
    for key in lvd:
        _positive_int(cfg, f"pc.lvd.{key}")
