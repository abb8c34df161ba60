"""Fingerprints of the package code a stage runs, for Snakemake's rerun decisions.

Snakemake's ``code`` trigger only sees a rule's own shell/script, not the library it calls. Each rule
therefore passes, as a param, a hash of the syntax trees of the stage module and every ``trifle``
module it imports (transitively). Hashing the AST, not the text, means comments, docstring-free
reformatting and blank lines do not retrain models; any change to what the code does does.

The walk follows imports, so a stage's fingerprint is only as narrow as its imports: code a stage
does not run (table formatting, the list of stages, other stages) must not sit in a module it imports
or in a package ``__init__`` above it. ``tests/test_architecture.py`` holds that in place.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a ``trifle.*`` module under ``root``, or None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != "trifle":
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Names imported by a module anywhere in it (``from m import n`` gives ``m`` and ``m.n``), with
    relative imports resolved; the fingerprint walk and the layer test (tests/test_architecture.py) both
    read imports through it."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return tree


def _parsed(name: str, root: Path) -> tuple[str, frozenset[str]] | None:
    """One module's docstring-free AST dump and the modules it imports (None outside the package)."""
    path = _module_file(name, root)
    if path is None:
        return None
    return _parse_source(name, path.name == "__init__.py", path.read_text(), str(path))


@functools.cache
def _parse_source(name: str, is_package: bool, source: str, filename: str) -> tuple[str, frozenset[str]]:
    """Cached by the source text itself: a DAG build fingerprints every stage and the stages share most
    of their modules, so each file is parsed once, and an edited file is parsed again."""
    tree = ast.parse(source, filename=filename)
    imports = frozenset(imported_modules(tree, name, is_package))
    return ast.dump(_strip_docstrings(tree)), imports


@functools.cache
def code_fingerprint(module: str, *more: str, root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the docstring-free ASTs of ``module`` (and ``more``) and the trifle modules they reach.

    ``more`` names modules a stage loads by name at run time (the static walk cannot see them);
    ``root`` is the package directory (another copy of it in tests).
    """
    seen: dict[str, str] = {}
    pending = [module, *more]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        parsed = _parsed(name, Path(root))
        if parsed is None:
            continue
        seen[name], imports = parsed
        pending.extend(imports)
        # Parent packages run on import too.
        if "." in name:
            pending.append(name.rpartition(".")[0])
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + seen[name].encode() + b"\0")
    return digest.hexdigest()[:16]
