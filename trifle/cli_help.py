"""The command line's help texts: what each command does, and for ``<stage> --help`` every config key the
stage reads, with its value and the meaning the YAML files under trifle/conf give it in a comment.

The meanings live next to the values they describe (a comment on the lines above a key, or at the end of
its line), so the help reads them from there rather than keeping a second copy that would drift. Hydra
drops comments when it composes, so a small line parser reads them, and the defaults lists are followed
(config.yaml's groups, and a group file's own ``defaults:``, such as a task file's ``_hopper`` that in turn
pulls in ``_mujoco``) to know which files a key can come from. Nothing here imports torch: help must answer
at once, and the stage modules are read as text, never imported.
"""

from __future__ import annotations

import ast
import re
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trifle.config import CONF_DIR, NOT_SLICED, STAGE_KEYS, STAGE_OUTPUTS, available, get

STAGES_DIR = Path(__file__).parent / "stages"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The workflow configs the multirun answer points at (they exist in a checkout, not in an installed wheel).
WORKFLOW_CONFIG = "workflow/config/default.yaml"
WORKFLOW_EXAMPLE = "workflow/config/paper.yaml"
# A meaning longer than this is cut at a word: the help gives the gist, the YAML file the full comment.
MEANING_CHARS = 160
# Where the meanings start, as argparse's max_help_position does for options.
MEANING_COLUMN = 34

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*)\s*:(?=\s|$)(?P<rest>.*)$")
_BLOCK_SCALAR = re.compile(r"[|>][+-]?[0-9]?[+-]?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"])")


# --- Command summaries ----------------------------------------------------------------------------


def command_summaries() -> dict[str, str]:
    """One line per command: a stage's from its module docstring (read, not imported: importing a stage
    would import torch), then show and sync."""
    out = {}
    for stage in STAGE_KEYS:
        path = STAGES_DIR / f"{stage}.py"
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except (OSError, SyntaxError):
            doc = ""
        line = doc.strip().splitlines()[0] if doc.strip() else ""
        out[stage] = re.sub(rf"^Stage `{re.escape(stage)}`:\s*", "", line).replace("``", "`")
    out["show"] = "print the whole resolved config as YAML"
    out["sync"] = "pull the pinned artifacts from DVC and mark them up to date for Snakemake"
    return out


def multirun_message() -> str:
    """The one-line answer to ``-m``/``--multirun``: Hydra's sweeper is not used, the workflow sweeps."""
    example = f", and {WORKFLOW_EXAMPLE} for a larger one" if (REPO_ROOT / WORKFLOW_EXAMPLE).is_file() else ""
    return (
        "-m/--multirun: `python -m trifle` runs one job; sweeps are declared in the workflow config "
        f"(seeds:, methods:, tasks:, groups:, per_task:, overrides:; see {WORKFLOW_CONFIG}{example}) and "
        "run by Snakemake: `snakemake --cores all --configfile FILE`"
    )


# --- Comments of the YAML files --------------------------------------------------------------------


@dataclass
class FileComments:
    """The comments of one config file: its header (the comment block it opens with, which describes the
    file, not its first key) and each key's comment, keyed by the dotted name inside the file."""

    header: str = ""
    keys: dict[str, str] = field(default_factory=dict)


def _comment_text(line: str) -> str:
    return line.strip()[1:].strip()


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, end-of-line comment) of the text after ``key:``; a ``#`` inside quotes is text, and YAML
    only starts a comment at a ``#`` that follows whitespace."""
    quote = ""
    for i, char in enumerate(rest):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def _open_brackets(value: str) -> int:
    """How many flow brackets (``[``/``{``) a line opens, less those it closes: a value left open goes on
    over the next lines, which are skipped."""
    depth, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return depth


def parse_comments(text: str) -> FileComments:
    """Each key's comment in one YAML file (block mappings; list items and flow values are values).

    A key's comment is the block of comment lines just above it (a blank line ends a block) and the comment
    at the end of its line. The block a file starts with is the file's header; a line of it that starts
    with ``<key>:`` begins the comment of that key, when that key comes next.
    """
    out = FileComments()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    block: list[str] = []
    block_is_header = False
    at_start = True  # no line but comments so far
    skip_deeper: int | None = None  # skip the lines of a list item, a block scalar or a flow value
    open_brackets = 0
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if open_brackets:
            open_brackets = max(open_brackets + _open_brackets(_split_comment(line)[0]), 0)
            continue
        if not stripped:
            if at_start and block:
                out.header = " ".join(block)
            block, block_is_header = [], False
            continue
        if stripped.startswith("#"):
            if not block:
                block_is_header = at_start
            block.append(_comment_text(line))
            continue
        if skip_deeper is not None and indent > skip_deeper:
            block = []
            continue
        skip_deeper = None
        at_start_before, at_start = at_start, False
        if stripped == "-" or stripped.startswith("- "):
            if block_is_header and at_start_before:
                out.header = " ".join(block)
            block, skip_deeper = [], indent
            continue
        match = _KEY_LINE.match(line)
        if match is None:
            block = []
            continue
        key = match["key"]
        value, end_comment = _split_comment(match["rest"])
        above = block
        if block_is_header:
            starts = [i for i, text in enumerate(block) if text.startswith(f"{key}:")]
            out.header = " ".join(block[: starts[-1]] if starts else block)
            above = block[starts[-1] :] if starts else []
            if above:  # "# name: the method's name ..." -> "the method's name ..."
                above = [above[0][len(key) + 1 :].strip(), *above[1:]]
        block, block_is_header = [], False
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        comment = " ".join([*above, end_comment]).strip()
        if comment and dotted != "defaults":
            out.keys[dotted] = comment
        if not value:
            stack.append((indent, key))
        elif _BLOCK_SCALAR.fullmatch(value):
            skip_deeper = indent  # the lines of a block scalar are its value
        else:
            open_brackets = max(_open_brackets(value), 0)
        if dotted == "defaults":
            skip_deeper = indent
    return out


# --- Which files a composition reads ---------------------------------------------------------------


def _load_defaults(path: Path) -> list[Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    entries = data.get("defaults") if isinstance(data, dict) else None
    return entries if isinstance(entries, list) else []


def _group_choices(overrides: Iterable[str]) -> dict[str, str | None]:
    """The group selections among the overrides (``gpt=paper``, ``+g=x``, ``~g``), the last one winning."""
    chosen: dict[str, str | None] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        deleted = key.startswith("~")
        key = key.lstrip("+~")
        if (CONF_DIR / key).is_dir():
            chosen[key] = None if deleted else value if sep else chosen.get(key)
    return chosen


def _files_of(path: Path, group: str, package: str, seen: frozenset[Path]) -> list[tuple[Path, str]]:
    """``path`` and the files its defaults list pulls in, in composition order, each with its package.

    Entries name files of the same group (``_hopper``), absolute files (``/group/name``) or subgroups
    (``sub: name``); ``_self_`` places the file itself, last when it is not listed (Hydra 1.1's order).
    """
    if path in seen or not path.is_file():
        return []
    seen = seen | {path}
    order: list[tuple[Path, str]] = []
    placed = False
    for entry in _load_defaults(path):
        if entry == "_self_":
            order.append((path, package))
            placed = True
        elif isinstance(entry, str):
            target = (
                CONF_DIR / f"{entry[1:]}.yaml" if entry.startswith("/") else path.parent / f"{entry}.yaml"
            )
            order += _files_of(target, group, package, seen)
        elif isinstance(entry, dict) and len(entry) == 1:
            ((sub, choice),) = entry.items()
            if not isinstance(sub, str) or not isinstance(choice, str) or " " in sub:
                continue
            sub_group = sub.lstrip("/") if sub.startswith("/") or not group else f"{group}/{sub}"
            target = CONF_DIR / sub_group / f"{choice}.yaml"
            order += _files_of(target, sub_group, sub_group.replace("/", "."), seen)
    if not placed:
        order.append((path, package))
    return order


def composition_files(overrides: Sequence[str] = ()) -> list[tuple[Path, str]]:
    """The config files a composition with ``overrides`` reads, in Hydra's order, each with its package
    (the dotted prefix its keys get: ``task`` for every file of the task group, ``""`` for config.yaml).
    Group selections override config.yaml's; nothing else in the overrides changes which files are read."""
    chosen = _group_choices(overrides)
    root = CONF_DIR / "config.yaml"
    order: list[tuple[Path, str]] = []
    placed = False
    for entry in _load_defaults(root):
        if entry == "_self_":
            order.append((root, ""))
            placed = True
        elif isinstance(entry, dict) and len(entry) == 1:
            ((group, choice),) = entry.items()
            choice = chosen.pop(group, choice)
            if choice is not None:
                order += _files_of(CONF_DIR / group / f"{choice}.yaml", group, group, frozenset())
    for group, choice in chosen.items():  # `+group=name`: appended, as Hydra does
        if choice is not None:
            order += _files_of(CONF_DIR / group / f"{choice}.yaml", group, group, frozenset())
    if not placed:
        order.append((root, ""))
    return order


def key_comments(overrides: Sequence[str] = ()) -> dict[str, tuple[str, Path]]:
    """Every commented key of a composition: dotted name -> (comment, file). Where several files set a
    key, the comment comes from the last one in the composition order that comments it."""
    out: dict[str, tuple[str, Path]] = {}
    for path, package in composition_files(overrides):
        for key, comment in parse_comments(path.read_text()).keys.items():
            out[f"{package}.{key}" if package else key] = (comment, path)
    return out


def meaning(comment: str) -> str:
    """The first sentence of a comment, cut at a word when it is still long."""
    first = _SENTENCE_END.split(" ".join(comment.split()), maxsplit=1)[0]
    if len(first) <= MEANING_CHARS:
        return first
    return first[: MEANING_CHARS - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


# --- The stage help --------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A value as an override would spell it (YAML flow style: ``null``, ``[0.9, 0.95]``, ``{a: 1}``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.strip().removesuffix("\n...").strip()


def stage_leaves(cfg: dict[str, Any], stage: str) -> list[tuple[str, Any]]:
    """The keys ``STAGE_KEYS[stage]`` names, expanded to their leaves (``gpt`` -> ``gpt.n_layer``, ...),
    with their values; the sub-keys left out of every slice (the method registry) are left out here too."""
    out: list[tuple[str, Any]] = []

    def walk(dotted: str, value: Any, skip: tuple[str, ...] = ()) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                if key not in skip:
                    walk(f"{dotted}.{key}", item)
        else:
            out.append((dotted, value))

    for key in STAGE_KEYS[stage]:
        walk(key, get(cfg, key), NOT_SLICED.get(key, ()))
    return out


def _rows(items: Iterable[tuple[str, str]], width: int) -> list[str]:
    """argparse's layout: the name, then its text from MEANING_COLUMN (on the next line when the name is
    too long), wrapped to the width."""
    lines = []
    for name, text in items:
        head = f"  {name}"
        if not text:
            lines.append(head)
            continue
        body = textwrap.wrap(text, max(width - MEANING_COLUMN, 30), break_on_hyphens=False)
        if len(head) + 2 <= MEANING_COLUMN:
            lines.append(head.ljust(MEANING_COLUMN) + body[0])
            body = body[1:]
        else:
            lines.append(head)
        lines += [" " * MEANING_COLUMN + part for part in body]
    return lines


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def stage_help(stage: str, overrides: Sequence[str] = (), width: int | None = None) -> str:
    """``python -m trifle <stage> --help``: the config keys the stage reads with their values in the
    composition of ``overrides`` and their meanings, the config groups they come from, and its outputs.

    It composes first, so a bad override fails here as it would in a run (one ConfigError line)."""
    from trifle.config import compose

    if width is None:
        width = max(shutil.get_terminal_size().columns - 2, 70)
    cfg = compose(overrides)
    comments = key_comments(overrides)

    def described(key: str, value: Any) -> tuple[str, str]:
        return f"{key}={format_value(value)}", meaning(comments.get(key, ("", None))[0])

    lines = [f"usage: python -m trifle {stage} [key=value ...] [-c/--cfg [all]] [-h]", ""]
    summary = command_summaries()[stage]
    lines += [*textwrap.wrap(summary[:1].upper() + summary[1:], width), ""]
    leaves = stage_leaves(cfg, stage)
    if leaves:
        values = f"given {' '.join(overrides)}" if overrides else "by default"
        intro = f"Config keys {stage} reads, with their values {values} (set one with key=value):"
        lines += [*textwrap.wrap(intro, width), *_rows((described(k, v) for k, v in leaves), width)]
    else:
        lines += textwrap.wrap(f"{stage} reads no config key but its paths.", width)

    groups = [g for g in dict.fromkeys(k.split(".")[0] for k in STAGE_KEYS[stage]) if (CONF_DIR / g).is_dir()]
    if groups:
        files = composition_files(overrides)
        lines += ["", "Config groups it reads (choose another file with group=name):"]
        for group in groups:
            chosen = [path for path, package in files if package == group]
            if not chosen:
                lines += _rows([(f"{group}=null", "")], width)
                continue
            header = meaning(parse_comments(chosen[-1].read_text()).header)
            text = f"{header} ({', '.join(_relative(p) for p in chosen)})".strip()
            lines += _rows([(f"{group}={chosen[-1].stem}", text)], width)
            others = [c for c in available(group) if c != chosen[-1].stem]
            lines += _rows([("", f"other choices: {', '.join(others)}")], width) if others else []

    outputs = STAGE_OUTPUTS.get(stage, ())
    if outputs:
        lines += ["", "Files it writes (the workflow passes its own paths):"]
        lines += _rows((described(f"paths.{key}", cfg["paths"].get(key)) for key in outputs), width)
    epilog = (
        f"-c/--cfg prints the values of these keys as YAML (the slice of the config {stage} reads) and runs "
        "nothing; --cfg all prints the whole config, as `python -m trifle show` does. The meanings are the "
        "comments of the files under trifle/conf/."
    )
    lines += ["", *textwrap.wrap(epilog, width)]
    return "\n".join(lines)
