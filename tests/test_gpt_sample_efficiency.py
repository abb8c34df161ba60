"""benchmarks/gpt_sample_efficiency.py: its scoring against exact answers, and a smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpt_sample_efficiency.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpt_sample_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_score_is_the_bins_error_for_true_bins_and_the_spread_for_a_constant():
    bench = _module()
    task = bench.make_task()
    acts = slice(bench.OBS, bench.OBS + bench.ACT)
    true_bins = task.tokens[-bench.HELD_OUT :, acts]
    assert task.rmse(true_bins) < 0.02  # 100 quantile bins of a tanh output: only rounding is left
    middle = torch.full_like(true_bins, bench.BINS // 2)
    spread = float(np.sqrt((task.actions[-bench.HELD_OUT :] ** 2).mean()))
    assert task.rmse(middle) == pytest.approx(spread, abs=0.05)  # the median bin decodes to about 0


def test_rank_embedding_adds_the_rank_along_one_direction_per_column():
    bench = _module()
    base = torch.nn.Embedding(2 * bench.BINS + 1, 4)
    emb = bench.RankEmbedding(base, columns=2, n_embd=4)
    ids = torch.tensor([0, bench.BINS - 1, bench.BINS + 49, 2 * bench.BINS])
    diff = emb(ids) - base(ids)
    torch.testing.assert_close(diff[0], -emb.direction[0])
    torch.testing.assert_close(diff[1], emb.direction[0])
    torch.testing.assert_close(diff[2], (2 * 49 / 99 - 1) * emb.direction[1])
    torch.testing.assert_close(diff[3], torch.zeros(4))  # the padding token has no rank


@pytest.mark.slow  # a subprocess building the task and eight models for a few steps: ~20-40 s
def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "gse.md"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["rows"]) == 8
    for row in report["rows"]:
        assert row["rmse"] and all(np.isfinite(v) and v > 0 for v in row["rmse"].values()), row
    assert out.read_text().count("\n| ") == 8 + 1  # header and one line per row
