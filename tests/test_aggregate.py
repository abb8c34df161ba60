"""The one aggregation core of the result tables: its standard-error convention, computed by hand, the
notes that name it, and the method registry deciding order, reference and table (never the names)."""

from __future__ import annotations

import csv
import math

import pytest

from trifle.errors import DataError
from trifle.evaluation.aggregate import OVER_EPISODES, OVER_SEEDS, estimate, group_records, load_evaluation
from trifle.evaluation.mujoco_tables import (
    paper_table1_markdown,
    paper_table2_markdown,
    score_rows,
    write_mujoco_tables,
)
from trifle.evaluation.summary import summarize, write_summary
from trifle.io import write_json
from trifle.planning import methods
from trifle.planning.methods import method

ONE_SEED = [1.0, 2.0, 4.0, 7.0]
# mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21; std (ddof=1) sqrt(7); over sqrt(4)
ONE_SEED_MEAN, ONE_SEED_SEM = 3.5, math.sqrt(7.0) / 2.0
THREE_SEEDS = [[1.0, 3.0], [4.0], [6.0, 9.0, 12.0]]
# seed means 2, 4, 9: mean 5 (pooling the 6 episodes would give 35/6); squared deviations 9 + 1 + 16 = 26,
# std (ddof=1) sqrt(13); over sqrt(3) seeds
THREE_SEEDS_MEAN, THREE_SEEDS_SEM = 5.0, math.sqrt(13.0) / math.sqrt(3.0)


def toy(method_name, seed, returns, task="t", **extra):
    return {
        "task": task,
        "method": method_name,
        "seed": seed,
        "episodes": {
            "returns": returns,
            "successes": [r > 5 for r in returns],
            "penalties": [0] * len(returns),
        },
        "plan_seconds": 1.0,
        "env_steps": 10,
        **extra,
    }


def mujoco(task, method_name, seed, scores, constrained=False):
    env, _, rest = task.partition("-")
    return {
        "task": task,
        "method": method_name,
        "seed": seed,
        "env": env,
        "dataset": rest.removesuffix("-v2"),
        "constrained": constrained,
        "episodes": {
            "returns": [10.0 * s for s in scores],
            "steps": [100] * len(scores),
            "scores": scores,
            "violations": [0] * len(scores),
        },
        "plan_seconds": 1.0,
        "env_steps": 100 * len(scores),
    }


# ------------------------------------------------------------------------------ the convention


def test_one_seed_standard_error_is_over_episodes():
    e = estimate([ONE_SEED])
    assert (e.mean, e.over) == (pytest.approx(ONE_SEED_MEAN), OVER_EPISODES)
    assert e.sem == pytest.approx(ONE_SEED_SEM)
    (row,) = summarize([toy("tt", 0, ONE_SEED)])
    assert row["return_mean"] == pytest.approx(ONE_SEED_MEAN) and row["return_sem"] == pytest.approx(
        ONE_SEED_SEM
    )
    assert row["sem_over"] == "episodes" and row["n_seeds"] == 1 and row["n_episodes"] == 4
    (row,) = score_rows([mujoco("hopper-medium-v2", "tt", 0, ONE_SEED)])
    assert row["score_mean"] == pytest.approx(ONE_SEED_MEAN) and row["score_sem"] == pytest.approx(
        ONE_SEED_SEM
    )
    assert row["return_sem"] == pytest.approx(10 * ONE_SEED_SEM) and row["sem_over"] == "episodes"


def test_three_seeds_standard_error_is_over_the_per_seed_means():
    e = estimate(THREE_SEEDS)
    assert (e.mean, e.over) == (pytest.approx(THREE_SEEDS_MEAN), OVER_SEEDS)
    assert e.sem == pytest.approx(THREE_SEEDS_SEM)
    rows = summarize([toy("tt", s, r) for s, r in enumerate(THREE_SEEDS)])
    (row,) = rows
    assert row["return_mean"] == pytest.approx(THREE_SEEDS_MEAN)
    assert row["return_sem"] == pytest.approx(THREE_SEEDS_SEM) and row["sem_over"] == "seeds"
    assert row["n_seeds"] == 3 and row["n_episodes"] == 6
    # failure (return <= 5): each seed's rate 1, 1, 0, then the mean over seeds (pooling would give 1/2)
    assert row["failure_rate"] == pytest.approx(2 / 3)
    (row,) = score_rows([mujoco("hopper-medium-v2", "tt", s, r) for s, r in enumerate(THREE_SEEDS)])
    assert row["score_mean"] == pytest.approx(THREE_SEEDS_MEAN) and row["score_sem"] == pytest.approx(
        THREE_SEEDS_SEM
    )
    assert row["sem_over"] == "seeds"


def test_paired_differences_follow_the_same_convention():
    reference = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    ours = [
        [a + d for a, d in zip(ref, diff, strict=True)]
        for ref, diff in zip(reference, ([1, 3], [4, 4], [9, 9]), strict=True)
    ]
    rows = summarize(
        [toy(m, s, r) for m, runs in (("tt", reference), ("dt", ours)) for s, r in enumerate(runs)]
    )
    dt = next(r for r in rows if r["method"] == "dt")
    # per-seed mean differences 2, 4, 9: the THREE_SEEDS numbers
    assert dt["diff_vs_tt"] == pytest.approx(THREE_SEEDS_MEAN)
    assert dt["diff_vs_tt_sem"] == pytest.approx(THREE_SEEDS_SEM)
    one = summarize([toy("tt", 0, [0.0] * 4), toy("dt", 0, ONE_SEED)])
    dt = next(r for r in one if r["method"] == "dt")
    assert dt["diff_vs_tt"] == pytest.approx(ONE_SEED_MEAN) and dt["diff_vs_tt_sem"] == pytest.approx(
        ONE_SEED_SEM
    )


def test_the_summary_note_names_the_convention_of_every_row(tmp_path):
    records = [toy("tt", s, r) for s, r in enumerate(THREE_SEEDS)] + [toy("dt", 0, ONE_SEED)]
    rows = summarize(records)
    write_summary(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv") as fh:
        over = {r["method"]: r["sem_over"] for r in csv.DictReader(fh)}
    assert over == {"dt": "episodes", "tt": "seeds"}
    md = (tmp_path / "summary.md").read_text()
    assert "| sem_over |" in md.splitlines()[0]
    note = md.split("\n\n", 1)[1]
    assert "per-seed means" in note and "over episodes where it has one" in note
    assert "rows over seeds: 1, over episodes: 1" in note
    # dt has one seed, paired with tt's seed 0: its paired error is over episodes, as its row's
    assert "one paired seed" not in note
    # three dt seeds, only seed 0 paired: the row's error is over seeds, the paired one over episodes
    rows = summarize(records + [toy("dt", 7, [5.0]), toy("dt", 8, [6.0])])
    assert next(r for r in rows if r["method"] == "dt")["sem_over"] == "seeds"
    write_summary(tmp_path / "summary.csv", rows)
    assert "one paired seed, for: t dt" in (tmp_path / "summary.md").read_text()


def test_the_mujoco_notes_name_the_convention_entry_by_entry():
    rows = score_rows(
        [mujoco("hopper-medium-v2", "tt", s, r) for s, r in enumerate(THREE_SEEDS)]
        + [mujoco("hopper-medium-v2", "trifle-s", 0, ONE_SEED)]
        + [mujoco("hopper-medium-v2", "tt-safe", s, [1.0, 2.0], constrained=True) for s in (0, 1)]
    )
    note = paper_table1_markdown(rows).split("\n\n", 1)[1]
    assert "over seeds (std (ddof=1) of the per-seed means" in note
    assert "except over the episodes of the single seed" in note and "s-Trifle on hopper-medium-v2" in note
    assert "TT on hopper-medium-v2" not in note and "1–3 seeds per entry" in note
    note = paper_table2_markdown(rows).split("\n\n", 1)[1]
    assert "over seeds" in note and "except" not in note and "2 seeds per entry" in note
    one = score_rows([mujoco("hopper-medium-v2", "tt", 0, ONE_SEED)])
    assert "over the episodes of the single seed" in paper_table1_markdown(one)


# ------------------------------------------------------------------------------ consistency


def test_duplicate_seeds_name_both_files(tmp_path):
    paths = [tmp_path / "a" / "seed0.json", tmp_path / "b" / "seed0.json"]
    for path in paths:
        write_json(path, toy("tt", 0, [1.0]))
    with pytest.raises(DataError, match=r"a/seed0\.json and .*b/seed0\.json"):
        summarize([load_evaluation(p) for p in paths])


def test_mixed_episode_keys_name_the_files(tmp_path):
    paths = [tmp_path / "seed0.json", tmp_path / "seed1.json"]
    write_json(paths[0], toy("tt", 0, [1.0]))
    write_json(
        paths[1], {**toy("tt", 1, [2.0]), "episodes": {**toy("tt", 1, [2.0])["episodes"], "scores": [0.1]}}
    )
    with pytest.raises(DataError, match=r"different episode keys.*seed0\.json.*seed1\.json.*'scores'"):
        summarize([load_evaluation(p) for p in paths])


def test_seeds_disagreeing_on_a_shared_field_name_the_files(tmp_path):
    paths = [tmp_path / "seed0.json", tmp_path / "seed1.json"]
    write_json(paths[0], mujoco("hopper-medium-v2", "tt", 0, [1.0]))
    write_json(paths[1], {**mujoco("hopper-medium-v2", "tt", 1, [1.0]), "dataset": "medium-replay"})
    with pytest.raises(DataError, match=r"disagree on 'dataset'.*seed0\.json, .*seed1\.json"):
        score_rows([load_evaluation(p) for p in paths])


def test_unequal_episode_series_and_unknown_methods_are_data_errors(tmp_path):
    bad = toy("tt", 0, [1.0, 2.0])
    bad["episodes"]["penalties"] = [0]
    with pytest.raises(DataError, match="method=tt seed=0.*one length"):
        summarize([bad])
    write_json(tmp_path / "seed0.json", toy("no-such-method", 0, [1.0]))
    with pytest.raises(
        DataError, match=r"seed0\.json: method 'no-such-method' is not in the method registry"
    ):
        summarize([load_evaluation(tmp_path / "seed0.json")])


def test_a_constrained_flag_that_contradicts_the_registry_is_rejected():
    with pytest.raises(DataError, match="method 'tt' is declared unconstrained"):
        score_rows([mujoco("hopper-medium-v2", "tt", 0, [1.0], constrained=True)])


# ------------------------------------------------------------------------------ the registry decides

FAKE_METHODS = {
    # name: (order, label, tables, reference, constrained)
    "omega-safe": (10, "Omega", ["summary", "mujoco"], False, False),
    "guarded": (20, "Guarded", ["constrained"], False, True),
    "zeta": (30, "Zeta", ["mujoco"], True, False),
    "tt": (50, "TT", ["summary", "mujoco"], False, False),
    "dt": (60, "DT", ["summary", "mujoco"], False, False),
    "alpha": (90, "Alpha!", ["summary", "mujoco"], False, False),
}


@pytest.fixture()
def fake_registry(tmp_path, monkeypatch):
    """A method registry of its own: orders, labels, tables and the reference that no name suggests."""
    for name, (order, label, tables, reference, constrained) in FAKE_METHODS.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nmethod: tt\nconstrained: {str(constrained).lower()}\nregistry:\n"
            "  policy: trifle.planning.planners:beam_policies\n  needs: [tokens, gpt]\n"
            f"  label: '{label}'\n  order: {order}\n  tables: {tables}\n  reference: {str(reference).lower()}\n"
        )
    monkeypatch.setattr(methods, "PLANNER_DIR", tmp_path)
    method.cache_clear()
    yield
    method.cache_clear()


def test_display_order_and_reference_follow_the_registry(fake_registry):
    names = ["alpha", "tt", "dt", "zeta", "guarded", "omega-safe"]
    rows = summarize([toy(m, 0, [float(i)]) for i, m in enumerate(names)])
    assert [r["method"] for r in rows] == ["omega-safe", "guarded", "zeta", "tt", "dt", "alpha"]
    by = {r["method"]: r for r in rows}
    # The reference is zeta (registry.reference), not tt: tt's row is paired against it.
    assert by["zeta"]["diff_vs_tt"] == "" and by["tt"]["diff_vs_tt"] == pytest.approx(1.0 - 3.0)
    groups = group_records([toy(m, 0, [1.0]) for m in names], ["returns"])
    assert [name for _, name in groups] == [r["method"] for r in rows]


def test_the_registry_routes_rows_to_the_mujoco_tables(fake_registry, tmp_path):
    task = "hopper-medium-expert-v2"
    records = [
        mujoco(task, "alpha", 0, [100.0, 102.0]),
        mujoco(task, "omega-safe", 0, [90.0, 92.0]),  # "-safe" in its name, yet in the main table
        mujoco(task, "guarded", 0, [80.0, 84.0], constrained=True),  # no "-safe", yet constrained
        mujoco(task, "tt", 0, [50.0]),
    ]
    mujoco_csv, safe_csv = tmp_path / "mujoco.csv", tmp_path / "safe_rl.csv"
    write_mujoco_tables(records, mujoco_csv, safe_csv)
    with mujoco_csv.open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["omega-safe", "tt", "alpha"]
    with safe_csv.open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["guarded"]
    table1 = mujoco_csv.with_suffix(".md").read_text().splitlines()
    assert table1[0] == (
        "| Dataset | Environment | TT (published) | DT (published) | Omega (ours) | TT (ours) | Alpha! (ours) |"
    )
    table2 = safe_csv.with_suffix(".md").read_text().splitlines()
    assert table2[0] == "| Dataset | Environment | Guarded score | Guarded return | Guarded violation rate |"
    assert table2[2] == "| Medium-Expert | Hopper | 82.0 ± 2.0 | 820.0 ± 20.0 | 0.00% |"
