"""What the machine offers a run: the autocast precision of ``--amp`` (bf16 where the CPU or GPU has it natively)
and the CPU allocator tuning of ``--cpu_memory``."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
CPU_MEMORY_MODES = ("tuned", "system")  # --cpu_memory of the entry points and benchmarks


def tune_cpu_memory(mode: str = "tuned") -> str:
    """Keep a CPU training step from page-faulting its activations in again at every step.

    glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives
    freed memory back to the kernel, so the large activations of a step (64 MB per MLP tensor of
    ``mixmim_base`` at batch 32) are faulted in, 4 KB page by page, at every step: 0.14-0.53 million page
    faults per step (see ``benchmarks/bench_pretrain.py``). ``tuned`` keeps freed memory in the process
    (no ``mmap`` for tensors, the heap never trimmed) and backs tensors of 2 MB or more with transparent huge
    pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``, where the kernel allows ``madvise``). Call it before the first
    large tensor. The resident size stays near the step's peak instead of shrinking between steps. The heap
    settles in the first steps: until freed blocks have merged into holes large enough for the 2 MB-aligned
    requests, a step may still fault in fresh memory (a few hundred faults per 64 MB with huge pages).
    ``system`` leaves the allocator alone. Returns what was applied, for the log.
    """
    if mode == "system":
        return "system allocator"
    if mode not in CPU_MEMORY_MODES:
        raise ValueError(f"cpu memory mode {mode!r}: expected {' or '.join(map(repr, CPU_MEMORY_MODES))}")
    applied = []
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ["THP_MEM_ALLOC_ENABLE"] == "1":
        applied.append("huge pages for tensors >= 2 MB")
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1:  # -1: never trim
            applied.append("freed memory kept (glibc: no mmap, no trim)")
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune there
        pass
    return ", ".join(applied) or "nothing to tune on this platform"


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp auto|bf16|fp16|off``; None means full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        # Compute capability 8.0 (Ampere) brought bf16 tensor cores. torch.cuda.is_bf16_supported() also says
        # True on a V100 or T4, where bf16 is emulated (slow): those get fp16 and the GradScaler.
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


