"""Environment registry: build every toy task's exact MDP by name.

Names are the task vocabulary used in configs and file paths. Gymnasium registration is opt-in
(``register_envs``) and namespaced under ``trifle/`` so importing this package changes no global state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium

from trifle.envs.frozenlake import make_frozenlake
from trifle.envs.tabular import (
    PolicyEvaluation,
    TabularGymEnv,
    TabularMDP,
    VectorTabularEnv,
    evaluate_policy,
    greedy_policy,
    value_iteration,
)
from trifle.envs.taxi import make_taxi
from trifle.errors import ConfigError

MDP_BUILDERS: dict[str, Callable[..., TabularMDP]] = {
    "taxi-stochastic": make_taxi,
    "frozenlake": make_frozenlake,
}
GYM_IDS = {"taxi-stochastic": "trifle/TaxiStochastic-v0", "frozenlake": "trifle/FrozenLakeSlippery-v0"}


def make_mdp(name: str, **params: Any) -> TabularMDP:
    """Build the tabular MDP called ``name``; ``params`` go to its builder (e.g. ``slip_prob``)."""
    if name not in MDP_BUILDERS:
        raise ConfigError(f"unknown environment {name!r}; valid names: {', '.join(sorted(MDP_BUILDERS))}")
    try:
        return MDP_BUILDERS[name](**params)
    except TypeError as err:
        raise ConfigError(f"environment {name!r}: bad parameters {sorted(params)}: {err}") from err


def register_envs() -> None:
    """Register the toy tasks with gymnasium as ``trifle/...`` ids (idempotent)."""
    for name, gym_id in GYM_IDS.items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(id=gym_id, entry_point=lambda n=name, **kw: TabularGymEnv(make_mdp(n, **kw)))


__all__ = [
    "GYM_IDS",
    "MDP_BUILDERS",
    "PolicyEvaluation",
    "TabularGymEnv",
    "TabularMDP",
    "VectorTabularEnv",
    "evaluate_policy",
    "greedy_policy",
    "make_frozenlake",
    "make_mdp",
    "make_taxi",
    "register_envs",
    "value_iteration",
]
