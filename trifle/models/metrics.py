"""The training metrics file every trainer writes (``paths.<model>_metrics``), read by the `tables` stage.

One layout for all models, so the models table needs no per-model code: the keys in
:data:`REQUIRED_COLUMNS` always, the circuit's diagnostics (:data:`DIAGNOSTIC_COLUMNS`) where they apply,
and the trainer's full metrics under ``details``.
"""

from __future__ import annotations

from typing import Any

from trifle.io import write_json

REQUIRED_COLUMNS = ("task", "model", "seed", "train_ll_per_token", "heldout_ll_per_token", "train_seconds")
# The circuit's conditionals against the data (trifle.models.circuits.diagnostics); empty for other models.
DIAGNOSTIC_COLUMNS = ("reward_tv", "q_within_state_corr", "value_calibration_error", "value_corr")
MODEL_COLUMNS = REQUIRED_COLUMNS + DIAGNOSTIC_COLUMNS


def write_model_metrics(
    cfg: dict[str, Any],
    model: str,
    metrics: dict[str, Any],
    *,
    train_ll: float | None,
    heldout_ll: float | None,
    **extra: Any,
) -> None:
    """Write a training stage's ``paths.<model>_metrics`` file in the layout the `tables` stage tabulates."""
    write_json(
        cfg["paths"][f"{model}_metrics"],
        {
            "task": cfg["task"]["name"],
            "model": model,
            "seed": cfg["seed"],
            **extra,
            "train_ll_per_token": train_ll,
            "heldout_ll_per_token": heldout_ll,
            "train_seconds": metrics["seconds"],
            "details": metrics,
        },
    )
