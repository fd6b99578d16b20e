"""Where a process sits in a distributed job, and the job's collectives: launcher variables (torchrun, Open MPI,
MPICH/PMI, srun), the process group (NCCL on GPU, gloo on CPU, ``--dist_timeout``), a torchrun restart's store,
and the few collectives every run makes (a mean over ranks, the replicas' check)."""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

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


_ENDED_GROUP = False  # this process was a rank of a process group that cleanup_distributed destroyed


def cleanup_distributed() -> None:
    global _ENDED_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _ENDED_GROUP = True


def end_process(code: int | None = None) -> None:
    """End the command with ``code`` (None: a normal end, the caller returns). A rank of a process group
    skips the interpreter's finalisation instead (``os._exit`` after flushing the logs and standard
    streams): rarely, on a loaded machine, a gloo rank aborted there (``terminate called without an active
    exception``, exit code 134) after every output of its run had been written, turning a finished or
    preempted run into a failed job."""
    if _ENDED_GROUP:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    if code is not None:
        sys.exit(code)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a Python float over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


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
