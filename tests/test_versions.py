"""util.versions: a torchvision built for another torch ends every entry point with one line naming both."""
from __future__ import annotations

import pytest
from conftest import run_py

from util.versions import matching_torchvision, mismatch_message

FAILURE = RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("torch_version, vision", [("2.1.0", "0.16"), ("2.6.0+cu124", "0.21"), ("2.14.1", "0.29")])
def test_the_torchvision_series_of_a_torch(torch_version, vision):
    assert matching_torchvision(torch_version) == vision


def test_a_pair_is_not_called_a_mismatch():
    assert mismatch_message("2.14.1", "0.29.1", FAILURE) is None
    assert mismatch_message("2.6.0+cpu", "0.21.0+cpu", FAILURE) is None
    assert mismatch_message("3.0.0", "0.1.0", FAILURE) is None  # outside the rule: the original error stands


def test_a_mismatch_names_both_versions_and_the_fix():
    assert mismatch_message("2.6.0+cpu", "0.20.1+cpu", FAILURE) == (
        "torchvision 0.20.1+cpu does not match torch 2.6.0+cpu (importing it failed: operator torchvision::nms does "
        "not exist); install the torchvision built for this torch: pip install 'torchvision==0.21.*' "
        "--index-url https://download.pytorch.org/whl/cpu")
    assert mismatch_message("2.14.1", None, ImportError("No module named 'torchvision'")).startswith(
        "torchvision is not installed and does not match torch 2.14.1")


def test_an_entry_point_with_a_mismatched_torchvision_ends_in_one_line(tmp_path):
    """A torchvision whose import fails as a build for another torch does, found before the installed one."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(f"raise RuntimeError({str(FAILURE)!r})\n")
    (tmp_path / "torchvision-0.1.0.dist-info").mkdir()
    (tmp_path / "torchvision-0.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.1.0\n")
    proc = run_py(["main_pretrain.py", "--epochs", "1", "--output_dir", str(tmp_path / "out")],
                  env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: torchvision 0.1.0 does not match torch ")
    assert "operator torchvision::nms does not exist" in line and "pip install 'torchvision==0." in line
    assert not (tmp_path / "out").exists()
