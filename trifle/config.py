"""Hydra composition, validation and per-stage config slices.

Hydra owns every hyperparameter. Snakemake composes the same config at DAG-build time and passes
each job only the slice its stage reads (``stage_slice``), so a changed hyperparameter reruns exactly
the jobs that read it. Composition is memoised because a DAG composes once per job.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trifle.errors import ConfigError

CONF_DIR = Path(__file__).parent / "conf"
GROUPS = ("task", "gpt", "pc", "dt", "critic", "aux", "planner", "eval")

# Which top-level keys (dotted) each stage reads. The paths are excluded on purpose: Snakemake tracks
# files itself, and a path change must not look like a hyperparameter change.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("task.name", "task.env", "task.dataset"),
    "labels": ("task.name", "task.labels"),
    "tokens": ("task.name", "task.discretizer"),
    "train_gpt": ("task.name", "gpt", "seed", "device"),
    "train_pc": ("task.name", "pc", "task.pc_window", "task.labels.discount", "seed"),
    # A released model (workflow `protocol: pretrained`) checked against the task's tokens and labels and
    # scored on the training split's episodes as the trainers score theirs.
    "import_gpt": ("task.name", "task.labels", "gpt.valid_fraction", "gpt.eval_windows", "seed"),
    "import_pc": ("task.name", "task.pc_window", "task.labels.discount", "pc.valid_fraction", "seed"),
    "train_dt": ("task.name", "dt", "seed", "device"),
    "train_critic": ("task.name", "critic", "task.labels.discount", "seed", "device"),
    # The optimality score's return models: G_t = r_t + gamma V_t needs the discount.
    "train_aux": ("task.name", "aux", "task.labels.discount", "seed", "device"),
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
        # The GPT's architecture, checked against the checkpoint (trifle.models.gpt_checkpoint): the job
        # must compose the config the GPT was trained with, or it would refuse a correct checkpoint.
        "gpt.n_layer",
        "gpt.n_head",
        "gpt.n_embd",
        "gpt.seq_transitions",
        "gpt.value_inputs",
    ),
    "tables": (),
    "summary": (),
    "mujoco_tables": (),
    "ablation_table": (),
    # Scores a run's executed steps with its task's return models (the task and seed are checked against
    # the evaluation record; the method is the record's).
    "optimality": ("task.name", "seed", "device"),
    "optimality_table": (),
}

# The `paths.*` keys each stage writes, its primary output (the one `run` returns) first. The command line
# checks them all before the stage starts (trifle.runinfo.prepare_outputs), so an output that cannot be
# written fails at once, not after the training.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": ("raw",),
    "labels": ("labeled",),
    "tokens": ("tokens",),
    "train_gpt": ("gpt", "gpt_metrics"),
    "train_pc": ("pc", "pc_metrics"),
    "import_gpt": ("gpt", "gpt_metrics"),
    "import_pc": ("pc", "pc_metrics"),
    "train_dt": ("dt", "dt_metrics"),
    "train_critic": ("critic", "critic_metrics"),
    "train_aux": ("aux", "aux_metrics"),
    "evaluate": ("eval", "eval_steps"),
    "tables": ("models_table",),
    "summary": ("summary_table", "returns_figure"),
    "mujoco_tables": ("mujoco_table", "safe_table", "scores_figure"),
    "ablation_table": ("ablation_table", "ablation_figure"),
    "optimality": ("optimality",),
    "optimality_table": ("optimality_table", "optimality_figure"),
}


# The `paths.*` files each stage reads whose provenance it checks (trifle.runinfo.check_inputs): each
# input's `.run.json` names the files that input was made from, and where this job reads one of them
# too, it must be the same file. `evaluate` reads what its method's registry entry needs.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "labels": ("raw",),
    "tokens": ("labeled",),
    "train_gpt": ("tokens",),
    "train_pc": ("tokens",),
    "import_gpt": ("tokens",),
    "import_pc": ("tokens",),
    "train_dt": ("labeled",),
    "train_critic": ("labeled",),
    "train_aux": ("tokens", "labeled"),
    "optimality": ("eval", "eval_steps", "aux_state", "aux_action"),
}


def available(group: str) -> list[str]:
    """Names of the configs of a Hydra group (files starting with `_` are shared bases, not choices)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _check_choices(overrides: Sequence[str]) -> None:
    """Turn an unknown group choice into a message that lists the valid names."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") in GROUPS and value not in _choices(key.lstrip("+~")):
            raise ConfigError(
                f"unknown {key} '{value}' (override '{item}'); expected one of: {', '.join(available(key))}"
            )


# --- Composition -------------------------------------------------------------------------------
# A DAG composes once per job (2,000+ calls for the paper config), and a full Hydra compose costs
# 0.2-0.5 s: it re-reads and re-merges every YAML file and Hydra's own config each time. Almost all of
# a job's overrides are plain `key=value` settings (seed, gpt.steps, an ablation value) on top of a
# handful of distinct group selections (task, planner, ...), so the fast path composes each distinct
# group selection once with Hydra, keeps it unresolved, and applies the plain overrides to a copy.
# Anything whose Hydra semantics it cannot reproduce exactly falls back to the full Hydra compose.

# `TRIFLE_COMPOSE=hydra` selects the old path (one full Hydra compose per distinct override list), for
# comparisons (benchmarks/dag_build.py) and as an escape hatch; anything else is the fast path.
COMPOSE_MODE_ENV = "TRIFLE_COMPOSE"
# A directory for the unresolved group selections, shared between processes (the workflow sets it to
# .snakemake/trifle-compose, so a no-op rerun composes nothing with Hydra); unset: memory only.
COMPOSE_CACHE_ENV = "TRIFLE_COMPOSE_CACHE"
_CACHE_FORMAT = "1"
# `${a.b.c}` with plain identifiers: the only interpolation the plain-dict resolver handles itself.
_NODE_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_PRIMITIVES = (str, int, float, bool, type(None))


@functools.cache
def _choices(group: str) -> frozenset[str]:
    """`available(group)` once per process: the choice check runs for every distinct override list, and
    globbing the group directory each time cost a DAG build about a second."""
    return frozenset(available(group))


class _NotPlain(Exception):
    """The fast path cannot reproduce this step exactly; OmegaConf / Hydra must do it."""


def _hydra_dictconfig(overrides: Sequence[str]) -> Any:
    """One full Hydra compose, unresolved (the DictConfig `hydra.compose` returns)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def _compose_error(overrides: Sequence[str], err: Exception) -> ConfigError:
    return ConfigError(f"cannot compose the config with overrides {list(overrides)}: {err}")


def _compose_hydra(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The reference path: a full Hydra compose of the whole override list, resolved to a plain dict.

    The fast path must equal it (tests/test_compose_cache.py); it also serves every override list the
    fast path cannot split, and `TRIFLE_COMPOSE=hydra`.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(_hydra_dictconfig(overrides), resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as err:
        raise _compose_error(overrides, err) from err


@functools.cache
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def _parse_override(text: str) -> Any:
    """Hydra's own parse of one override (cached: a DAG repeats the same few hundred strings).

    The returned Override is shared: callers copy its value before storing it anywhere.
    """
    return _override_parser().parse_overrides([text])[0]


def _is_group(key: str) -> bool:
    """Whether Hydra's defaults list, not the config, handles an override of ``key``.

    Hydra asks its config sources (`group_exists`): a directory under trifle/conf (so every group,
    including ones added to GROUPS later, without a list kept here) or a ConfigStore group.
    """
    from hydra.core.config_store import ConfigStore

    return (CONF_DIR / key).is_dir() or isinstance(ConfigStore.instance().repo.get(key), dict)


def _split_overrides(overrides: tuple[str, ...]) -> tuple[tuple[str, ...], list[Any]] | None:
    """(group overrides as text, config overrides parsed) as Hydra splits them, or None to fall back.

    Group overrides (any form: `planner=tt`, `+g=x`, `~g`) only shape the defaults list, and Hydra
    applies the config overrides after composing it, in order; so composing the group overrides alone
    and then applying the others is the same computation. Parse errors, sweeps, `key@package=` and
    anything touching Hydra's own `hydra` node fall back, so Hydra raises its own error.
    """
    from hydra.errors import HydraException

    groups: list[str] = []
    plain: list[Any] = []
    for text in overrides:
        try:
            override = _parse_override(text)
        except HydraException:
            return None
        if override.is_sweep_override() or override.package is not None:
            return None
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key:
            return None
        if not isinstance(override.value(), dict) and _is_group(key):
            groups.append(text)
        else:
            plain.append(override)
    return tuple(groups), plain


@functools.lru_cache(maxsize=1024)
def _hydra_base(groups: tuple[str, ...]) -> Any:
    """The unresolved Hydra composition of a group selection (shared: copy before changing it)."""
    return _hydra_dictconfig(groups)


def _untyped(node: Any, root: bool = True) -> bool:
    """Whether every node is what YAML gives (untyped dicts, lists and AnyNode values, no flags but the
    root's struct mode), i.e. whether a plain-dict assignment does what OmegaConf's would."""
    from omegaconf import AnyNode, DictConfig, ListConfig

    meta = node._metadata
    if meta.flags != ({"struct": True} if root else {}) or meta.ref_type is not Any:
        return False
    if isinstance(node, DictConfig):
        if meta.object_type is not dict or meta.key_type is not Any or meta.element_type is not Any:
            return False
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return False
        return all(_untyped(node._get_node(key), root=False) for key in node)
    if isinstance(node, ListConfig):
        if meta.object_type is not list or meta.element_type is not Any:
            return False
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return False
        return all(_untyped(node._get_node(i), root=False) for i in range(len(node)))
    return type(node) is AnyNode


def _plain_json(value: Any) -> bool:
    """Whether JSON stores ``value`` exactly (str keys; str, int, finite float, bool, None leaves)."""
    import math

    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return isinstance(value, (str, int, bool, type(None))) or (
        isinstance(value, float) and math.isfinite(value)
    )


@functools.cache
def _conf_state() -> str:
    """A digest of everything a group selection's composition reads: the config files (names and
    bytes, empty group directories too) and the Hydra / OmegaConf versions. A disk-cache entry is only
    used under the digest it was written with, so editing any config file invalidates all of them."""
    import importlib.util

    import hydra
    import omegaconf

    digest = hashlib.sha256(f"{_CACHE_FORMAT}\0{hydra.__version__}\0{omegaconf.__version__}\0".encode())
    # Hydra plugins can add config sources (none are installed; if one is, its name keys the cache).
    spec = importlib.util.find_spec("hydra_plugins")
    for location in (spec.submodule_search_locations or []) if spec else []:
        digest.update(repr(sorted(os.listdir(location))).encode())
    for path in sorted(CONF_DIR.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        name = path.relative_to(CONF_DIR).as_posix().encode()
        data = path.read_bytes() if path.is_file() else b"<dir>"
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:24]


def _cache_file(groups: tuple[str, ...]) -> Path | None:
    root = os.environ.get(COMPOSE_CACHE_ENV)
    if not root:
        return None
    from hydra.core.config_store import ConfigStore

    # Structured configs registered in this process are no file: with any, the disk cache is off.
    if set(ConfigStore.instance().repo) - {"hydra", "_dummy_empty_config_.yaml"}:
        return None
    key = hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:32]
    return Path(root) / _conf_state() / f"{key}.json"


def _read_cache(path: Path, groups: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("groups") != list(groups)
        or not isinstance(entry.get("config"), dict)
    ):
        return None
    return entry["config"]


def _write_cache(path: Path, groups: tuple[str, ...], config: dict[str, Any]) -> None:
    """Best effort (a cache): atomic rename, so concurrent writers and readers never see half a file.
    The entries of earlier config states are removed when the first entry of a new one is written
    (only directories this function wrote: digest-named, holding nothing but entries)."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.parent.iterdir():
                if (
                    stale != path.parent
                    and stale.is_dir()
                    and len(stale.name) == len(path.parent.name)
                    and all(c in "0123456789abcdef" for c in stale.name)
                    and all(p.is_file() and p.name.endswith((".json", ".tmp")) for p in stale.iterdir())
                ):
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"groups": list(groups), "config": config}))
        os.replace(tmp, path)
    except OSError:
        pass


@functools.lru_cache(maxsize=1024)
def _plain_base(groups: tuple[str, ...]) -> dict[str, Any] | None:
    """The unresolved composition of a group selection as a plain dict (`${...}` kept as text), or None
    when it holds typed nodes a plain assignment would not reproduce (then OmegaConf applies overrides).
    Read from the disk cache when one is set and holds it."""
    from omegaconf import OmegaConf

    path = _cache_file(groups)
    if path is not None and (cached := _read_cache(path, groups)) is not None:
        return cached
    base = _hydra_base(groups)
    if not _untyped(base):
        return None
    plain = OmegaConf.to_container(base, resolve=False)
    if path is not None and _plain_json(plain):
        _write_cache(path, groups, plain)  # type: ignore[arg-type]
    return plain  # type: ignore[return-value]


def _assign(cfg: dict[str, Any], override: Any) -> None:
    """Apply a plain `key=value` as Hydra does (OmegaConf.update with merge) where that is a plain set:
    an existing, non-dict key under dicts only, a primitive or a list of primitives; else _NotPlain."""
    if override.is_delete() or override.is_add() or override.is_force_add():
        raise _NotPlain
    value = override.value()
    if not isinstance(value, _PRIMITIVES) and not (
        isinstance(value, list) and all(isinstance(v, _PRIMITIVES) for v in value)
    ):
        raise _NotPlain
    *parents, last = override.key_or_group.split(".")
    node: Any = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node or isinstance(node[last], dict):
        raise _NotPlain
    if isinstance(node[last], list) and not isinstance(value, list):
        raise _NotPlain
    node[last] = list(value) if isinstance(value, list) else value


def _resolve_plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """Resolve the `${a.b}` interpolations of a plain dict in place, as OmegaConf.to_container(resolve=
    True) would: a lone interpolation takes the referenced value as is, others are concatenated as
    str(). Anything else (resolvers, relative keys, escapes, references to containers or `???`,
    cycles) raises _NotPlain, and OmegaConf resolves the whole config instead."""
    done: dict[str, Any] = {}

    def lookup(key: str, active: frozenset[str]) -> Any:
        if key in done:
            return done[key]
        if key in active:
            raise _NotPlain
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise _NotPlain
            node = node[part]
        if isinstance(node, (dict, list)) or node == "???":
            raise _NotPlain
        done[key] = value = resolve(node, active | {key})
        return value

    def resolve(value: Any, active: frozenset[str]) -> Any:
        if not isinstance(value, str) or "${" not in value:
            return value
        pieces = _NODE_INTERPOLATION.split(value)
        texts, keys = pieces[0::2], pieces[1::2]
        if "\\" in value or any(c in text for text in texts for c in "${}"):
            raise _NotPlain
        if len(keys) == 1 and texts == ["", ""]:
            return lookup(keys[0], active)
        out = texts[0]
        for key, text in zip(keys, texts[1:], strict=True):
            out += str(lookup(key, active)) + text
        return out

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, (dict, list)):
                walk(value)
            else:
                node[key] = resolve(value, frozenset())

    walk(cfg)
    return cfg


def _plain_copy(value: Any) -> Any:
    """A deep copy of plain containers (several times faster than copy.deepcopy on config dicts)."""
    if isinstance(value, dict):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_copy(item) for item in value]
    return value if isinstance(value, _PRIMITIVES) else copy.deepcopy(value)


@functools.lru_cache(maxsize=8192)
def _compose_cached(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The fast path: the group selection's unresolved composition (Hydra, once per selection), the
    config overrides applied as plain assignments and the `${a.b}` interpolations resolved in plain
    Python where that is exact; otherwise OmegaConf does both steps with Hydra's own override
    application (`ConfigLoaderImpl._apply_overrides_to_config`) on a copy of the composed DictConfig, and
    override lists Hydra must see whole go to `_compose_hydra`. Errors read as `_compose_hydra`'s."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    split = _split_overrides(overrides)
    if split is None:
        return _compose_hydra(overrides)
    groups, plain = split
    try:
        base = _plain_base(groups)
        if base is not None:
            try:
                cfg = _plain_copy(base)
                for override in plain:
                    _assign(cfg, override)
                return _resolve_plain(cfg)
            except _NotPlain:
                pass
        config = copy.deepcopy(_hydra_base(groups))
        ConfigLoaderImpl._apply_overrides_to_config(plain, config)
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as err:
        raise _compose_error(overrides, err) from err


@functools.lru_cache(maxsize=8192)
def _compose_hydra_cached(overrides: tuple[str, ...]) -> dict[str, Any]:
    """`TRIFLE_COMPOSE=hydra`: the old path, memoised per override list as it was."""
    return _compose_hydra(overrides)


def compose(overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Compose and validate the full config as a plain dict (a fresh copy each call).

    Validation runs on every call, not once per list: it reads the method registry, which tests swap.
    """
    overrides = tuple(overrides)
    _check_choices(overrides)
    hydra_only = os.environ.get(COMPOSE_MODE_ENV, "") == "hydra"
    try:
        cfg = _compose_hydra_cached(overrides) if hydra_only else _compose_cached(overrides)
    except ConfigError as err:
        better = _unknown_key_message(overrides, str(err))
        if better is None:
            raise
        raise ConfigError(better) from err
    validate(cfg)
    return _plain_copy(cfg)


def _unknown_key_message(overrides: tuple[str, ...], message: str) -> str | None:
    """For ``gpt.foo=1`` Hydra says only "Could not override 'gpt.foo'" and suggests ``+gpt.foo=1``, which
    would then fail as an unknown key: say at once that the key is unknown and list the known ones."""
    found = re.search(r"Could not override '([\w.]+)'", message)
    if not found:
        return None
    key = found.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = tuple(o for o in overrides if o.partition("=")[0].lstrip("+~") != key)
    try:
        node: Any = _compose_cached(rest)
    except ConfigError:
        return None
    for part in parent.split(".") if parent else ():
        if not isinstance(node, dict) or part not in node:
            return f"{key}: unknown key ({parent} is not a section of the config)"
        node = node[part]
    if not isinstance(node, dict):
        return None
    where = parent or "the top level"
    return f"{key}: unknown key; known keys of {where}: {', '.join(sorted(map(str, node)))}"


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


def stage_outputs(cfg: dict[str, Any], stage: str) -> dict[str, Path]:
    """The paths a stage writes, keyed ``paths.<name>``; a null one (``eval_steps``: beside the record) is
    left out, since its default lies beside another output."""
    return {f"paths.{key}": Path(cfg["paths"][key]) for key in STAGE_OUTPUTS[stage] if cfg["paths"].get(key)}


def stage_inputs(cfg: dict[str, Any], stage: str) -> dict[str, Path]:
    """The input files a stage reads (:data:`STAGE_INPUTS`; for ``evaluate``, the method's registry
    ``needs``), keyed by their ``paths.*`` name; a null path is left out."""
    if stage == "evaluate":
        from trifle.planning.methods import method

        names: tuple[str, ...] = method(cfg["planner"]["name"]).needs
    else:
        names = STAGE_INPUTS.get(stage, ())
    return {key: Path(cfg["paths"][key]) for key in names if cfg["paths"].get(key)}


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
    _validate_aux(cfg)
    _validate_eval(cfg)
    _validate_planner(cfg)


def _validate_eval(cfg: dict[str, Any]) -> None:
    """The rollout budget: checked here, so ``eval.episodes=abc`` fails when the DAG is built rather than
    in the evaluate job after every model has trained."""
    _positive_int(cfg, "eval.episodes")
    _positive_int(cfg, "eval.batch_episodes")
    if get(cfg, "eval.max_episode_steps") is not None:
        _positive_int(cfg, "eval.max_episode_steps")


def _validate_task(cfg: dict[str, Any]) -> None:
    dataset = get(cfg, "task.dataset")
    if dataset.get("generator") == "minari":
        from trifle.data.minari_datasets import check_options

        check_options(dataset)
    if "epsilon" in dataset:
        _in_unit_interval(cfg, "task.dataset.epsilon")
    for key in ("num_episodes", "num_steps", "max_episode_steps"):
        if key in dataset:
            _positive_int(cfg, f"task.dataset.{key}")
    # A malformed checksum would otherwise be blamed on the file after a whole download.
    digest = dataset.get("sha256")
    _require(
        digest is None or (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None),
        "task.dataset.sha256",
        "null or 64 lowercase hexadecimal characters",
        digest,
    )
    if dataset.get("size") is not None:
        _positive_int(cfg, "task.dataset.size")
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
    from trifle.data.discretize import QUANTILE_RULES

    rule = get(cfg, "task.discretizer.quantile")
    _require(rule in QUANTILE_RULES, "task.discretizer.quantile", " or ".join(QUANTILE_RULES), rule)
    _positive_int(cfg, "task.pc_window")
    from trifle.planning.constraints import parse_constraint

    parse_constraint(get(cfg, "task.action_constraint"))
    from trifle.planning.dt_targets import parse_target_returns

    parse_target_returns(get(cfg, "task.dt_target_returns"), "task.dt_target_returns")


def _validate_planner(cfg: dict[str, Any]) -> None:
    """DT's conditioning targets: null (the task's list), a number, or a non-empty list of numbers."""
    from trifle.planning.methods import method

    planner = get(cfg, "planner")
    method(planner["name"]).validate(planner)  # the registry block, then the planner's own key checks
    if planner.get("method") == "dt" and planner.get("target_return") is not None:
        from trifle.planning.dt_targets import parse_target_returns

        parse_target_returns(planner["target_return"], "planner.target_return")


def _validate_gpt(cfg: dict[str, Any]) -> None:
    """The trainer's settings module owns the GPT key checks; they run here so bad values fail before any
    stage starts. Like every check here it imports no torch: the workflow composes a config per job."""
    from trifle.models.gpt_settings import resolve_config

    resolve_config(get(cfg, "gpt"))


def _validate_dt(cfg: dict[str, Any]) -> None:
    """The DT trainer's settings module owns its key checks, as the GPT trainer's does."""
    from trifle.models.dt_settings import resolve_config

    resolve_config(get(cfg, "dt"))


def _validate_critic(cfg: dict[str, Any]) -> None:
    """The IQL critic's trainer's settings module owns its key checks, as the GPT trainer's does."""
    from trifle.models.iql_settings import resolve_config

    resolve_config(get(cfg, "critic"))


def _validate_aux(cfg: dict[str, Any]) -> None:
    """The return models' trainer's settings module owns their key checks, as the GPT trainer's does."""
    from trifle.models.aux_settings import resolve_config

    resolve_config(get(cfg, "aux"))


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
