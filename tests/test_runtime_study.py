"""benchmarks/runtime_study.py --smoke runs end to end and writes both sweeps (tiny models, ~20 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a subprocess that builds GPTs and circuits: ~10-25 s on 2 shared cores


def test_smoke_run_writes_both_sweeps(tmp_path):
    script = REPO / "benchmarks" / "runtime_study.py"
    subprocess.run(
        [sys.executable, str(script), "--smoke", "--out-dir", str(tmp_path)],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "runtime_study.json").read_text())
    assert report["scale"] == "smoke"
    for sweep in ("horizon_sweep", "action_sweep"):
        rows = report[sweep]
        methods = {r["method"] for r in rows}
        assert {"tt", "trifle-s"} <= methods, (sweep, methods)
        for r in rows:
            assert r["calls"] >= 1 and r["s_per_env_step"] > 0, r
            if r["method"] != "tt":
                assert r["circuit_s_per_env_step"] > 0 and r["circuit_rows_per_env_step"] > 0, r
        tt = {(r["task"], r["horizon"]): r for r in rows if r["method"] == "tt"}
        for r in rows:  # every (task, H) has its tt reference, whose ratio to itself is 1
            assert tt[r["task"], r["horizon"]]["ratio_vs_tt"] == pytest.approx(1.0)
    assert {r["act_dim"] for r in report["action_sweep"]} == {1, 2}
    assert {r["horizon"] for r in report["horizon_sweep"]} == {1, 2}
    assert any(r["method"] == "trifle-m" and r["circuit_window"] == 2 for r in report["horizon_sweep"])
    md = (tmp_path / "runtime_study.md").read_text()
    assert "## Across horizons" in md and "## Across action dimensions" in md
    assert (tmp_path / "runtime_study.png").stat().st_size > 0
