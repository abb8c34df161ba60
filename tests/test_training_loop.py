"""The shared training loop on a trivial model: what the GPT and DT trainers rely on.

Bit-identical resume, evaluation at the configured steps, the per-step learning rate and dropout seed,
and refusal of partial checkpoints that do not belong to the run.
"""

import numpy as np
import pytest
import torch

from trifle.errors import CheckpointError
from trifle.models import training_loop
from trifle.models.training_common import derived_seed, learning_rate
from trifle.models.training_loop import (
    TrainingJob,
    optimizer_step,
    run_training,
    save_final,
    shuffled_batches,
)

CFG = {
    "learning_rate": 0.05,
    "warmup_steps": 2,
    "min_lr_fraction": 0.1,
    "grad_clip": 1.0,
    "eval_every": 3,
    "checkpoint_every": 3,
}


class Pairs:
    """Twenty (x, y) samples of a noisy linear map; the loop only needs ``len`` and ``get``."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(20, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def get(self, indices):
        idx = torch.from_numpy(np.asarray(indices))
        return self.x[idx], self.y[idx]


def make_job(calls: list | None = None, evals: list | None = None, data: dict | None = None) -> TrainingJob:
    """A dropout + linear regressor; ``calls`` gets each step's (lr, dropout seed, loss), ``evals`` a 1 per
    evaluation."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
    windows = Pairs()

    def step(model, optimizer, batch, lr, grad_clip, dropout_seed):
        x, y = batch
        loss = optimizer_step(
            model, optimizer, lambda: ((model(x)[:, 0] - y) ** 2).mean(), lr, grad_clip, dropout_seed
        )
        if calls is not None:
            calls.append((lr, dropout_seed, loss))
        return loss

    def evaluate():
        if evals is not None:
            evals.append(1)
        with torch.no_grad():
            model.eval()
            mse = float(((model(windows.x)[:, 0] - windows.y) ** 2).mean())
            model.train()
        return {"mse": mse}

    return TrainingJob(
        kind="toy",
        model=model,
        make_optimizer=lambda m, cfg: torch.optim.AdamW(m.parameters(), lr=cfg["learning_rate"]),
        batch=shuffled_batches(windows, seed=3, batch_size=8),
        step=step,
        evaluate=evaluate,
        shown_score=("mse", "mse"),
        data=data or {"rows": 20},
        partial_format="toy-partial/1",
    )


def train(tmp_path, name, cfg=CFG, steps=10, job=None, **kw):
    job = job or make_job()
    out = run_training(job, cfg, seed=3, total_steps=steps, out_path=tmp_path / name, progress=False, **kw)
    return job.model, out


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_resume_after_stop_ends_bit_identical_and_does_not_restart(tmp_path):
    full_model, full = train(tmp_path, "full.pt")
    assert full.completed and full.steps == 10
    _, first = train(tmp_path, "resumed.pt", stop_after=4)
    assert not first.completed and first.steps == 4 and first.final is None
    assert first.stopped_metrics() == {"completed": False, "steps": 4, "seconds": first.seconds}
    assert (tmp_path / "resumed.pt.partial.pt").exists()
    calls = []
    model, resumed = train(tmp_path, "resumed.pt", job=make_job(calls))
    assert len(calls) == 6  # steps 4..9 only: the partial was resumed, not retrained from scratch
    assert_same_params(full_model, model)
    assert resumed.history == full.history and resumed.final == full.final


def test_resume_after_crash_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    full_model, full = train(tmp_path, "full.pt")
    real = training_loop.learning_rate

    def crash_at_step_7(cfg, step, total):
        if step == 7:
            raise KeyboardInterrupt
        return real(cfg, step, total)

    monkeypatch.setattr(training_loop, "learning_rate", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "crashed.pt")
    monkeypatch.setattr(training_loop, "learning_rate", real)
    assert torch.load(tmp_path / "crashed.pt.partial.pt", weights_only=True)["step"] == 6
    calls = []
    # checkpoint_every is resume-free: changing it must not block the resume
    model, resumed = train(tmp_path, "crashed.pt", {**CFG, "checkpoint_every": 4}, job=make_job(calls))
    assert len(calls) == 4
    assert_same_params(full_model, model)
    assert resumed.history == full.history


@pytest.mark.parametrize(
    ("steps", "eval_every", "expected"), [(10, 3, [3, 6, 9, 10]), (9, 3, [3, 6, 9]), (5, 0, [5])]
)
def test_evaluation_happens_at_the_configured_steps(tmp_path, steps, eval_every, expected):
    calls, evals = [], []
    cfg = {**CFG, "eval_every": eval_every, "checkpoint_every": 0}
    _, out = train(tmp_path, "e.pt", cfg, steps=steps, job=make_job(calls, evals))
    assert [h["step"] for h in out.history] == expected and len(evals) == len(expected)
    assert out.final == out.history[-1] and out.final_scores.keys() == {"train_loss", "mse"}
    assert not (tmp_path / "e.pt.partial.pt").exists()  # checkpoint_every = 0: no partial checkpoints


def test_train_loss_is_the_mean_since_the_previous_evaluation(tmp_path):
    calls = []
    _, out = train(tmp_path, "l.pt", {**CFG, "checkpoint_every": 0}, steps=7, job=make_job(calls))
    losses = [loss for _, _, loss in calls]
    for record, (lo, hi) in zip(out.history, [(0, 3), (3, 6), (6, 7)], strict=True):
        assert record["train_loss"] == pytest.approx(sum(losses[lo:hi]) / (hi - lo), rel=1e-12)


def test_each_step_gets_the_scheduled_lr_and_its_own_dropout_seed(tmp_path):
    calls = []
    train(tmp_path, "s.pt", steps=10, job=make_job(calls))
    assert [lr for lr, _, _ in calls] == [learning_rate(CFG, t, 10) for t in range(10)]
    assert calls[0][0] == CFG["learning_rate"] / 2  # warmup: step 0 of 2
    assert [seed for _, seed, _ in calls] == [derived_seed(3, 2, t) for t in range(10)]


def test_foreign_or_mismatched_partials_are_refused(tmp_path):
    train(tmp_path, "p.pt", stop_after=2)
    with pytest.raises(CheckpointError, match=r"p\.pt\.partial\.pt.*cfg\.learning_rate"):
        train(tmp_path, "p.pt", {**CFG, "learning_rate": 0.01})
    with pytest.raises(CheckpointError, match=r"data\.rows"):
        train(tmp_path, "p.pt", job=make_job(data={"rows": 21}))
    torch.save({"format": "toy-partial/0", "step": 1}, tmp_path / "p.pt.partial.pt")
    with pytest.raises(CheckpointError, match="toy-partial/1"):
        train(tmp_path, "p.pt")
    (tmp_path / "p.pt.partial.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        train(tmp_path, "p.pt")


def test_save_final_writes_the_checkpoint_and_drops_the_partial(tmp_path):
    train(tmp_path, "f.pt", stop_after=2)
    save_final(tmp_path / "f.pt", {"format": "toy/1"})
    assert torch.load(tmp_path / "f.pt", weights_only=True) == {"format": "toy/1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]
