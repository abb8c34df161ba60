"""Training curves (trifle.models.curves): a resumed training's curve is the uninterrupted one's, and the
curve holds exactly the scores the trainer reports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trifle.errors import DataError
from trifle.models import training_loop
from trifle.models.circuits import train_circuit
from trifle.models.circuits import training as circuit_training
from trifle.models.curves import curve_csv, curve_path, curve_rows, read_curve, write_curve
from trifle.models.gpt_training import train_gpt
from trifle.models.metrics import write_model_metrics

OBS, ACT, VOCAB = 3, 2, 11
D = OBS + ACT + 2
GPT_CFG = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "seq_transitions": 2,
    "batch_size": 8,
    "steps": 6,
    "warmup_steps": 2,
    "valid_fraction": 0.34,
    "eval_every": 1,  # every step: a crash lands between an evaluation and the next partial checkpoint
    "eval_windows": 16,
    "checkpoint_every": 2,
}


def gpt_data() -> dict:
    rng = np.random.default_rng(0)
    rows = 72
    tokens = (np.arange(rows)[:, None] + np.arange(D)[None, :]) % VOCAB
    tokens = np.where(rng.random((rows, D)) < 0.2, rng.integers(0, VOCAB, (rows, D)), tokens)
    return {
        "tokens": tokens.astype(np.int64),
        "episode_starts": np.arange(0, rows, 12),
        "episode_terminal": np.array([True, False] * 3),
        "obs_dim": OBS,
        "act_dim": ACT,
        "vocab_size": VOCAB,
    }


def gpt(tmp_path, name: str, **kw) -> dict:
    return train_gpt(GPT_CFG, **gpt_data(), seed=0, out_path=tmp_path / name, progress=False, **kw)


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_gpt_training_has_the_uninterrupted_curve(tmp_path, monkeypatch):
    full = gpt(tmp_path, "full.pt")
    real = training_loop.learning_rate

    def crash_at_step_3(cfg, step, total):
        if step == 3:
            raise KeyboardInterrupt
        return real(cfg, step, total)

    # Killed after the evaluation of step 3, with the last partial checkpoint at step 2: that
    # evaluation's record is not in the partial, and the resumed run evaluates step 3 again.
    monkeypatch.setattr(training_loop, "learning_rate", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        gpt(tmp_path, "crashed.pt")
    monkeypatch.setattr(training_loop, "learning_rate", real)
    assert torch.load(tmp_path / "crashed.pt.partial.pt", weights_only=True)["step"] == 2
    stopped = gpt(tmp_path, "stopped.pt", stop_after=3)
    assert stopped["completed"] is False
    with pytest.raises(DataError, match="not complete"):
        curve_rows(stopped)

    crashed, resumed = gpt(tmp_path, "crashed.pt"), gpt(tmp_path, "stopped.pt")
    expected = curve_csv(curve_rows(full))
    assert curve_csv(curve_rows(crashed)) == expected
    assert curve_csv(curve_rows(resumed)) == expected
    for name, metrics in (("full", full), ("crashed", crashed), ("stopped", resumed)):
        write_curve(tmp_path / f"{name}.curve.csv", metrics)
    text = (tmp_path / "full.curve.csv").read_text()
    assert (
        (tmp_path / "crashed.curve.csv").read_text() == text == (tmp_path / "stopped.curve.csv").read_text()
    )
    assert [int(r["step"]) for r in read_rows(tmp_path / "full.curve.csv")] == [1, 2, 3, 4, 5, 6]


def test_the_curve_holds_the_scores_the_trainer_reports(tmp_path):
    metrics = gpt(tmp_path, "g.pt")
    rows = read_rows(write_curve(curve_path(tmp_path / "g.pt"), metrics))
    assert curve_path(tmp_path / "g.pt") == tmp_path / "g.curve.csv"
    assert list(rows[0]) == ["step", "train_loss", "heldout_ll", "train_ll"]
    assert len(rows) == len(metrics["history"])
    for row, record in zip(rows, metrics["history"], strict=True):
        assert int(row["step"]) == record["step"]
        assert float(row["train_loss"]) == record["train_loss"]
        assert float(row["heldout_ll"]) == record["heldout_ll_per_token"]
        assert float(row["train_ll"]) == record["train_ll_per_token"]
    assert float(rows[-1]["heldout_ll"]) == metrics["heldout_ll_per_token"]
    assert float(rows[-1]["train_loss"]) == metrics["train_loss"]


def test_the_command_line_writes_the_curve_of_a_stage_metrics_file(tmp_path):
    """The workflow's training rules run `python -m trifle.models.curves` on the file the stage wrote."""
    metrics = gpt(tmp_path, "g.pt")
    cfg = {"task": {"name": "toy"}, "seed": 0, "paths": {"gpt_metrics": str(tmp_path / "g.metrics.json")}}
    write_model_metrics(
        cfg,
        "gpt",
        metrics,
        train_ll=metrics["train_ll_per_token"],
        heldout_ll=metrics["heldout_ll_per_token"],
    )
    out = tmp_path / "g.curve.csv"
    result = subprocess.run(
        [sys.executable, "-m", "trifle.models.curves", str(tmp_path / "g.metrics.json"), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == curve_csv(curve_rows(metrics))
    curve = read_curve(out)
    assert curve[-1]["heldout_ll"] == metrics["heldout_ll_per_token"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    bad = subprocess.run(
        [sys.executable, "-m", "trifle.models.curves", str(tmp_path / "g.pt"), str(tmp_path / "x.csv")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "g.pt" in bad.stderr and not (tmp_path / "x.csv").exists()


# ------------------------------------------------------------------------------------------ circuit


def circuit_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (n, 4), generator=g)
    keep = torch.rand(n, generator=g) < 0.6
    x[:, 1] = torch.where(keep, x[:, 0], x[:, 1])
    return x


def circuit(tmp_path, name: str) -> dict:
    return train_circuit(
        circuit_data(300, 7),
        circuit_data(60, 8),
        num_cats=3,
        num_latents=2,
        epochs=4,
        batch_size=128,
        pseudocount=0.1,
        seed=0,
        out_path=tmp_path / name,
        progress=False,
    )


def test_a_resumed_circuit_training_has_the_uninterrupted_curve(tmp_path, monkeypatch):
    full = circuit(tmp_path, "full.jpc")
    real, calls = circuit_training.em_step, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(circuit_training, "em_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        circuit(tmp_path, "res.jpc")
    monkeypatch.setattr(circuit_training, "em_step", real)
    resumed = circuit(tmp_path, "res.jpc")
    # The history's seconds differ between the two runs; the curve leaves time out.
    assert curve_csv(curve_rows(resumed)) == curve_csv(curve_rows(full))

    rows = curve_rows(full)
    # Step k: the parameters after k EM epochs; the held-out value only after the last one.
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["train_ll"] for r in rows[:-1]] == [h["train_ll_per_var"] for h in full["history"]]
    assert rows[-1]["train_ll"] == full["train_ll_per_var"]
    assert rows[-1]["heldout_ll"] == full["heldout_ll_per_var"]
    assert all(r.get("heldout_ll") is None for r in rows[:-1])
    assert all(r["train_loss"] == -r["train_ll"] for r in rows)
    # EM never lowers the training likelihood.
    assert all(a["train_ll"] <= b["train_ll"] + 1e-9 for a, b in zip(rows, rows[1:], strict=False))
    assert curve_path(tmp_path / "full.jpc") == tmp_path / "full.curve.csv"


# ----------------------------------------------------------------------------------- other trainers


def test_models_without_a_likelihood_keep_their_own_held_out_metrics():
    """A continuous DT's likelihood is None in every record and its column is dropped; the critic's TD
    error keeps its metrics name."""
    dt = {
        "completed": True,
        "history": [
            {"step": 5, "train_loss": 0.5, "train_eval_loss": 0.4, "heldout_loss": 0.6, "train_accuracy": None,
             "heldout_accuracy": None, "train_ll_per_token": None, "heldout_ll_per_token": None},
            {"step": 10, "train_loss": 0.3, "train_eval_loss": 0.2, "heldout_loss": float("nan"),
             "train_accuracy": None, "heldout_accuracy": None, "train_ll_per_token": None,
             "heldout_ll_per_token": None},
        ],
    }  # fmt: skip
    text = curve_csv(curve_rows(dt))
    assert text.splitlines() == [
        "step,train_loss,heldout_loss,train_eval_loss",
        "5,0.5,0.6,0.4",
        "10,0.3,,0.2",
    ]
    # The metrics file stores each record's keys sorted: the same curve.
    assert curve_csv(curve_rows(json.loads(json.dumps(dt, sort_keys=True)))) == text
    critic = {
        "model": "critic",
        "details": {"history": [{"step": 2, "train_loss": 1.0, "heldout_td_rmse": 0.25}]},
    }
    assert curve_csv(curve_rows(critic)).splitlines() == ["step,train_loss,heldout_td_rmse", "2,1.0,0.25"]
    with pytest.raises(DataError, match="history"):
        curve_rows({"details": {"steps": 3}})
    with pytest.raises(DataError, match="step"):
        curve_rows({"history": [{"heldout_ll_per_token": -1.0}]})
