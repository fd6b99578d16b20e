"""Shared test fixtures: repository paths, the real Sentinel-1 samples, subprocess helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_S1 = REPO.parent / "shared" / "data" / "real_s1"
COMPAT = REPO.parent / "shared" / "compat"


def doc_files() -> list[Path]:
    """The documentation the tests keep true: README.md, then every Markdown file of docs/ by name."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def real_s1() -> Path:
    """The real Sentinel-1 samples read in place; the test is skipped when they are absent."""
    if not REAL_S1.is_dir():
        pytest.skip("shared/data/real_s1 not present")
    return REAL_S1


@pytest.fixture
def compat_dir() -> Path:
    if not COMPAT.is_dir():
        pytest.skip("shared/compat manifests not present")
    return COMPAT


def run_py(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository (or ``cwd``) and return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


# Smallest real MixMIM run: tiny model at 64 px (grids 16/8/4/2), no loader workers, no progress bar.
TINY_PRETRAIN = ["--model", "mixmim_tiny", "--input_size", "64", "--num_samples", "16", "--batch_size", "4",
                 "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--no-progress",
                 "--vis_samples", "2"]
