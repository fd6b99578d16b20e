"""Shared test fixtures: repository paths, the real Sentinel-1 samples, subprocess helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# State-dict manifests of the released models (names, shapes, dtypes; no weights): test data of this
# repository, listed with their provenance and SHA-256 in THIRD_PARTY.md.
COMPAT = REPO / "tests" / "data" / "compat"
# The real Sentinel-1 samples are not part of the repository (their terms do not allow copying them in):
# tests that read them find their folder through this variable and are skipped without it.
REAL_S1_ENV = "SARWMIX_REAL_S1"
REAL_S1_HOWTO = (f"set {REAL_S1_ENV} to the folder of the real Sentinel-1 samples to run it "
                 f"(docs/TESTING.md, 'Real Sentinel-1 samples', says where to get them)")


def doc_files() -> list[Path]:
    """The documentation the tests keep true: README.md, then every Markdown file of docs/ by name."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _close_lmdb_environments():
    """After each test, close the LMDB environments it opened: pytest deletes a passed test's folder, and a new
    file reusing the inode of a deleted, still-open environment's lock file is refused by py-lmdb as already open."""
    yield
    readers = sys.modules.get("sarwmix.data.bigearthnetv2")
    if readers is not None:
        readers.close_lmdb_environments()


def real_s1_dir(part: str = "") -> Path:
    """The folder ``$SARWMIX_REAL_S1/part``, read in place; the calling test is skipped, saying how to run it,
    when the variable is unset or the folder is missing."""
    root = os.environ.get(REAL_S1_ENV)
    if not root:
        pytest.skip(f"needs the real Sentinel-1 samples: {REAL_S1_HOWTO}")
    folder = Path(root) / part
    if not folder.is_dir():
        pytest.skip(f"{REAL_S1_ENV}={root}: no folder {part or root} there; {REAL_S1_HOWTO}")
    return folder


@pytest.fixture
def real_s1() -> Path:
    """The real Sentinel-1 samples (``$SARWMIX_REAL_S1``), read in place; skipped when absent."""
    return real_s1_dir()


@pytest.fixture
def compat_dir() -> Path:
    """The state-dict manifests of the released models (always present: they are test data of the repository)."""
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
