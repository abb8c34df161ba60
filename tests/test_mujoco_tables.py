"""MuJoCo score tables from hand-built evaluation records whose statistics are computed by hand."""

import csv
import math

import pytest

from trifle.errors import DataError
from trifle.evaluation.mujoco_tables import (
    MUJOCO_COLUMNS,
    paper_table1_markdown,
    paper_table2_markdown,
    plot_scores,
    score_rows,
    write_mujoco_tables,
)
from trifle.planning.methods import method, sort_key


def record(task, method, seed, scores, *, steps=None, violations=None, constrained=False, **extra):
    env, _, rest = task.partition("-")
    steps = steps if steps is not None else [100] * len(scores)
    rec = {
        "task": task,
        "method": method,
        "seed": seed,
        "env": env,
        "dataset": rest.removesuffix("-v2"),
        "constrained": constrained,
        "episodes": {
            "returns": [10.0 * s for s in scores],
            "steps": steps,
            "scores": scores,
            "violations": violations if violations is not None else [0] * len(scores),
        },
        "plan_seconds": 2.0 * sum(steps),
        "env_steps": sum(steps),
    }
    rec.update(extra)
    return rec


def test_one_seed_reports_the_episode_standard_error():
    (row,) = score_rows([record("hopper-medium-v2", "tt", 0, [10.0, 20.0, 30.0])])
    assert row["n_seeds"] == 1 and row["score_mean"] == pytest.approx(20.0)
    # Episode std (ddof=1) is 10, over sqrt(3) episodes.
    assert row["score_sem"] == pytest.approx(10.0 / math.sqrt(3))
    assert row["step_seconds"] == pytest.approx(2.0) and row["violation_rate"] == 0.0


def test_several_seeds_report_the_seed_level_standard_error():
    records = [
        record("hopper-medium-v2", "tt", 0, [10.0, 20.0]),
        record("hopper-medium-v2", "tt", 1, [30.0]),
        record("hopper-medium-v2", "tt", 2, [40.0, 50.0, 60.0]),
    ]
    (row,) = score_rows(records)
    means = [15.0, 30.0, 50.0]  # each seed weighs the same, whatever its episode count
    mean = sum(means) / 3
    std = math.sqrt(sum((m - mean) ** 2 for m in means) / 2)
    assert row["n_seeds"] == 3 and row["score_mean"] == pytest.approx(mean)
    assert row["score_sem"] == pytest.approx(std / math.sqrt(3))


def test_single_episode_single_seed_has_no_standard_error():
    (row,) = score_rows([record("hopper-medium-v2", "tt", 0, [42.0])])
    assert math.isnan(row["score_sem"])


def test_violation_rate_counts_steps_over_all_seeds():
    records = [
        record(
            "hopper-medium-expert-v2",
            "tt-safe",
            0,
            [1.0, 2.0],
            steps=[100, 50],
            violations=[5, 0],
            constrained=True,
        ),
        record("hopper-medium-expert-v2", "tt-safe", 1, [3.0], steps=[50], violations=[10], constrained=True),
    ]
    (row,) = score_rows(records)
    assert row["violation_rate"] == pytest.approx(15 / 200)


def test_rows_are_sorted_by_task_then_the_registry_order():
    methods = ["trifle-m", "trifle-s-safe", "tt-safe", "trifle-s", "tt", "dt"]
    records = [record("walker2d-medium-v2", m, 0, [1.0], constrained=method(m).constrained) for m in methods]
    records.append(record("hopper-medium-v2", "tt", 0, [1.0]))
    rows = score_rows(records)
    # The registry's orders (10, 20, 21, 30, 31, 40) put each constrained variant right after its base.
    in_order = ["dt", "tt", "tt-safe", "trifle-s", "trifle-s-safe", "trifle-m"]
    assert sorted(methods, key=sort_key) == in_order
    assert [(r["task"], r["method"]) for r in rows] == [("hopper-medium-v2", "tt")] + [
        ("walker2d-medium-v2", m) for m in in_order
    ]


def test_records_split_into_the_two_csvs_by_constrained(tmp_path):
    records = [
        record("hopper-medium-expert-v2", "tt", 0, [100.0, 102.0]),
        record("hopper-medium-expert-v2", "trifle-s", 0, [104.0, 106.0]),
        record("hopper-medium-expert-v2", "tt-safe", 0, [90.0, 92.0], violations=[3, 1], constrained=True),
    ]
    mujoco, safe = tmp_path / "mujoco.csv", tmp_path / "safe_rl.csv"
    write_mujoco_tables(records, mujoco, safe)
    with mujoco.open() as f:
        plain_rows = list(csv.DictReader(f))
    with safe.open() as f:
        safe_rows = list(csv.DictReader(f))
    assert [r["method"] for r in plain_rows] == ["tt", "trifle-s"]
    assert [r["method"] for r in safe_rows] == ["tt-safe"]
    assert tuple(plain_rows[0]) == MUJOCO_COLUMNS
    assert float(safe_rows[0]["violation_rate"]) == pytest.approx(4 / 200)
    # The Markdown copies are the paper layouts, not the generic tables.
    assert "TT (published)" in mujoco.with_suffix(".md").read_text()
    assert "TT (constrained) violation rate" in safe.with_suffix(".md").read_text()


def test_without_constrained_records_the_safe_csv_has_only_its_header(tmp_path):
    mujoco, safe = tmp_path / "mujoco.csv", tmp_path / "safe_rl.csv"
    write_mujoco_tables([record("hopper-medium-v2", "tt", 0, [1.0])], mujoco, safe)
    assert safe.read_text() == ",".join(MUJOCO_COLUMNS) + "\n"
    assert "no constrained" in safe.with_suffix(".md").read_text().lower()


def test_table1_puts_published_scores_beside_ours_with_a_hand_computed_average():
    rows = score_rows(
        [
            record("walker2d-medium-v2", "tt", 0, [60.0, 62.0]),
            record("hopper-medium-expert-v2", "tt", 0, [99.0, 101.0]),
            record("hopper-medium-expert-v2", "dt", 0, [90.0, 94.0]),
        ]
    )
    text = paper_table1_markdown(rows)
    lines = text.splitlines()
    # Method columns carry the registry's labels (the CSVs keep the names).
    assert lines[0] == "| Dataset | Environment | DT (published) | TT (published) | DT (ours) | TT (ours) |"
    # Medium-Expert before Medium, as in the paper.
    assert lines[2] == "| Medium-Expert | Hopper | 107.6 | 110.0 | 92.0 ± 2.0 | 100.0 ± 1.0 |"
    assert lines[3] == "| Medium | Walker2d | 74.0 | 79.0 | – | 61.0 ± 1.0 |"
    # Published: (107.6 + 74.0) / 2 = 90.8 and (110.0 + 79.0) / 2 = 94.5; ours tt: (100 + 61) / 2 = 80.5;
    # dt lacks walker2d, so it has no average.
    assert lines[4] == "| Average |  | 90.8 | 94.5 | – | 80.5 |"
    assert "TT and DT papers" in text and "over the episodes of the single seed" in text
    assert "1 seed per entry" in text


def test_table1_shows_a_dash_for_generated_tasks():
    rows = score_rows(
        [
            record("hopper-medium-expert-v2", "tt", 0, [99.0, 101.0]),
            record("hopper-random-local", "tt", 0, [10.0, 14.0]),
        ]
    )
    lines = paper_table1_markdown(rows).splitlines()
    assert lines[3] == "| Random-Local | Hopper | – | – | 12.0 ± 2.0 |"
    assert lines[4] == "| Average |  | – | – | 56.0 |"


def test_table2_layout():
    rows = score_rows(
        [
            record(
                "hopper-medium-expert-v2", "tt-safe", 0, [80.0, 84.0], violations=[10, 2], constrained=True
            ),
            record("hopper-medium-expert-v2", "trifle-s-safe", 0, [100.0, 104.0], constrained=True),
            record("hopper-medium-expert-v2", "trifle-s", 0, [1.0]),
            record("walker2d-medium-expert-v2", "trifle-s-safe", 0, [90.0], violations=[1], constrained=True),
            record("hopper-medium-expert-v2", "tt", 0, [1.0]),
        ]
    )
    lines = paper_table2_markdown(rows).splitlines()
    # Only the registry's constrained methods, labelled by the registry.
    assert lines[0] == (
        "| Dataset | Environment | TT (constrained) score | TT (constrained) return"
        " | TT (constrained) violation rate | s-Trifle (constrained) score | s-Trifle (constrained) return"
        " | s-Trifle (constrained) violation rate |"
    )
    # Returns are 10 x the scores in these records.
    assert (
        lines[2]
        == "| Medium-Expert | Hopper | 82.0 ± 2.0 | 820.0 ± 20.0 | 6.00% | 102.0 ± 2.0 | 1020.0 ± 20.0 | 0.00% |"
    )
    assert lines[3] == "| Medium-Expert | Walker2d | – | – | – | 90.0 | 900.0 | 1.00% |"
    assert len([line for line in lines if line.startswith("| Medium")]) == 2


def test_plot_writes_a_png(tmp_path):
    rows = score_rows(
        [
            record("hopper-medium-expert-v2", "tt", 0, [99.0, 101.0]),
            record("hopper-medium-expert-v2", "trifle-s", 0, [105.0]),
            record("hopper-random-local", "tt", 0, [10.0, 14.0]),
        ]
    )
    path = tmp_path / "fig" / "mujoco_scores.png"
    plot_scores(rows, path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_missing_key_names_the_run_and_the_key():
    bad = record("hopper-medium-v2", "tt", 3, [1.0])
    del bad["constrained"]
    with pytest.raises(DataError, match=r"task=hopper-medium-v2 method=tt seed=3.*'constrained'"):
        score_rows([bad])
    bad = record("hopper-medium-v2", "tt", 3, [1.0])
    del bad["episodes"]["violations"]
    with pytest.raises(DataError, match=r"seed=3.*'episodes.violations'"):
        score_rows([bad])


def test_behaviour_column_is_the_datasets_complete_episodes_normalized(tmp_path):
    """Two complete episodes (a fall and a timeout) and an unfinished tail, which does not count."""
    import numpy as np

    from trifle.data.d4rl_format import save_dataset
    from trifle.envs.mujoco import REF_SCORES
    from trifle.evaluation.mujoco_tables import behaviour_score

    n = 9
    arrays = {
        "observations": np.zeros((n, 11), np.float32),
        "actions": np.zeros((n, 3), np.float32),
        "rewards": np.array([1, 2, 3, 10, 10, 10, 10, 500, 500], np.float32),
        "terminals": np.array([0, 0, 1, 0, 0, 0, 0, 0, 0], bool),
        "timeouts": np.array([0, 0, 0, 0, 0, 0, 1, 0, 0], bool),
    }
    save_dataset(tmp_path / "hopper-x-local.hdf5", arrays, {})
    low, high = REF_SCORES["hopper"]
    scores = [100 * (6 - low) / (high - low), 100 * (40 - low) / (high - low)]
    mean, sem, count = behaviour_score(tmp_path / "hopper-x-local.hdf5", "hopper")
    assert count == 2
    assert mean == pytest.approx(np.mean(scores))
    assert sem == pytest.approx(np.std(scores, ddof=1) / math.sqrt(2))
    rows = score_rows([record("hopper-x-local", "tt", 0, [10.0, 14.0])])
    lines = paper_table1_markdown(rows, {"hopper-x-local": (mean, sem, count)}).splitlines()
    assert (
        lines[0]
        == "| Dataset | Environment | DT (published) | TT (published) | Data (behaviour) | TT (ours) |"
    )
    assert lines[2] == f"| X-Local | Hopper | – | – | {mean:.1f} ± {sem:.1f} | 12.0 ± 2.0 |"
    assert "episodes: hopper-x-local: 2" in lines[-1]
