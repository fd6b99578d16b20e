"""``util.device.tune_cpu_memory``: a freed activation is reused without being faulted in again.

Page faults are counted (``getrusage``), not timed. Each case runs in its own process because the allocator
setting is process-wide.

The tuned heap needs some rounds to settle: small allocations made while the 64 MB block is alive (a tensor's
bookkeeping) can land after it, so the freed block is not always followed by free space, and a 2 MB-aligned
64 MB request needs 2 MB more than the block. glibc then grows the heap by fresh memory (about 544 faults with
huge pages) until freed blocks have merged into a large enough hole. How long that takes depends on the
address layout, which changes from process to process: over 155 processes of 12 allocations, 132 settled at
once, the others after 1 to 11 rounds. A training loop allocates the same sizes at every step and settles in
its first steps; the test counts the fewest faults over 60 allocations after the first, so it checks that
freed memory is reused at all, not how soon.
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
from conftest import run_py

from util.device import tune_cpu_memory

# Fewest faults of allocating and filling a 64 MB tensor (16,384 pages of 4 KB) after the same size was freed.
SCRIPT = """
import resource, sys, torch
from util.device import tune_cpu_memory
print(tune_cpu_memory(sys.argv[1]))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(min(faults() for _ in range(ROUNDS)))
"""

glibc_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="the tuning targets glibc on Linux")


def _faults(mode: str, tmp_path: Path) -> tuple[str, int]:
    script = tmp_path / "faults.py"
    script.write_text(SCRIPT.replace("ROUNDS", "3" if mode == "system" else "60"))
    out = run_py([str(script), mode], env={"THP_MEM_ALLOC_ENABLE": "0"} if mode == "system" else None)
    applied, faults = out.stdout.strip().splitlines()[-2:]
    return applied, int(faults)


@glibc_linux
def test_tuned_allocator_reuses_freed_memory_without_page_faults(tmp_path):
    applied, faults = _faults("tuned", tmp_path)
    assert "freed memory kept" in applied and "huge pages" in applied
    assert faults < 100, f"{faults} page faults re-allocating a freed 64 MB tensor"


@glibc_linux
def test_system_allocator_is_left_alone(tmp_path):
    applied, faults = _faults("system", tmp_path)
    assert applied == "system allocator"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" not in thp.read_text():
        # glibc maps a 64 MB block afresh each time: the cost tune_cpu_memory removes.
        assert faults > 10_000


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'fast'.*'tuned' or 'system'"):
        tune_cpu_memory("fast")


def test_write_text_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    from util.files import write_text_atomic

    path = write_text_atomic(tmp_path / "results.json", "{}\n")
    write_text_atomic(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_json_lines_are_strict_json(tmp_path):
    """NaN/inf (a first update's grad norm, an fp16 skipped step) become null, which every JSON parser reads."""
    import json

    from util.logs import JsonLines

    log = JsonLines(tmp_path / "train_log.json")
    log.write({"iter": 0, "grad_norm": float("nan"), "loss": float("inf"), "lr": [1e-4, float("-inf")]})
    log.close()
    line = (tmp_path / "train_log.json").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"iter": 0, "grad_norm": None, "loss": None, "lr": [1e-4, None]}
