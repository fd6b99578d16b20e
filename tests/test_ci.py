"""The default test run leaves out the heavy end-to-end cases, and CI runs them in a second call."""
import re
import subprocess
import sys

from conftest import REPO


def test_default_run_excludes_heavy_and_faults_and_ci_runs_them():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"""^addopts = ".*-m 'not heavy and not manual and not faults'.*"$""", pyproject,
                     flags=re.MULTILINE)
    assert re.search(r'^    "heavy: ', pyproject, flags=re.MULTILINE)
    assert re.search(r'^    "faults: ', pyproject, flags=re.MULTILINE)
    ci = (REPO / ".ci" / "run").read_text()
    extra = re.search(r"""^pytest .*-m "heavy or faults".*$""", ci, flags=re.MULTILINE)
    assert extra and "[ $? -eq 5 ]" in extra.group(0)  # exit code 5: nothing selected, not a failure


def test_docs_state_both_commands():
    """The README's tests section gives both commands; docs/TESTING.md gives them with their times."""
    readme = (REPO / "README.md").read_text().split("## Tests and project layout", 1)[1].split("\n## ", 1)[0]
    assert 'pytest -m "heavy or faults"' in readme and "docs/TESTING.md" in readme
    testing = (REPO / "docs" / "TESTING.md").read_text()
    assert 'pytest -m "heavy or faults"' in testing and "minutes" in testing


def _default_run_figures(text: str) -> list[tuple[int, int]]:
    """Every "N passed, M skipped" of a document: the default run's figures as it states them."""
    return [(int(p), int(s)) for p, s in re.findall(r"\b(\d+) passed, (\d+) skipped\b", text)]


def test_testing_doc_states_the_current_figures_once_and_the_readme_agrees():
    """No diary of CI rounds: one statement of the default run's figures, the README's the same."""
    testing = (REPO / "docs" / "TESTING.md").read_text()
    readme = (REPO / "README.md").read_text().split("## Tests and project layout", 1)[1].split("\n## ", 1)[0]
    assert len(_default_run_figures(testing)) == 1 and _default_run_figures(readme) == _default_run_figures(testing)
    assert not re.search(r"\b(session|second run|first run|rounds of CI)\b", testing, flags=re.IGNORECASE)
    assert len(re.findall(r"\bpassed in \d+", testing)) <= 2  # the default run and the heavy run, once each


def test_the_readme_count_is_what_the_default_run_collects():
    """The README's "N passed, M skipped" adds up to the tests the README's command collects (the skipped ones
    are those without the real Sentinel-1 samples, which pass where $SARWMIX_REAL_S1 names them)."""
    [(passed, skipped)] = _default_run_figures(
        (REPO / "README.md").read_text().split("## Tests and project layout", 1)[1].split("\n## ", 1)[0])
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    summary = proc.stdout.strip().splitlines()[-1]
    collected = re.match(r"^(\d+)(?:/\d+)? tests? collected", summary)
    assert proc.returncode == 0 and collected, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert int(collected.group(1)) == passed + skipped, summary
