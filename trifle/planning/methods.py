"""The method registry: each evaluated method is declared once, in its planner config file.

A method is a file ``trifle/conf/planner/<name>.yaml``. Besides the planner's settings it has a
``registry`` block that everything outside the planner reads, so no other layer compares method names:

    registry:
      policy: trifle.planning.planners:beam_policies   # module:function building the policies
      needs: [tokens, gpt, pc]       # inputs the evaluate job is given, as paths.<name>
      label: s-Trifle                # name in tables and figures
      order: 30                      # position in tables and figures (then by name)
      tables: [summary, mujoco]      # which result tables list it
      reference: false               # the one method every other is compared with, episode by episode
      validate: trifle.planning.planner_settings:validate_planner  # optional: the settings check

``validate`` (optional) names a function checking the planner settings, ``(planner_cfg) -> None``, that
config composition runs on every composed config, so a bad value fails when the workflow builds its DAG.
It must not load a model, and its module must not import torch (the workflow composes a config per job):
it lives beside the policy's module, not in it (trifle.planning.planner_settings for the beam planners).

The policy function takes ``(cfg, device)`` (the composed config, ``paths.*`` filled by the workflow)
and returns ``[(target, Policy), ...]``: one entry, target ``None``, for a planner; one per conditioning
target for a return-conditioned policy such as DT. The workflow gives the evaluate job exactly the
``needs`` inputs and fingerprints the evaluate stage together with the policy's module (which the stage
loads by name); the tables read ``label``, ``order``, ``tables`` and ``reference``.

The block is read straight from the YAML files (following their ``defaults`` chain within the planner
group, as Hydra does), so the tables can be written without composing a config, and it is left out of
the evaluate stage's config slice: relabelling or reordering a method reruns no evaluation.

Table names: ``summary`` (the discrete toy tasks' table), ``mujoco`` (the Gym-MuJoCo score table),
``constrained`` (the action-constrained Gym-MuJoCo table), ``optimality`` (the inference-time optimality
score: the workflow scores the method's runs where its config turns the score on).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trifle.errors import ConfigError

PLANNER_DIR = Path(__file__).resolve().parents[1] / "conf" / "planner"
#: Inputs an evaluate job can be given (the workflow maps each to its file).
INPUTS = ("tokens", "labeled", "gpt", "pc", "dt", "critic")
TABLES = ("summary", "mujoco", "constrained", "optimality")
REGISTRY_KEYS = ("policy", "needs", "label", "order", "tables", "reference")
#: Registry keys a method may leave out.
OPTIONAL_REGISTRY_KEYS = ("validate",)


@dataclass(frozen=True)
class Method:
    """One evaluated method, as its planner config file declares it."""

    name: str
    algorithm: str  # planner.method: the planner family the policy function builds
    policy: str  # "module:function"
    needs: tuple[str, ...]
    label: str
    order: int
    tables: tuple[str, ...]
    reference: bool
    constrained: bool
    validator: str | None = None  # registry.validate: "module:function", or None

    @property
    def module(self) -> str:
        """The module holding the policy function (the evaluate stage's fingerprint includes it)."""
        return self.policy.partition(":")[0]

    def validate(self, planner_cfg: dict[str, Any]) -> None:
        """Check the planner settings without loading a model: the method's ``registry.validate`` function,
        if it has one. Config composition runs it, so a bad value fails at DAG build; it imports only the
        validator's module (torch-free), never the policy's."""
        if self.validator is not None:
            _load(self.name, "validate", self.validator)(planner_cfg)

    def policy_function(self) -> Callable[[dict[str, Any], str], list[tuple[float | None, Any]]]:
        return _load(self.name, "policy", self.policy)


def _load(name: str, key: str, target: str) -> Callable[..., Any]:
    """The function ``module:function`` of ``registry.<key>`` of method ``name``; a ConfigError naming the
    file if it cannot be loaded."""
    module, _, function = target.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{PLANNER_DIR / name}.yaml: registry.{key} {target!r} cannot be loaded ({exc})"
        ) from exc


def _raw(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The planner file ``name`` merged over its ``defaults`` (later entries and ``_self_`` win)."""
    path = PLANNER_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_methods()) or "none"
        raise ConfigError(f"planner {name!r}: no file {path}; known methods: {known}")
    if name in chain:
        raise ConfigError(f"{path}: defaults form a cycle {' -> '.join((*chain, name))}")
    data = yaml.safe_load(path.read_text()) or {}
    merged: dict[str, Any] = {}
    own = {k: v for k, v in data.items() if k != "defaults"}
    defaults = data.get("defaults", ["_self_"])
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    for entry in defaults:
        part = own if entry == "_self_" else _raw(entry, (*chain, name))
        for key, value in part.items():
            if key == "registry" and isinstance(value, dict):
                merged["registry"] = {**merged.get("registry", {}), **value}
            else:
                merged[key] = value
    return merged


def available_methods() -> list[str]:
    return sorted(p.stem for p in PLANNER_DIR.glob("*.yaml") if not p.stem.startswith("_"))


@functools.cache
def method(name: str) -> Method:
    """The registry entry of planner config ``name``; a malformed block is one error naming the file."""
    raw = _raw(name)
    where = f"{PLANNER_DIR / name}.yaml"
    reg = raw.get("registry")
    if not isinstance(reg, dict):
        raise ConfigError(f"{where}: missing the 'registry' block (keys: {', '.join(REGISTRY_KEYS)})")
    unknown = sorted(set(reg) - set(REGISTRY_KEYS) - set(OPTIONAL_REGISTRY_KEYS))
    missing = [k for k in REGISTRY_KEYS if k not in reg]
    if unknown or missing:
        raise ConfigError(f"{where}: registry keys unknown {unknown} / missing {missing}")
    policy, needs, tables = reg["policy"], reg["needs"], reg["tables"]
    validator = reg.get("validate")
    for key, target in (("policy", policy), ("validate", validator)):
        if (key == "policy" or target is not None) and (
            not isinstance(target, str) or target.count(":") != 1
        ):
            raise ConfigError(f"{where}: registry.{key} = {target!r}: expected 'module:function'")
    if not isinstance(needs, list) or not set(needs) <= set(INPUTS):
        raise ConfigError(f"{where}: registry.needs = {needs!r}: expected a list of {', '.join(INPUTS)}")
    if not isinstance(tables, list) or not set(tables) <= set(TABLES):
        raise ConfigError(f"{where}: registry.tables = {tables!r}: expected a list of {', '.join(TABLES)}")
    if not isinstance(reg["order"], int) or isinstance(reg["order"], bool):
        raise ConfigError(f"{where}: registry.order = {reg['order']!r}: expected an integer")
    if not isinstance(reg["label"], str) or not reg["label"]:
        raise ConfigError(f"{where}: registry.label = {reg['label']!r}: expected a non-empty string")
    if not isinstance(reg["reference"], bool):
        raise ConfigError(f"{where}: registry.reference = {reg['reference']!r}: expected true or false")
    if raw.get("name") != name:
        raise ConfigError(f"{where}: name = {raw.get('name')!r}: expected the file's name {name!r}")
    return Method(
        name=name,
        algorithm=str(raw.get("method")),
        policy=policy,
        needs=tuple(needs),
        label=reg["label"],
        order=reg["order"],
        tables=tuple(tables),
        reference=reg["reference"],
        constrained=bool(raw.get("constrained", False)),
        validator=validator,
    )


def sort_key(name: str) -> tuple[int, str]:
    """Table and figure order: the registry's ``order``, then the name; unknown names last."""
    try:
        return (method(name).order, name)
    except ConfigError:
        return (10**9, name)


def reference_method() -> str | None:
    """The method others are compared with episode by episode (``registry.reference``), if any."""
    refs = [m for m in available_methods() if method(m).reference]
    if len(refs) > 1:
        raise ConfigError(f"planner configs: registry.reference is true for several methods {refs}")
    return refs[0] if refs else None


def methods_in(table: str, names: list[str] | None = None) -> list[str]:
    """The methods (of ``names``, default all) a table lists, in display order."""
    if table not in TABLES:
        raise ConfigError(f"table {table!r}: expected one of {', '.join(TABLES)}")
    pool = available_methods() if names is None else names
    return sorted((m for m in pool if table in method(m).tables), key=sort_key)
