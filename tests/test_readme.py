"""The README stays true: two Quickstart commands, CI runs the second, every file it names exists."""
import re

from conftest import REPO

README = (REPO / "README.md").read_text()


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


def test_every_project_file_the_readme_names_exists():
    named = set(re.findall(r"\b((?:configs|scripts|analysis|benchmarks|sarwmix|util|tests)/[\w./-]+\.(?:py|sh|yaml))",
                           README))
    assert len(named) > 20
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_every_module_run_with_python_m_exists():
    modules = set(re.findall(r"python -m ((?:sarwmix|util|analysis)\.\w+)", README))
    assert modules
    missing = sorted(m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).exists())
    assert not missing, missing


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")


def test_every_internal_link_points_to_a_heading():
    in_code, anchors = False, set()
    for line in README.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_anchor(line.lstrip("#")))
    links = set(re.findall(r"\]\(#([\w-]+)\)", README))
    assert links, "no internal links found"
    assert not sorted(links - anchors), f"links to missing headings: {sorted(links - anchors)}"
