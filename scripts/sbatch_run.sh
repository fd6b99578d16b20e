#!/bin/bash
#SBATCH --job-name=sarwmix
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=24
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=sarwmix-%j.out
# SLURM job: pretrain, finetune or test on N nodes, one task (rank) per GPU started by srun, NCCL; the same
# command builder as scripts/run_local.sh and scripts/qsub_run.sh.
#
# submit from the repository root (the job finds scripts/_common.sh through SLURM_SUBMIT_DIR):
#   sbatch --export=ALL,TASK_TYPE=pretrain,MODEL=base,DATASET=benv1,DATA_PATH=/data/BigEarthNet-S1-v1.0 \
#          scripts/sbatch_run.sh
#   sbatch --nodes=2 --export=ALL,TASK_TYPE=finetune,EPOCH=64,... scripts/sbatch_run.sh      (2 nodes)
# The #SBATCH lines of this file are defaults (8 GPUs and 8 tasks per node, 48 h); options given to sbatch win.
#
# settings (environment, or sbatch --export=ALL,NAME=value,...):
#   TASK_TYPE, MODEL, EPOCH, DATASET, DATA_PATH, CONFIG, OUTPUT_DIR, PRETRAIN_DATASET, PRETRAIN_CKPT,
#   FINETUNE_CKPT, THREADS, EXTRA_ARGS, PYTHON, DRY_RUN:
#                  as in scripts/run_local.sh -h, except DATASET (default: the dataset of CONFIG, else benv1)
#   USE_CPU=1      CPU tasks and gloo instead of GPUs and NCCL
#   THREADS        torch threads per task (default: SLURM_CPUS_PER_TASK)
#   SRUN_ARGS      extra srun flags, split on spaces (e.g. "--gpu-bind=closest")
#   MASTER_PORT    rendezvous port on the first host (default: a free one); MASTER_ADDR is the first host
# preemption and requeue (docs/RELIABILITY.md):
#   --signal=USR1@300 (above) tells every task to save and stop 300 s before the time limit; the run exits with
#   75 and this job requeues itself (scontrol requeue; --requeue above) to continue from checkpoint.pth.
#   scancel --signal=USR1 <job> stops the run the same way now. SLURM's own preemption with
#   PreemptMode=REQUEUE sends SIGTERM (the tasks save the same way within GraceTime) and requeues the job.
#   MAX_RESUBMITS  at most this many requeues (default 20; SLURM_RESTART_COUNT counts them)
set -euo pipefail

# SLURM runs a copy of this file from its spool folder: find the repository through SLURM_SUBMIT_DIR then.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -f $HERE/_common.sh ]]; then
  REPO=$(dirname "$HERE")
elif [[ -n ${SLURM_SUBMIT_DIR:-} && -f $SLURM_SUBMIT_DIR/scripts/_common.sh ]]; then
  REPO=$SLURM_SUBMIT_DIR
else
  echo "error: scripts/_common.sh not found: submit the job from the repository root" >&2
  exit 2
fi
# shellcheck source=scripts/_common.sh
source "$REPO/scripts/_common.sh"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  print_usage "${BASH_SOURCE[0]}"
  exit 0
fi
(($# == 0)) || die "unexpected argument '$1': settings are environment variables (see -h)"
cd "${SLURM_SUBMIT_DIR:-$REPO}"

LAUNCHER=${LAUNCHER:-srun}
read_settings benv1
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  HOSTS=("$(hostname)")
fi
((${#HOSTS[@]} > 0)) || die "no host in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
NTASKS=${SLURM_NTASKS:-1}
[[ $NTASKS =~ ^[1-9][0-9]*$ ]] || die "SLURM_NTASKS=$NTASKS: expected a positive number of tasks"
THREADS=${THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ ${USE_CPU:-0} == 1 ]]; then
  DEVICE=cpu
  export OMP_NUM_THREADS=$THREADS
  if ((${#HOSTS[@]} == 1)); then export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}; fi
else
  DEVICE=gpu
fi
export MASTER_ADDR=${HOSTS[0]}
MASTER_PORT=${MASTER_PORT:-$(free_port)}
export MASTER_PORT

echo "sbatch_run: $TASK_TYPE mixmim_$MODEL on $DATASET, $NTASKS $DEVICE task(s) on ${#HOSTS[@]} node(s)" \
  "(${HOSTS[*]}), rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
PER_NODE=$(((NTASKS + ${#HOSTS[@]} - 1) / ${#HOSTS[@]}))
if [[ $LAUNCHER == srun ]]; then
  launch_prefix "$NTASKS" "$PER_NODE"
else
  launch_prefix "$NTASKS" "$PER_NODE" "${HOSTS[@]}"
fi

requeue() {
  # Put this job back in the queue (same job id, resources and environment); it resumes from checkpoint.pth.
  local count=${SLURM_RESTART_COUNT:-0}
  if ((count >= ${MAX_RESUBMITS:-20})); then
    echo "sbatch_run: requeued $count times already (MAX_RESUBMITS=${MAX_RESUBMITS:-20}): not again" >&2
    return "$EXIT_PREEMPTED"
  fi
  [[ -n ${SLURM_JOB_ID:-} ]] || die "preempted outside a SLURM job (no SLURM_JOB_ID): run the job again to continue"
  echo "sbatch_run: preempted; requeue $((count + 1)) of at most ${MAX_RESUBMITS:-20}:"
  run_line scontrol requeue "$SLURM_JOB_ID"
}

status=0
run_task || status=$?
if ((status == EXIT_PREEMPTED)) && requeue; then
  status=0 # requeued: this run's part is done
fi
exit "$status"
