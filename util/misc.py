"""Distributed setup, precision, seeding and run-output helpers shared by both entry points."""
from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

from sarwmix.errors import ConfigError, TrainingError

log = logging.getLogger("sarwmix")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# (launcher, rank var, world-size var, local-rank var), checked in this order.
_LAUNCHER_VARS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    # srun's step variables, not the allocation's SLURM_NTASKS: a plain `python ...` inside sbatch/salloc
    # (which has no step variables) runs alone instead of waiting for tasks that no srun started.
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def dist_env(env: Mapping[str, str]) -> DistInfo:
    """Read rank, world size and local rank from torchrun, Open MPI, MPICH/PMI or SLURM variables.

    A launcher that gives no local rank (some PMI setups) falls back to ``rank % local world size``
    when ``LOCAL_WORLD_SIZE``/``MPI_LOCALNRANKS`` is known, else to 0.
    """
    for name, rk, ws, lr in _LAUNCHER_VARS:
        if rk in env and ws in env:
            rank, world = int(env[rk]), int(env[ws])
            if lr in env:
                local = int(env[lr])
            else:
                per_node = int(env.get("LOCAL_WORLD_SIZE", env.get("MPI_LOCALNRANKS", "0")) or 0)
                local = rank % per_node if per_node else 0
            return DistInfo(rank, world, local, name)
    return DistInfo()


def wants_cuda(device_arg: str) -> bool:
    """``--device auto|cuda|cpu``: use the GPU when there is one and the flag allows it."""
    return torch.cuda.is_available() and device_arg in ("auto", "cuda")


def cuda_index(local_rank: int, n_visible: int) -> int:
    """GPU of a rank: ``cuda:<local rank>``, or ``cuda:0`` when the launcher shows each rank only its own
    GPU (``srun --gpus-per-task=1``, a ``CUDA_VISIBLE_DEVICES`` wrapper)."""
    if local_rank < n_visible:
        return local_rank
    if n_visible == 1:
        return 0
    raise ConfigError(f"local rank {local_rank} needs cuda:{local_rank}, but this process sees {n_visible} GPUs: "
                      f"start at most {n_visible} ranks per node (mpirun -N, torchrun --nproc_per_node)")


def spans_nodes(env: Mapping[str, str], world_size: int) -> bool:
    """True when the launcher's variables show ranks on more than one host (False when they do not say)."""
    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS") or env.get("LOCAL_WORLD_SIZE")
    if local:
        return int(local) < world_size
    return int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1) > 1


def init_distributed(device_arg: str = "auto", dist_url: str = "env://",
                     timeout_s: float = 300.0) -> tuple[DistInfo, torch.device]:
    """Start the process group if launched by torchrun/mpirun/srun; pick this rank's device.

    NCCL on GPU, gloo on CPU. mpirun sets no MASTER_ADDR/PORT: the launch scripts export them; without
    them a single-host default (127.0.0.1:29500) is used, and a job across hosts is refused (its other
    hosts would wait for a rendezvous on their own 127.0.0.1 until the rendezvous timeout).

    ``timeout_s`` (``--dist_timeout``) bounds the rendezvous and every collective: a rank that waits longer
    for another raises instead of hanging (torch's default is 10 minutes for NCCL, 30 for gloo). On NCCL,
    ``nccl_fail_fast`` makes a timed-out or failed collective abort the process.
    """
    info = dist_env(os.environ)
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device (a CPU-only torch build, no driver, or an "
                          "empty CUDA_VISIBLE_DEVICES); use --device cpu or auto")
    use_cuda = wants_cuda(device_arg)
    device = torch.device(f"cuda:{cuda_index(info.local_rank, torch.cuda.device_count())}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.distributed:
        if "MASTER_ADDR" not in os.environ and spans_nodes(os.environ, info.world_size):
            raise ConfigError(f"{info.world_size} ranks on several hosts ({info.launcher} launcher) but MASTER_ADDR "
                              f"is not set: export MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port> and pass "
                              f"them to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT), as scripts/qsub_run.sh does")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if use_cuda:
            nccl_fail_fast(os.environ, timeout_s)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_store(os.environ, info, timeout) if dist_url == "env://" else None
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=None if store else dist_url,
                                store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
        dist.barrier()
    return info, device


# ProcessGroupNCCL's settings (torch reads them when the group starts). A value the job sets wins.
NCCL_FAIL_FAST = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a timed-out or failed collective aborts the communicator and
                                             # ends the process (torch's default 3 ends it without the abort)
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder: the last collectives of each rank ...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",       # ... written out when a collective times out
    "TORCH_NCCL_ENABLE_MONITORING": "1",     # a hung NCCL watchdog thread ends the process too
}


def nccl_fail_fast(env: dict, timeout_s: float) -> dict:
    """Set (where unset) the NCCL variables that make collectives fail instead of hang; returns what was set.

    The heartbeat of NCCL's own watchdog gets the collective timeout plus a minute, so a slow but live
    collective is never cut short by it.
    """
    wanted = {**NCCL_FAIL_FAST, "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(timeout_s) + 60)}
    applied = {k: v for k, v in wanted.items() if k not in env}
    env.update(applied)
    return applied


def is_main_process() -> bool:
    """Rank 0 of the process group, or a process outside any group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def restart_store(env: Mapping[str, str], info: DistInfo, timeout: datetime.timedelta):
    """The rendezvous store of a worker that torchrun restarted, with keys of its own attempt; None otherwise.

    torchrun's agent keeps serving its store across restarts (``--max-restarts``), and the process group's
    keys carry no attempt: restarted workers could read the addresses of the workers they replace and fail
    to connect ("Connection refused"). A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps the rounds
    apart, as torch's own env:// handler does for its default store.
    """
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent serves it: every rank a client
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), info.world_size,
                          is_master=not agent_store and info.rank == 0, timeout=timeout,
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"sarwmix/attempt_{attempt}", store)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a Python float over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


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


def setup_logging(is_main: bool) -> None:
    """Info-level logging on rank 0, warnings only elsewhere."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def json_safe(value):
    """``value`` with every non-finite float (and in nested dicts and lists) as None: strict JSON, which
    ``json.dumps`` would otherwise break with ``NaN``/``Infinity`` tokens (jq and most parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonLines:
    """Append-only JSON-lines file of strict JSON (non-finite numbers as null), flushed per record (a killed
    run keeps every finished line)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def truncate_jsonl(path: Path, keep: callable) -> None:
    """Rewrite a JSON-lines log keeping the records for which ``keep(record)`` holds (used on resume)."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if keep(rec):
            lines.append(line)
    write_text_atomic(path, "".join(x + "\n" for x in lines))


def truncate_lines(path: Path, keep: callable) -> None:
    """Rewrite a text file keeping the lines for which ``keep(line)`` holds (unparsable lines are dropped)."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if keep(line):
                lines.append(line)
        except (ValueError, IndexError):
            continue  # a line cut by a kill
    write_text_atomic(path, "".join(x + "\n" for x in lines))


def replace_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a partial file; a
    failed write (disk full, unpicklable object) removes the temporary file and re-raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def link_or_copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Give the file ``src`` a second name ``dst``: a hard link where the file system allows, else a copy.

    The link (or copy) is made under a temporary name and renamed over ``dst``, so ``dst`` is always whole.
    Writers replace files (``replace_atomic``), never write into them, so a later write of ``src`` leaves
    ``dst`` with the bytes it had.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links here (FAT, some network and object-store mounts, cross-device)
        with open(src, "rb") as fh:
            return replace_atomic(dst, lambda out: shutil.copyfileobj(fh, out, 1 << 20))
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``replace_atomic`` for UTF-8 text (results.json, config.yaml, a truncated log)."""
    return replace_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def check_replicas(model: torch.nn.Module, device: torch.device) -> str:
    """SHA-256 of all parameters; raises TrainingError if ranks disagree (DDP replicas must be identical)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    if dist.is_available() and dist.is_initialized():
        digests: list = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise TrainingError(f"model replicas differ across ranks: {digests}")
        log.info("parameters identical on %d ranks (sha256 %s)", len(digests), digest[:16])
    return digest
