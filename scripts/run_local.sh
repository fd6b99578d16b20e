#!/usr/bin/env bash
# Run pretraining, finetuning or testing on this machine: its GPUs (NCCL), or 2 CPU ranks (gloo).
#
# usage: [VAR=value ...] bash scripts/run_local.sh        (settings are environment variables)
#
#   TASK_TYPE      pretrain | finetune | test                                          (default pretrain)
#   MODEL          tiny | small | base | large | huge -> --model mixmim_<MODEL>
#                  (default: the mixmim_<MODEL> of CONFIG, else base)
#   DATASET        synthetic | benv1 | benv2 | sen12flood | ... (--dataset)
#                  (default: the dataset of CONFIG, else synthetic)
#   DATA_PATH      root of the data set (not needed for synthetic)
#   CONFIG         YAML recipe (default configs/<pretrain|finetune>_<DATASET>_<MODEL>.yaml when it exists;
#                  synthetic runs without one use the entry point's defaults)
#   OUTPUT_DIR     root of all runs (default ./output): pretrain_<DATASET>_<MODEL>/,
#                  finetune_<DATASET>_<MODEL>_ep<EPOCH>/, test_<DATASET>_<MODEL>_ep<EPOCH>/
#   EPOCH          pretraining checkpoint epoch(s) to finetune from / test, e.g. 64 or "16 32 64" (default 64)
#   PRETRAIN_DATASET  whose pretraining to finetune from (default DATASET; benv1 for sen12flood)
#   PRETRAIN_CKPT  finetune from this file instead (e.g. a released benv1_pretrain_checkpoint_64.pth)
#   FINETUNE_CKPT  test this file instead of finetune_.../checkpoint_best.pth
#   NPROC          processes (default: number of visible GPUs, else 2 CPU ranks)
#   USE_CPU=1      run on CPU even when GPUs are visible
#   THREADS        torch threads per process (default: cores / NPROC)
#   LAUNCHER       mpirun | torchrun (default mpirun; Open MPI or MPICH/Hydra flags, detected)
#   MPI_IMPL       openmpi | mpich: skip the detection from `mpirun --version`
#   MPI_ARGS       extra mpirun flags, split on spaces (e.g. "--mca pml ucx" or "--display map")
#   MASTER_ADDR, MASTER_PORT  rendezvous of rank 0 (default 127.0.0.1 and a free port)
#   EXTRA_ARGS     extra flags for main_*.py, split on spaces, appended last (they win over CONFIG)
#   PYTHON         interpreter (default python)
#   DRY_RUN=1      print the command without running it
#
# examples:
#   TASK_TYPE=pretrain MODEL=tiny bash scripts/run_local.sh
#   TASK_TYPE=finetune MODEL=tiny EPOCH=4 bash scripts/run_local.sh
#   TASK_TYPE=test MODEL=tiny EPOCH=4 bash scripts/run_local.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/_common.sh
source "$REPO/scripts/_common.sh"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  print_usage "${BASH_SOURCE[0]}"
  exit 0
fi
(($# == 0)) || die "unexpected argument '$1': settings are environment variables (see -h)"

read_settings synthetic

GPUS=$(gpu_count)
if [[ ${USE_CPU:-0} == 1 || $GPUS == 0 ]]; then
  DEVICE=cpu
  NPROC=${NPROC:-2}
else
  DEVICE=gpu
  NPROC=${NPROC:-$GPUS}
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: expected a positive number of processes"
if [[ $DEVICE == gpu ]] && ((NPROC > GPUS)); then
  die "NPROC=$NPROC but $GPUS GPU(s) are visible: one process per GPU (or USE_CPU=1 for CPU ranks)"
fi
# Share the cores out explicitly: under mpirun torch starts with one thread, and GPU ranks with one per core
# each would oversubscribe the machine.
THREADS=${THREADS:-$(($(cpu_count) / NPROC > 0 ? $(cpu_count) / NPROC : 1))}
if [[ $DEVICE == cpu ]]; then
  export OMP_NUM_THREADS=$THREADS
  # gloo on one host: the loopback interface always exists and needs no DNS.
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(free_port)}
export MASTER_PORT

echo "run_local: $TASK_TYPE mixmim_$MODEL on $DATASET, $NPROC $DEVICE process(es) via $LAUNCHER," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT"
launch_prefix "$NPROC" "$NPROC"
run_task
