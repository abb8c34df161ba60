"""The package's layers import one way, and a stage's code fingerprint covers only what it runs.

Layers, lowest first: base utilities (errors, io, devices, fingerprint) -> envs and data -> models ->
planning -> evaluation -> stages -> config and the command line. A module may import its own layer
and the ones below. The fingerprint test edits a temporary copy of the package, so the real files
are never touched.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from trifle import fingerprint
from trifle.fingerprint import code_fingerprint

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "trifle"
LAYERS = {
    "errors": 0,
    "io": 0,
    "devices": 0,
    "fingerprint": 0,
    "envs": 1,
    "data": 1,
    "models": 2,
    "planning": 3,
    "evaluation": 4,
    "stages": 5,
    "config": 6,
    "runinfo": 6,
    "publish": 6,
    "sync": 6,
    "cli_help": 6,
    "__main__": 7,
}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports anywhere (function-level imports too), relative ones resolved."""
    return fingerprint.imported_modules(
        ast.parse(path.read_text()), _module_name(path, root), path.name == "__init__.py"
    )


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "trifle":
        return None
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def test_every_package_module_has_a_layer():
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
    }
    assert top == set(LAYERS), f"give new top-level modules a layer in LAYERS: {sorted(top ^ set(LAYERS))}"


def test_imports_run_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path, PACKAGE)
        own = _layer(module)
        for name in imported_modules(path):
            target = _layer(name)
            if target is not None and target > own:
                upward.append(f"{module} imports {name}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_only_stages_and_the_command_line_import_the_stages():
    offenders = [
        f"{_module_name(path, PACKAGE)} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if not _module_name(path, PACKAGE).startswith(("trifle.stages", "trifle.__main__"))
        for name in imported_modules(path)
        if name == "trifle.stages" or name.startswith("trifle.stages.")
    ]
    assert not offenders, offenders


def test_benchmarks_use_public_names_only():
    private = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trifle"):
                if node.module.startswith("trifle.stages"):
                    private.append(f"{path.name}: {node.module}")
                private += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not private, private


def test_the_layer_check_sees_an_upward_import(tmp_path):
    pkg = tmp_path / "trifle" / "data"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("def f():\n    from ..stages import tables\n")
    assert "trifle.stages" in imported_modules(pkg / "bad.py", tmp_path / "trifle")


# ------------------------------------------------------------------------------------------ fingerprints

UPSTREAM_STAGES = ("data", "labels", "tokens", "train_gpt", "train_pc", "train_dt")


@pytest.fixture()
def package_copy(tmp_path):
    root = tmp_path / "trifle"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    return root


def _fingerprints(root: Path, stages=UPSTREAM_STAGES) -> dict[str, str]:
    code_fingerprint.cache_clear()
    try:
        return {s: code_fingerprint(f"trifle.stages.{s}", root=root) for s in stages}
    finally:
        code_fingerprint.cache_clear()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found; update this test to the code's new shape"
    path.write_text(text.replace(old, new, 1))


def test_table_formatting_and_the_stage_list_do_not_touch_upstream_fingerprints(package_copy):
    before = _fingerprints(package_copy)
    _edit(package_copy / "evaluation" / "tables.py", '"{value:.4f}"', '"{value:.6g}"')
    _edit(package_copy / "config.py", '    "tables": (),', '    "tables": (),\n    "new_stage": (),')
    (package_copy / "stages" / "new_stage.py").write_text("def run(cfg):\n    return None\n")
    _edit(package_copy / "stages" / "tables.py", "sorted(", "list(")
    _edit(package_copy / "__main__.py", '"show", "sync"', '"show", "sync", "extra"')
    assert _fingerprints(package_copy) == before


def test_fingerprints_do_change_with_the_code_a_stage_runs(package_copy):
    before = _fingerprints(package_copy)
    _edit(package_copy / "models" / "gpt.py", "import math", "import math\nEXTRA = 1")
    after = _fingerprints(package_copy)
    changed = {s for s in before if before[s] != after[s]}
    assert "train_gpt" in changed and not {"data", "labels", "tokens", "train_pc"} & changed
    # An evaluate job is fingerprinted with its method's policy module (loaded by name from the registry):
    # a beam-search edit reruns the beam planners' evaluations, not DT's.
    beam, dt = "trifle.planning.planners", "trifle.planning.dt_policy"

    def evaluate(policy_module: str) -> str:
        code_fingerprint.cache_clear()
        return code_fingerprint("trifle.stages.evaluate", policy_module, root=package_copy)

    before = {beam: evaluate(beam), dt: evaluate(dt)}
    _edit(package_copy / "planning" / "beam.py", "import torch", "import torch\nEXTRA = 1")
    assert evaluate(beam) != before[beam] and evaluate(dt) == before[dt]
    code_fingerprint.cache_clear()
