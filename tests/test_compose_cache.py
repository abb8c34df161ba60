"""The fast composition path (trifle.config.compose) against a plain Hydra compose of the same overrides.

The fast path composes each group selection once and applies the plain overrides itself; a DAG's jobs
must still get exactly the config (values, types and key order) and the errors Hydra would give them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trifle import config
from trifle.errors import ConfigError

from workflow_support import copy_project, env_for


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Each test starts and ends with empty memo caches and no disk cache (unless it sets one)."""
    monkeypatch.delenv(config.COMPOSE_CACHE_ENV, raising=False)
    monkeypatch.delenv(config.COMPOSE_MODE_ENV, raising=False)

    memos = (config._compose_cached, config._plain_base, config._hydra_base, config._conf_state)

    def clear():
        for memo in memos:  # the real ones: a test's monkeypatch is still in place at teardown
            memo.cache_clear()

    clear()
    yield
    clear()


def outcome(function, overrides) -> tuple[str, str]:
    """A comparable result: the repr of the config (types and key order included) or the error."""
    try:
        return "ok", repr(function(tuple(overrides)))
    except Exception as err:  # both paths must fail alike, whatever the error
        return type(err).__name__, str(err)


def assert_same_as_hydra(overrides) -> None:
    assert outcome(config._compose_cached, overrides) == outcome(config._compose_hydra, overrides), overrides


HAND_BUILT = [
    (),
    ("seed=7",),
    ("task=taxi-stochastic", "seed=2", "gpt=paper", "planner=trifle-s"),
    (
        "task=hopper-medium-replay-v2",
        "seed=11",
        "gpt=tt-mujoco",
        "eval=mujoco",
        "planner=tt-q",
        "gpt.steps=312500",
    ),
    ("task=taxi-stochastic", "task=frozenlake-eps0.3"),
    ("seed=1", "seed=2"),
    ("+planner.foo=1",),
    ("planner.foo=1",),  # unknown key without + : Hydra's error
    ("+planner.horizon=2",),  # + on an existing key: Hydra's error
    ("++planner.horizon=2",),
    ("++planner.new_key=2",),
    ("~task.action_constraint",),
    ("~planner.nope",),
    ("~planner",),
    ("+task=taxi-stochastic",),
    ("task.dt_target_returns=[-100,-200]",),
    ("task.dt_target_returns=null",),
    ("planner=trifle-s", "planner.fixed_threshold=null"),
    ("planner=trifle-s", "planner.top_ratio=1e-1"),
    ("paths.gpt='a file with spaces.pt'",),
    ("eval.episodes='3'",),
    ("paths.gpt=results/${task.name}/seed${seed}.pt", "seed=3"),
    ("planner.horizon=${seed}", "seed=4"),
    ("task.planning.horizon=7", "planner=tt"),
    ("seed=${oc.env:TRIFLE_NO_SUCH_VARIABLE,5}",),
    ("paths.gpt='\\${seed}'",),
    ("paths.gpt=${nope}",),
    ("task={name: renamed}",),
    ("paths.model_metrics=[a.json,b.json]",),
    ("aux.kind=action", "device=cuda", "threads=2"),
    ("seed=1,2",),
    ("gpt@other=small",),
    ("hydra.job.name=x",),
    ("foo",),
    ("task=nope",),
]


@pytest.mark.parametrize("overrides", HAND_BUILT, ids=lambda o: " ".join(o) or "defaults")
def test_fast_path_equals_hydra(overrides):
    assert_same_as_hydra(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=nope"],
        ["gpt=huge"],
        ["gpt.n_embd=65"],
        ["planner.foo=1"],
        ["+planner.horizon=2"],
        ["~seed"],
        ["seed=1,2"],
        ["foo"],
        ["task.pc_window=0"],
    ],
)
def test_bad_overrides_fail_with_the_same_message(overrides, monkeypatch):
    def message():
        with pytest.raises(ConfigError) as err:
            config.compose(overrides)
        return str(err.value)

    fast = message()
    monkeypatch.setenv(config.COMPOSE_MODE_ENV, "hydra")
    assert message() == fast


def test_the_environment_switch_selects_the_old_path(monkeypatch):
    def broken(overrides):
        raise AssertionError("fast path used")

    monkeypatch.setattr(config, "_compose_cached", broken)
    monkeypatch.setenv(config.COMPOSE_MODE_ENV, "hydra")
    assert config.compose(["seed=3"])["seed"] == 3


def test_each_group_selection_is_composed_by_hydra_once(monkeypatch):
    calls = []
    hydra = config._hydra_dictconfig
    monkeypatch.setattr(
        config, "_hydra_dictconfig", lambda overrides: calls.append(overrides) or hydra(overrides)
    )
    for seed in range(3):
        for planner in ("tt", "trifle-s"):
            config.compose(["task=taxi-stochastic", f"seed={seed}", f"planner={planner}", "gpt.steps=20"])
    assert sorted(calls) == [
        ("task=taxi-stochastic", "planner=trifle-s"),
        ("task=taxi-stochastic", "planner=tt"),
    ]


# --- the disk cache ----------------------------------------------------------------------------


def _without_hydra(monkeypatch):
    def broken(*args):
        raise AssertionError("Hydra composed")

    monkeypatch.setattr(config, "_hydra_dictconfig", broken)


def test_disk_cache_serves_a_later_process_without_hydra(tmp_path, monkeypatch):
    monkeypatch.setenv(config.COMPOSE_CACHE_ENV, str(tmp_path))
    overrides = ["task=taxi-stochastic", "planner=trifle-s", "seed=4", "planner.horizon=3"]
    first = config.compose(overrides)
    (state,) = tmp_path.iterdir()
    assert len(list(state.glob("*.json"))) == 1
    config._plain_base.cache_clear()
    config._compose_cached.cache_clear()
    _without_hydra(monkeypatch)
    assert repr(config.compose(overrides)) == repr(first)


def test_a_corrupt_entry_is_recomposed(tmp_path, monkeypatch):
    monkeypatch.setenv(config.COMPOSE_CACHE_ENV, str(tmp_path))
    first = config.compose(["seed=2"])
    (entry,) = tmp_path.glob("*/*.json")
    entry.write_text('{"groups": [], "config": ')
    config._plain_base.cache_clear()
    config._compose_cached.cache_clear()
    assert repr(config.compose(["seed=2"])) == repr(first)
    assert json.loads(entry.read_text())["groups"] == []


def test_an_empty_variable_turns_the_disk_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv(config.COMPOSE_CACHE_ENV, "")
    monkeypatch.chdir(tmp_path)
    config.compose(["seed=2"])
    assert list(tmp_path.iterdir()) == []


def test_a_config_edit_invalidates_the_disk_cache(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    monkeypatch.setattr(config, "CONF_DIR", conf)
    cache = tmp_path / "cache"
    monkeypatch.setenv(config.COMPOSE_CACHE_ENV, str(cache))
    (cache / "keep-me").mkdir(parents=True)  # not the cache's own: never pruned
    assert (
        config._compose_cached(("planner=tt",))["planner"]["horizon"]
        == config.compose()["task"]["planning"]["horizon"]
    )
    old_state = config._conf_state()

    planner = conf / "planner" / "tt.yaml"
    planner.write_text(planner.read_text().replace("horizon: ${task.planning.horizon}", "horizon: 99"))
    for memo in (config._compose_cached, config._plain_base, config._hydra_base, config._conf_state):
        memo.cache_clear()
    assert config._conf_state() != old_state
    assert config._compose_cached(("planner=tt",))["planner"]["horizon"] == 99
    assert sorted(p.name for p in cache.iterdir()) == sorted(["keep-me", config._conf_state()])


# --- every job of the workflow's DAGs ------------------------------------------------------------

RECORDER = """
import atexit, json, sys
import trifle.config as config

seen = {}
compose = config.compose


def recording(overrides=()):
    seen.setdefault(tuple(overrides), None)
    return compose(overrides)


config.compose = recording
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(list(seen))))
from snakemake.cli import main

sys.argv = ["snakemake", *sys.argv[2:]]
main()
"""


def dag_override_lists(tmp_path: Path, *args: str) -> list[tuple[str, ...]]:
    """Every override list a dry run of the workflow composes (its jobs' params and its checks)."""
    project = copy_project(tmp_path / "project")
    out = tmp_path / "overrides.json"
    cmd = [sys.executable, "-c", RECORDER, str(out), "-n", "--forceall", "--cores", "1", *args]
    env = env_for(project)
    env[config.COMPOSE_CACHE_ENV] = ""
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return [tuple(o) for o in json.loads(out.read_text())]


def check_dag(tmp_path, monkeypatch, *args: str) -> None:
    lists = dag_override_lists(tmp_path, *args)
    assert len(lists) > 10
    for overrides in lists:
        assert_same_as_hydra(overrides)
    # And all of them take the plain path: from a filled disk cache, no Hydra composition at all.
    monkeypatch.setenv(config.COMPOSE_CACHE_ENV, str(tmp_path / "cache"))
    config._compose_cached.cache_clear()
    config._plain_base.cache_clear()
    expected = {o: config._compose_cached(o) for o in lists}
    for memo in (config._compose_cached, config._plain_base, config._hydra_base):
        memo.cache_clear()
    _without_hydra(monkeypatch)
    assert {o: config._compose_cached(o) for o in lists} == expected


def test_default_dag_jobs_compose_as_with_hydra(tmp_path, monkeypatch):
    check_dag(tmp_path, monkeypatch)


@pytest.mark.slow  # a few dozen distinct lists, a Hydra compose each
def test_smoke_dag_jobs_compose_as_with_hydra(tmp_path, monkeypatch):
    check_dag(tmp_path, monkeypatch, "--configfile", "workflow/config/smoke.yaml")


@pytest.mark.slow  # about 1,400 distinct lists: several minutes of Hydra
def test_paper_dag_jobs_compose_as_with_hydra(tmp_path, monkeypatch):
    check_dag(
        tmp_path,
        monkeypatch,
        "--configfile",
        "workflow/config/paper.yaml",
        "--workflow-profile",
        "workflow/profiles/slurm",
    )
