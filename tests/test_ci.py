"""The default test run leaves out the heavy end-to-end cases, and CI runs them in a second call."""
import re

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
    assert "pytest -m heavy" in readme and "docs/TESTING.md" in readme
    testing = (REPO / "docs" / "TESTING.md").read_text()
    assert "pytest -m heavy" in testing and "minutes" in testing
