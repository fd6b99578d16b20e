"""The documentation stays true: README.md and every docs/*.md name files that exist, link to headings and
files that exist, and run commands that exist; the README's Quickstart is two commands and CI runs the second."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO, doc_files

README = (REPO / "README.md").read_text()
DOCS = {path: path.read_text() for path in doc_files()}
ALL_TEXT = "\n".join(DOCS.values())
# A Markdown link or image outside code: [text](target) or ![alt](target).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    first, second = quickstart_commands()
    assert first.startswith("pip install -e") and "python main_pretrain.py" in first
    assert second.startswith("pip install -e") and second.endswith("pytest")
    ci = (REPO / ".ci" / "run").read_text().replace("--quiet ", "")
    install = second.split("&&")[0].strip()
    assert install in ci and re.search(r"&& pytest\b", ci)


def test_every_project_file_the_docs_name_exists():
    named = set(re.findall(r"\b((?:configs|scripts|analysis|benchmarks|sarwmix|util|tests)/[\w./-]+\.(?:py|sh|yaml))",
                           ALL_TEXT))
    assert len(named) > 20
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"the documentation names files that do not exist: {missing}"


def test_every_module_run_with_python_m_exists():
    modules = set(re.findall(r"python -m ((?:sarwmix|util|analysis|benchmarks)(?:\.\w+)+)", ALL_TEXT))
    assert modules
    missing = sorted(m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).exists())
    assert not missing, missing


def test_every_script_run_with_python_exists():
    """``python path.py`` in any document (``.../`` marks an elided absolute path in printed output)."""
    scripts = {s for s in re.findall(r"\bpython ([\w./-]+\.py)\b", ALL_TEXT) if not s.startswith("...")}
    assert {"main_pretrain.py", "main_finetune.py"} <= scripts
    missing = sorted(s for s in scripts if not (REPO / s).is_file())
    assert not missing, missing


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fences may be indented inside list items)."""
    in_code, lines = False, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    """Anchors of a document's headings, with GitHub's -1, -2 suffixes for repeated titles."""
    found: set[str] = set()
    for line in _prose_lines(text):
        if line.startswith("#"):
            anchor = base = _anchor(line.lstrip("#"))
            count = 0
            while anchor in found:
                count += 1
                anchor = f"{base}-{count}"
            found.add(anchor)
    return found


def links(text: str) -> list[str]:
    """Link and image targets outside code blocks, web addresses left out."""
    targets = [t for line in _prose_lines(text) for t in LINK.findall(line)]
    return [t for t in targets if not re.match(r"^(https?|mailto):", t)]


def broken_links(doc: Path) -> list[str]:
    """Targets of ``doc`` whose file does not exist or whose ``#anchor`` is no heading of its document."""
    broken = []
    for target in links(DOCS[doc]):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            broken.append(target)
    return broken


def test_the_heading_anchors_follow_github():
    assert anchors("# A `--flag` (B)\n## Tests\n```\n# comment\n```\n### Tests\n") == {"a---flag-b", "tests",
                                                                                         "tests-1"}


def test_every_link_points_to_a_file_and_heading_that_exist():
    """Links within a document (#anchor), to another one (FINETUNE.md#anchor, ../README.md) and to files."""
    assert any(t.startswith("#") for t in links(README)), "no internal links found"
    broken = {doc.relative_to(REPO).as_posix(): bad for doc in DOCS if (bad := broken_links(doc))}
    assert not broken, f"links to missing files or headings: {broken}"


def test_a_broken_link_is_found(tmp_path):
    doc = tmp_path / "A.md"
    doc.write_text("# A\n## Here\n[ok](#here) [bad](#there) [f](B.md#b) [g](missing.md) [w](https://x.org/y)\n")
    (tmp_path / "B.md").write_text("# B\n")
    DOCS[doc] = doc.read_text()
    try:
        assert broken_links(doc) == ["#there", "missing.md"]
    finally:
        del DOCS[doc]


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    return text.split(f"\n{heading}\n", 1)[1].split(f"\n{level} ", 1)[0]


def test_readme_is_a_front_page_of_at_most_250_lines():
    assert len(README.splitlines()) <= 250, "move details to docs/ and link them from the README's map"


def test_every_doc_is_linked_from_the_readmes_map():
    doc_map = _section(README, "## Documentation")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", doc_map))
    docs = {path.relative_to(REPO).as_posix() for path in (REPO / "docs").glob("*.md")}
    assert len(docs) >= 8 and not sorted(docs - linked), f"docs missing from the README's map: {sorted(docs - linked)}"


def _arm_table(text: str) -> dict[str, dict[str, str]]:
    """The first study table of a document (the one under its first ``| arm |`` header, not the later ones such
    as a replication's): arm -> column header -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, *body = table
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_readme_results_summary_copies_the_full_table():
    summary = _arm_table(_section(README, "## Results"))
    full = _arm_table((REPO / "docs" / "RESULTS.md").read_text())
    assert list(summary) == list(full) and "random_init" in summary
    for arm, cells in summary.items():
        assert cells == {column: full[arm][column] for column in cells}, arm
    assert "](docs/figures/study.png)" in README and "](docs/RESULTS.md" in README
