"""The repository's paper citations stay inside the repository, and its cross-references resolve.

Code, configs and docs cite the paper through `docs/paper.md#<anchor>`. These tests fail when a text file
points at notes outside the repository, or when a reference names an anchor docs/paper.md does not have
(an explicit `<a id="...">` or a GitHub-style heading slug).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "docs" / "paper.md"

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".smk", ".toml", ".rst", ".sh", ".cfg", ".txt"}
TEXT_NAMES = {"Snakefile"}
# Not part of the source tree: virtual environments, caches, tool state and workflow outputs (.gitignore).
SKIP_DIRS = {
    ".venv",
    ".snakemake",
    ".git",
    ".whl",
    ".gl",
    ".cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "logs",
    "data",
    "dvc-remote",
}
SKIP_PATHS = {("results", "checkpoints"), ("results", "eval"), (".dvc", "cache"), (".dvc", "tmp")}

# Built from pieces so that this file does not match its own patterns.
FORBIDDEN = (
    "notes " + "\u00a7",
    "../" + "shared",
    "shared/" + "paper",
    "shared/" + "notes",
    "/work/" + "shared",
)

# `docs/paper.md#x`, `../docs/paper.md#x`, `paper.md#x` (not `other-paper.md#x`).
PAPER_REF = re.compile(r"(?<![\w-])paper\.md#([\w-]+)")
# A Markdown link to paper.md: the path must lead to docs/paper.md from the linking file.
PAPER_LINK = re.compile(r"\]\(\s*<?([^)\s>]*?paper\.md)(?:#[^)\s>]*)?>?\s*\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def text_files() -> Iterator[Path]:
    """Every source or documentation text file of the repository, skipping ignored trees."""

    def walk(directory: Path) -> Iterator[Path]:
        for entry in sorted(directory.iterdir()):
            rel = entry.relative_to(REPO).parts
            if entry.is_dir():
                if entry.name in SKIP_DIRS or entry.name.endswith(".egg-info") or rel in SKIP_PATHS:
                    continue
                if not entry.is_symlink():
                    yield from walk(entry)
            elif entry.is_file() and (entry.suffix in TEXT_SUFFIXES or entry.name in TEXT_NAMES):
                yield entry

    yield from walk(REPO)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading (before the -1, -2 suffixes of repeated headings)."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML, e.g. an <a id> on the heading line
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images keep their text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors a Markdown document defines: explicit `<a id=...>` tags and heading slugs."""
    found = set(EXPLICIT_ANCHOR.findall(markdown))
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def bad_paper_refs(text: str, known: set[str]) -> list[str]:
    """References `paper.md#x` in `text` whose anchor x is not in `known`."""
    return [f"paper.md#{name}" for name in PAPER_REF.findall(text) if name not in known]


def bad_paper_links(path: Path, text: str) -> list[str]:
    """Markdown links to a paper.md that, relative to `path`, is not docs/paper.md."""
    bad = []
    for target in PAPER_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # an external URL
            continue
        if (path.parent / target).resolve() != PAPER:
            bad.append(target)
    return bad


def test_paper_notes_exist_and_define_anchors():
    assert PAPER.is_file()
    defined = anchors(read(PAPER))
    for name in (
        "beam-search",
        "adaptive-threshold",
        "multi-step-value",
        "hyperparameters",
        "gpt",
        "circuit",
    ):
        assert name in defined


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in text_files():
        for number, line in enumerate(read(path).splitlines(), 1):
            for pattern in FORBIDDEN:
                if pattern in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {pattern!r}")
    assert not offenders, "citations of notes outside the repository:\n" + "\n".join(offenders)


def test_every_paper_reference_resolves():
    known = anchors(read(PAPER))
    offenders = []
    checked = 0
    for path in text_files():
        if path == Path(__file__).resolve():  # its own examples of bad references
            continue
        text = read(path)
        checked += len(PAPER_REF.findall(text))
        rel = path.relative_to(REPO)
        offenders += [f"{rel}: {ref} (no such anchor)" for ref in bad_paper_refs(text, known)]
        if path.suffix == ".md":
            offenders += [
                f"{rel}: link to {target} (not docs/paper.md)" for target in bad_paper_links(path, text)
            ]
    assert checked > 0, "no docs/paper.md references found: the pattern no longer matches"
    assert not offenders, "broken docs/paper.md references:\n" + "\n".join(offenders)


def test_the_checks_catch_bad_references():
    markdown = '<a id="explicit"></a>\n## A `code` heading (with [a link](x.md))\n## Repeat\n## Repeat\n'
    defined = anchors(markdown)
    assert {"explicit", "a-code-heading-with-a-link", "repeat", "repeat-1"} <= defined
    text = "see docs/paper.md#explicit and [notes](paper.md#missing), not my-paper.md#missing"
    assert bad_paper_refs(text, defined) == ["paper.md#missing"]
    assert bad_paper_links(REPO / "README.md", "[a](docs/paper.md#x) [b](paper.md#x)") == ["paper.md"]
    assert not bad_paper_links(REPO / "docs" / "gpt.md", "[a](paper.md#x) [b](https://example.org/paper.md)")


# `docs/evaluation.md#x`, `mujoco.md#x`, `README.md#x`: a reference to an anchor of one of the project's
# own documents, from any text file (code comments and configs cite the docs this way too).
DOC_REF = re.compile(r"(?<![\w/-])(?:docs/)?([\w-]+\.md)#([\w-]+)")


def bad_doc_refs(text: str, known: dict[str, set[str]]) -> list[str]:
    """References `<doc>.md#x` in `text` to a document of ``known`` that has no anchor x."""
    return [
        f"{name}#{anchor}"
        for name, anchor in DOC_REF.findall(text)
        if name in known and anchor not in known[name]
    ]


def test_every_reference_to_a_project_document_anchor_resolves():
    documents = {p.name: p for p in (REPO / "docs").glob("*.md")} | {"README.md": REPO / "README.md"}
    known = {name: anchors(read(path)) for name, path in documents.items()}
    offenders, checked = [], 0
    for path in text_files():
        if path == Path(__file__).resolve():
            continue
        text = read(path)
        checked += sum(name in known for name, _ in DOC_REF.findall(text))
        offenders += [f"{path.relative_to(REPO)}: {ref}" for ref in bad_doc_refs(text, known)]
    assert checked > 50, f"only {checked} document references found: the pattern no longer matches"
    assert not offenders, "references to anchors that do not exist:\n" + "\n".join(sorted(set(offenders)))


def test_the_document_check_catches_a_missing_anchor():
    known = {"evaluation.md": {"q-taxi"}}
    text = "see docs/evaluation.md#q-taxi, evaluation.md#nope and other.md#x"
    assert bad_doc_refs(text, known) == ["evaluation.md#nope"]
