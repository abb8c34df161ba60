"""The method registry: every planner config declares its method once, and nothing else names methods."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trifle.config import compose, stage_slice
from trifle.errors import ConfigError
from trifle.planning import methods
from trifle.planning.methods import available_methods, method, methods_in, reference_method, sort_key

REPO = Path(__file__).resolve().parents[1]


def test_every_planner_config_is_a_well_formed_method_with_a_loadable_policy():
    for name in available_methods():
        entry = method(name)
        assert entry.name == name and callable(entry.policy_function())
        assert entry.needs and set(entry.needs) <= set(methods.INPUTS)


def test_inherited_blocks_override_only_what_they_set():
    tt, ts, tm, safe = method("tt"), method("trifle-s"), method("trifle-m"), method("trifle-s-safe")
    assert ts.policy == tt.policy and ts.needs == ("tokens", "gpt", "pc") and not ts.reference
    assert tm.needs == ts.needs and tm.tables == ts.tables and tm.label == "m-Trifle"
    assert safe.tables == ("constrained",) and safe.constrained and safe.needs == ts.needs
    assert reference_method() == "tt"


def test_order_and_tables_come_from_the_registry():
    assert sorted(["trifle-m", "dt", "trifle-s", "tt"], key=sort_key) == ["dt", "tt", "trifle-s", "trifle-m"]
    assert methods_in("constrained") == ["tt-safe", "trifle-s-safe"]
    assert "tt-safe" not in methods_in("mujoco")


def _write(root: Path, name: str, text: str) -> None:
    (root / f"{name}.yaml").write_text(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: m\nmethod: tt\n", "missing the 'registry' block"),
        (
            "name: m\nregistry: {policy: a:b, needs: [gpt], label: M, order: 1, tables: [summary]}\n",
            r"missing \['reference'\]",
        ),
        (
            "name: m\nregistry: {policy: a.b, needs: [gpt], label: M, order: 1, tables: [summary], reference: false}\n",
            "registry.policy",
        ),
        (
            "name: m\nregistry: {policy: a:b, needs: [q_table], label: M, order: 1, tables: [summary], reference: false}\n",
            "registry.needs",
        ),
        (
            "name: m\nregistry: {policy: a:b, needs: [gpt], label: M, order: 1, tables: [paper], reference: false}\n",
            "registry.tables",
        ),
        (
            "name: other\nregistry: {policy: a:b, needs: [gpt], label: M, order: 1, tables: [summary], reference: false}\n",
            "expected the file's name",
        ),
        (
            "name: m\nregistry: {policy: a:b, validate: a.b, needs: [gpt], label: M, order: 1, tables: [summary], reference: false}\n",
            "registry.validate",
        ),
    ],
)
def test_a_malformed_block_is_one_error_naming_the_file(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(methods, "PLANNER_DIR", tmp_path)
    method.cache_clear()
    try:
        _write(tmp_path, "m", text)
        with pytest.raises(ConfigError, match=message) as err:
            method("m")
        assert str(tmp_path / "m.yaml") in str(err.value)
    finally:
        method.cache_clear()


def test_a_policy_that_cannot_be_imported_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "PLANNER_DIR", tmp_path)
    method.cache_clear()
    try:
        _write(
            tmp_path,
            "m",
            "name: m\nregistry: {policy: 'trifle.planning.planners:nope', needs: [gpt], label: M, order: 1, "
            "tables: [summary], reference: false}\n",
        )
        with pytest.raises(ConfigError, match="cannot be loaded"):
            method("m").policy_function()
    finally:
        method.cache_clear()


def test_the_settings_checks_come_from_the_registry_and_are_inherited():
    beam, dt_trifle = "trifle.planning.planner_settings", "trifle.planning.dt_trifle_settings"
    assert {name: method(name).validator for name in ("tt", "trifle-m", "tt-q", "trifle-dt", "dt")} == {
        "tt": f"{beam}:validate_planner",
        "trifle-m": f"{beam}:validate_planner",
        "tt-q": f"{beam}:validate_planner",
        "trifle-dt": f"{dt_trifle}:validate_planner",
        "dt": None,
    }
    with pytest.raises(ConfigError, match="planner.beam_width"):
        method("tt").validate({**compose(["task=taxi-stochastic"])["planner"], "beam_width": 0})


def test_a_settings_check_that_cannot_be_imported_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "PLANNER_DIR", tmp_path)
    method.cache_clear()
    try:
        _write(
            tmp_path,
            "m",
            "name: m\nregistry: {policy: 'trifle.planning.planners:beam_policies', validate: 'nope.nope:check', "
            "needs: [gpt], label: M, order: 1, tables: [summary], reference: false}\n",
        )
        with pytest.raises(ConfigError, match="registry.validate .* cannot be loaded"):
            method("m").validate({})
    finally:
        method.cache_clear()


def test_relabelling_a_method_does_not_change_what_its_evaluation_reads():
    base = compose(["task=taxi-stochastic", "planner=trifle-s"])
    relabelled = compose(["task=taxi-stochastic", "planner=trifle-s", "planner.registry.label=other"])
    assert base["planner"]["registry"]["label"] != relabelled["planner"]["registry"]["label"]
    assert stage_slice(base, "evaluate") == stage_slice(relabelled, "evaluate")
    retuned = compose(["task=taxi-stochastic", "planner=trifle-s", "planner.top_ratio=0.3"])
    assert stage_slice(base, "evaluate") != stage_slice(retuned, "evaluate")


def _method_name_literals(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines holding a method name as a string literal, other than as a dict key (data keyed by
    method, such as published scores): comparisons, membership tuples, loops over named methods."""
    keys = {
        id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None
    }
    return sorted(
        {
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in keys
        }
    )


def test_no_layer_outside_the_planners_names_methods():
    names = set(available_methods())
    # The stages that handle methods (the training stages' "dt" is a model's name, not a method's).
    stages = [
        REPO / "trifle" / "stages" / f"{s}.py" for s in ("evaluate", "summary", "mujoco_tables", "tables")
    ]
    files = [*stages, *(REPO / "trifle" / "evaluation").glob("*.py")]
    files += [*(REPO / "workflow" / "rules").glob("*.smk")]
    found = []
    for path in files:
        text = path.read_text()
        try:
            tree = ast.parse(text)
        except SyntaxError:  # Snakemake rules are not plain Python: check the lines textually
            found += [
                f"{path.name}:{i}"
                for i, line in enumerate(text.splitlines(), 1)
                if any(f'== "{n}"' in line or f'"{n}" in' in line for n in names)
            ]
            continue
        found += [f"{path.name}:{line}" for line in _method_name_literals(tree, names)]
    assert not found, found


def test_the_name_check_sees_comparisons_and_loops_but_not_data_keys():
    tree = ast.parse('if m == "tt":\n    pass\nfor m in ("trifle-s", "x"):\n    pass\nP = {"tt": 1}\n')
    assert _method_name_literals(tree, {"tt", "trifle-s"}) == [1, 3]
