"""Training curves: one CSV row per evaluation of a training run, written beside its checkpoint.

The curve is derived from the run's metrics (``details.history`` of ``<checkpoint>.metrics.json``), not
logged by the training loop. Every trainer already keeps that history: one record per evaluation with the
step, the running training loss since the previous evaluation and the evaluation's scores, carried through
its partial checkpoints (``training_loop``; the circuit's per-epoch records, ``circuits.training``). A
resumed run therefore has exactly the history of an uninterrupted one, the rows an interrupted call had
evaluated after its last partial checkpoint included or not, and so the same curve. Deriving it adds no
evaluation, no random draw and no file that an interrupted training would leave behind (it leaves only its
partial checkpoint, as before): the trained numbers cannot change.

Columns: ``step``, ``train_loss``, then ``heldout_ll`` and ``train_ll`` (the models' log-likelihoods per
token, the circuit's per variable, renamed from the metrics' ``*_ll_per_token`` / ``*_ll_per_var`` so that
every curve has the same column names), then the model's other scores under their metrics names, sorted
(DT's ``heldout_loss`` and accuracies, the critic's ``heldout_td_rmse`` ...). Columns that are empty in every row
(a continuous DT has no likelihood) are left out. Floats keep full precision, so the curve's last row
equals the metrics file's final scores exactly.

The circuit trains by EM, one update per epoch, and evaluates held-out data only once, after the last
epoch: its curve is ``step`` = EM epochs done, ``train_ll`` = the training data's log-likelihood per
variable under those parameters (which the next epoch's E-step computes anyway), ``train_loss`` its
negation, and ``heldout_ll`` on the last row only.

Command line (the workflow's training rules): ``python -m trifle.models.curves METRICS_JSON CURVE_CSV``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trifle.errors import DataError, TrifleError
from trifle.io import atomic_path, read_json

#: The curve of ``<name>.pt`` (or ``.jpc``) is ``<name>.curve.csv``, beside its ``<name>.metrics.json``.
CURVE_SUFFIX = ".curve.csv"
#: Metrics keys renamed in the curve, so the likelihood columns are named alike for every model.
RENAMED = {
    "train_ll_per_token": "train_ll",
    "heldout_ll_per_token": "heldout_ll",
    "train_ll_per_var": "train_ll",
    "heldout_ll_per_var": "heldout_ll",
}
#: Leading columns, in this order where present; the model's other scores follow in history order.
LEADING = ("step", "train_loss", "heldout_ll", "train_ll")


def curve_path(checkpoint: str | Path) -> Path:
    """Where the curve of ``checkpoint`` goes: its name with the model suffix replaced by ``.curve.csv``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CURVE_SUFFIX)


def _details(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    """A trainer's metrics, given either those or a metrics file (which holds them under ``details``)."""
    details = metrics.get("details", metrics)
    if isinstance(details, Mapping) and details.get("completed") is False:
        raise DataError("metrics: the training is not complete (a call that stopped early has no curve)")
    if not isinstance(details, Mapping) or not isinstance(details.get("history"), list):
        raise DataError("metrics: no evaluation history ('history' list), expected a trainer's metrics")
    return details


def _circuit_records(details: Mapping[str, Any]) -> list[dict[str, Any]]:
    """EM epochs as records: each epoch's E-step log-likelihood is that of the parameters before it."""
    records = [
        {"step": int(h["epoch"]) - 1, "train_ll_per_var": h["train_ll_per_var"]} for h in details["history"]
    ]
    final = {"step": int(details["epochs"]), "train_ll_per_var": details["train_ll_per_var"]}
    records.append({**final, "heldout_ll_per_var": details["heldout_ll_per_var"]})
    for record in records:
        record["train_loss"] = -record["train_ll_per_var"]
    return records


def curve_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The curve's rows (column name -> value; None where a row has no value) of a completed training.

    ``metrics`` is a trainer's returned metrics or the metrics file the training stage writes from them.
    Time is left out (the circuit's history records its seconds): a resumed run's curve must equal an
    uninterrupted one's.
    """
    details = _details(metrics)
    circuit = "heldout_ll_per_var" in details
    records = _circuit_records(details) if circuit else details["history"]
    rows = [
        {RENAMED.get(key, key): value for key, value in record.items() if key not in ("seconds", "epoch")}
        for record in records
    ]
    for row in rows:
        if "step" not in row or "train_loss" not in row:
            raise DataError(f"metrics: history record {row} lacks 'step' or 'train_loss'")
    return rows


def curve_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``LEADING`` first, then the other keys sorted (the metrics file stores its records' keys sorted, the
    trainer's dicts in their own order: both give the same curve); keys empty in every row dropped."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    present = [c for c in seen if any(_cell(row.get(c)) != "" for row in rows)]
    return [c for c in LEADING if c in present] + sorted(c for c in present if c not in LEADING)


def _cell(value: Any) -> str:
    """Full precision (``repr`` of a float round-trips), so the curve equals the metrics exactly; None and
    NaN (no value) are empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def curve_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The curve as CSV text (header, one line per evaluation)."""
    columns = curve_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(c)) for c in columns] for row in rows)
    return buffer.getvalue()


def write_curve(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write the curve of ``metrics`` (see :func:`curve_rows`) at ``path``, atomically; returns ``path``."""
    text = curve_csv(curve_rows(metrics))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_curve(path: str | Path) -> list[dict[str, float | None]]:
    """A curve file's rows as numbers (None for an empty cell); a file that is not a curve is a DataError."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as err:
        raise DataError(f"{path}: cannot read the training curve ({err})") from err
    if "step" not in columns:
        raise DataError(f"{path}: not a training curve (no 'step' column; columns: {columns})")
    try:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in rows]
    except ValueError as err:
        raise DataError(f"{path}: a training curve holds numbers only ({err})") from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trifle.models.curves",
        description="Write the training curve (CSV) of a training stage's metrics file.",
    )
    parser.add_argument("metrics", type=Path, help="the stage's metrics file (<checkpoint>.metrics.json)")
    parser.add_argument("curve", type=Path, help="the curve to write (<checkpoint>.curve.csv)")
    args = parser.parse_args(argv)
    try:
        write_curve(args.curve, read_json(args.metrics))
    except TrifleError as err:
        print(f"trifle curves: error: {args.metrics}: {err}", file=sys.stderr)
        return 1
    print(f"trifle curves: wrote {args.curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
