"""Every document the code and the docs cite is in the repository, and so is every numbered section they cite:
"docs/protocol.md §4.2", "docs/kernels.md §1-§3", "§4.1-4.3". A "§" with no document before it refers to the
page it stands in, and is an error anywhere else."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".ini", ".cpp", ".h", ".cu", ".cuh"}
SKIPPED_DIRS = {"build", "dist", "runs", "data", "__pycache__"}
# Files the code writes, named where it writes them; not documents it cites.
WRITTEN_FILES = {"report.md"}  # agent.report's report

SECTION = r"\d+(?:\.\d+)*"
# a document name, an optional closing backtick, then any number of "§a", "§a-b", "§a-§b" joined by , ; or spaces
CITATION = re.compile(
    rf"(?<![\w./-])(?P<doc>(?:[\w.-]+/)*[\w-]+\.md)\b`?(?P<sections>(?:[ ,;]*§{SECTION}(?:-§?{SECTION})?)*)"
)
HEADING = re.compile(rf"^#+\s+(?P<number>{SECTION})\.?\s", re.MULTILINE)


def source_files() -> list[Path]:
    """The repository's code and docs, less this file (whose examples are bad citations on purpose)."""
    return sorted(
        path for path in ROOT.rglob("*")
        if path.is_file() and path.suffix in SOURCE_SUFFIXES and path != Path(__file__).resolve()
        and not any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info")
                    for part in path.relative_to(ROOT).parts)
    )


def sections_of(page: Path) -> set[str]:
    return {m["number"] for m in HEADING.finditer(page.read_text())}


def cited_sections(text: str) -> list[str]:
    """"§1.4, §2.2" -> ["1.4", "2.2"]; a range names its two ends: "§4.1-4.3" -> ["4.1", "4.3"]."""
    return re.findall(SECTION, text)


def citation_errors(path: Path, text: str) -> list[str]:
    """One line per citation in `text` (the content of `path`) of a missing document or section."""
    errors = []
    where = lambda offset: f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"  # noqa: E731
    covered = set()  # offsets of the section signs that belong to a citation
    for match in CITATION.finditer(text):
        name = match["doc"]
        covered.update(match.start("sections") + i for i, c in enumerate(match["sections"]) if c == "§")
        if Path(name).name in WRITTEN_FILES:
            continue
        page = next((p for p in (ROOT / name, path.parent / name) if p.is_file()), None)
        if page is None:
            errors.append(f"{where(match.start())}: cites {name}, which is not in the repository")
            continue
        missing = [s for s in cited_sections(match["sections"]) if s not in sections_of(page)]
        if missing:
            errors.append(f"{where(match.start())}: cites {name} §{', §'.join(missing)}, which it does not have")
    for offset in (i for i, c in enumerate(text) if c == "§" and i not in covered):
        number = re.match(SECTION, text[offset + 1:])
        if path.suffix != ".md":
            errors.append(f"{where(offset)}: a § with no document before it")
        elif number is None or number[0] not in sections_of(path):
            errors.append(f"{where(offset)}: cites its own §{number[0] if number else ''}, which it does not have")
    return errors


def test_every_cited_document_and_section_exists():
    files = source_files()
    assert ROOT / "docs" / "kernels.md" in files and ROOT / "models" / "layers.py" in files
    errors = [e for path in files for e in citation_errors(path, path.read_text(errors="replace"))]
    assert errors == []


def test_the_docs_have_numbered_sections_where_the_code_cites_them():
    """The parsing itself: what a citation test that read nothing would miss."""
    assert {"1", "1.4", "4.2"} <= sections_of(ROOT / "docs" / "protocol.md")
    assert {"1", "6"} <= sections_of(ROOT / "docs" / "kernels.md")
    assert cited_sections(" §1.3-1.4, §2.2") == ["1.3", "1.4", "2.2"]


def test_the_check_reports_each_kind_of_bad_citation():
    here = ROOT / "models" / "example.py"
    text = ("ok: docs/protocol.md §4.1-4.3 and `docs/kernels.md` §1-§3\n"
            "outside: experiments.md §2.5\n"
            "no such section: docs/kernels.md §6, §9.1\n"
            "bare: (§5.1)\n"
            "written: writes report.md\n")
    assert citation_errors(here, text) == [
        "models/example.py:2: cites experiments.md, which is not in the repository",
        "models/example.py:3: cites docs/kernels.md §9.1, which it does not have",
        "models/example.py:4: a § with no document before it",
    ]
    page = ROOT / "docs" / "protocol.md"
    assert citation_errors(page, "see §1.3 and §7") == ["docs/protocol.md:1: cites its own §7, which it does not have"]
