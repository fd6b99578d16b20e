#!/bin/bash
#PBS -q rt_HF
#PBS -l select=1:ncpus=192
#PBS -l walltime=48:00:00
#PBS -P gXXXXXXXX
#PBS -N sarwmix
#PBS -j oe
#PBS -r y
# PBS job for ABCI H200 nodes (rt_HF: 8 GPUs, 192 cores per node): pretrain, finetune or test on N nodes,
# one rank per GPU, NCCL, launched by mpirun with the same command builder as scripts/run_local.sh.
#
# submit from the repository root (the job sources scripts/_common.sh from $PBS_O_WORKDIR):
#   qsub -P <group> -v TASK_TYPE=pretrain,MODEL=base,DATASET=benv1,DATA_PATH=/path/BigEarthNet-S1-v1.0 \
#        scripts/qsub_run.sh
#   qsub -P <group> -l select=2:ncpus=192 -v TASK_TYPE=finetune,EPOCH=64,... scripts/qsub_run.sh  (2 nodes)
#   qsub -P <group> -l walltime=1:00:00 -v TASK_TYPE=test,EPOCH=64,... scripts/qsub_run.sh
# The #PBS directives of this file are defaults: -P <group> must be your ABCI group (gXXXXXXXX is a
# placeholder), -l select=N:ncpus=192 asks for N nodes, -l walltime=HH:MM:SS the time limit; options given to
# qsub win.
#
# settings (environment, or qsub -v NAME=value,...):
#   TASK_TYPE, MODEL, EPOCH, DATASET, DATA_PATH, CONFIG, OUTPUT_DIR, PRETRAIN_DATASET, PRETRAIN_CKPT,
#   FINETUNE_CKPT, THREADS, EXTRA_ARGS, MPI_IMPL, MPI_ARGS, PYTHON, DRY_RUN:
#                  as in scripts/run_local.sh -h, except DATASET (default: the dataset of CONFIG, else benv1)
#   (pretraining follows the released recipe of its config: --epochs 1024 --stop_epoch 64)
#   GPUS_PER_NODE  ranks per node (default: `nvidia-smi -L | wc -l` on the first node; 8 on H200/A100, 4 V100)
#   USE_CPU=1      CPU ranks and gloo instead of GPUs and NCCL (CPU_RANKS_PER_NODE per node, default 2)
#   MASTER_PORT    rendezvous port on the first host (default: a free one); MASTER_ADDR is the first host
#   PBS_NODEFILE   the allocated hosts (one line per host or per chunk; repeated names count once)
# preemption and resubmission (docs/RELIABILITY.md):
#   PREEMPT_MARGIN seconds before the walltime at which the run is told to save and stop (default 300; 0: off)
#   RESUBMIT=1     when a run stops that way (exit 75), submit this job again to continue (default 1; 0: off)
#   MAX_RESUBMITS  at most this many resubmissions in a chain (default 20)
#   qsig -s USR1 <job>  (or SIGTERM to this script) stops the run the same way now, and the job resubmits
# site-specific settings (edit below or set them in the environment):
#   MODULES        modules loaded when the `module` command exists
#   VENV           a virtualenv folder to activate, or CONDA_ENV: a conda environment name
#   NCCL_*         any NCCL variable set here or in the environment is forwarded to every rank
set -euo pipefail

# ---- site-specific settings -----------------------------------------------------------------------------
MODULES=${MODULES:-"hpcx/2.20 cuda/12.6/12.6.1 cudnn/9.5/9.5.1 nccl/2.23/2.23.4-1"}
VENV=${VENV:-}
CONDA_ENV=${CONDA_ENV:-}
OUTPUT_DIR=${OUTPUT_DIR:-./output}
CPU_RANKS_PER_NODE=${CPU_RANKS_PER_NODE:-2}
# ----------------------------------------------------------------------------------------------------------

# PBS runs a copy of this file from its spool folder: find the repository through PBS_O_WORKDIR then.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -f $HERE/_common.sh ]]; then
  REPO=$(dirname "$HERE")
elif [[ -n ${PBS_O_WORKDIR:-} && -f $PBS_O_WORKDIR/scripts/_common.sh ]]; then
  REPO=$PBS_O_WORKDIR
else
  echo "error: scripts/_common.sh not found: submit the job from the repository root" >&2
  exit 2
fi
# shellcheck source=scripts/_common.sh
source "$REPO/scripts/_common.sh"
load_settings # a resubmitted job: the settings of the job it continues

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  print_usage "${BASH_SOURCE[0]}"
  exit 0
fi
(($# == 0)) || die "unexpected argument '$1': settings are environment variables (see -h)"
cd "${PBS_O_WORKDIR:-$REPO}"

load_site_env() {
  # Modules and the user's Python environment; a machine without `module` keeps its own environment.
  set +u # module and activate scripts read unset variables
  if [[ -f /etc/profile.d/modules.sh ]] && ! type module >/dev/null 2>&1; then
    # shellcheck disable=SC1091 # a site file
    source /etc/profile.d/modules.sh
  fi
  if type module >/dev/null 2>&1; then
    local m
    for m in $MODULES; do
      module load "$m" || die "module load $m failed: edit MODULES at the top of scripts/qsub_run.sh"
    done
  fi
  if [[ -n $VENV ]]; then
    [[ -f $VENV/bin/activate ]] || die "VENV=$VENV: no bin/activate there"
    # shellcheck disable=SC1091 # the user's environment
    source "$VENV/bin/activate"
  elif [[ -n $CONDA_ENV ]]; then
    command -v conda >/dev/null 2>&1 || die "CONDA_ENV=$CONDA_ENV but no conda command"
    eval "$(conda shell.bash hook)"
    conda activate "$CONDA_ENV"
  fi
  set -u
}

read_hosts() {
  # HOSTS: the unique hosts of PBS_NODEFILE in file order (PBS lists a host once per chunk or cpu, and
  # the first one runs this script and rank 0); outside PBS, this machine alone.
  if [[ -n ${PBS_NODEFILE:-} ]]; then
    [[ -s $PBS_NODEFILE ]] || die "PBS_NODEFILE=$PBS_NODEFILE is missing or empty"
    mapfile -t HOSTS < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
  else
    HOSTS=("$(hostname)")
  fi
}

load_site_env
read_settings benv1
read_hosts
if [[ ${USE_CPU:-0} == 1 ]]; then
  DEVICE=cpu
  PER_NODE=${GPUS_PER_NODE:-$CPU_RANKS_PER_NODE}
  THREADS=${THREADS:-$(($(cpu_count) / PER_NODE > 0 ? $(cpu_count) / PER_NODE : 1))}
  export OMP_NUM_THREADS=$THREADS
  # Loopback only works when every rank is on this host; across nodes gloo picks the interface itself.
  if ((${#HOSTS[@]} == 1)); then export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}; fi
else
  DEVICE=gpu
  PER_NODE=${GPUS_PER_NODE:-$(gpu_count)}
  ((PER_NODE > 0)) || die "no GPU visible on $(hostname) (nvidia-smi -L): set GPUS_PER_NODE, or USE_CPU=1"
fi
[[ $PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$PER_NODE: expected a positive count of ranks per node"
# GPU ranks too: torch's default of one thread per core in every rank would oversubscribe the node 8 times.
THREADS=${THREADS:-$(($(cpu_count) / PER_NODE > 0 ? $(cpu_count) / PER_NODE : 1))}
NNODES=${#HOSTS[@]}
export MASTER_ADDR=${HOSTS[0]}
MASTER_PORT=${MASTER_PORT:-$(free_port)}
export MASTER_PORT

HOSTFILE=${TMPDIR:-/tmp}/sarwmix_hosts.${PBS_JOBID:-$$}
trap 'rm -f "$HOSTFILE"' EXIT
echo "qsub_run: $TASK_TYPE mixmim_$MODEL on $DATASET, $NNODES node(s) x $PER_NODE $DEVICE rank(s)" \
  "(${HOSTS[*]}), rendezvous $MASTER_ADDR:$MASTER_PORT"
launch_prefix "$((NNODES * PER_NODE))" "$PER_NODE" "${HOSTS[@]}"

job_attribute() {
  # job_attribute NAME -> REPLY: NAME's value in `qstat -f $PBS_JOBID` ('' outside PBS or when qstat fails).
  REPLY=""
  if [[ -n ${JOB_INFO+x} ]]; then :; elif [[ -n ${PBS_JOBID:-} ]] && command -v qstat >/dev/null 2>&1; then
    JOB_INFO=$(qstat -f "$PBS_JOBID" 2>/dev/null || true)
  else
    JOB_INFO=""
  fi
  REPLY=$(awk -v key="$1" '$1 == key && $2 == "=" {sub(/^[^=]*= */, ""); print; exit}' <<<"$JOB_INFO")
}

resubmit() {
  # Submit this job again with its resources and settings; it resumes from checkpoint.pth (--resume auto).
  local count=${RESUBMIT_COUNT:-0} settings args=()
  if [[ ${RESUBMIT:-1} != 1 ]]; then
    echo "qsub_run: RESUBMIT=${RESUBMIT}: not resubmitting; submit the job again to continue" >&2
    return "$EXIT_PREEMPTED"
  fi
  if ((count >= ${MAX_RESUBMITS:-20})); then
    echo "qsub_run: resubmitted $count times already (MAX_RESUBMITS=${MAX_RESUBMITS:-20}): not again" >&2
    return "$EXIT_PREEMPTED"
  fi
  settings="$OUTPUT_DIR/.qsub_run/${PBS_JOBID:-job$$}.env"
  save_settings "$settings"
  args=(-v "SARWMIX_SETTINGS=$(realpath "$settings"),RESUBMIT_COUNT=$((count + 1))")
  local spec flag name prefix
  for spec in "-q queue" "-P project" "-N Job_Name" "-l Resource_List.select select=" \
    "-l Resource_List.walltime walltime="; do
    read -r flag name prefix <<<"$spec"
    job_attribute "$name"
    if [[ -n $REPLY ]]; then args+=("$flag" "${prefix:-}$REPLY"); fi
  done
  echo "qsub_run: preempted; resubmission $((count + 1)) of at most ${MAX_RESUBMITS:-20}:"
  run_line qsub "${args[@]}" "$REPO/scripts/qsub_run.sh"
}

# The walltime's end is a preemption announced in advance: tell the run to save PREEMPT_MARGIN s before it.
job_attribute Resource_List.walltime
walltime_seconds "$REPLY"
if [[ -n $REPLY && $DRY_RUN != 1 ]] && ((${PREEMPT_MARGIN:-300} > 0)); then
  start_stop_timer $((REPLY - ${PREEMPT_MARGIN:-300} - SECONDS))
  echo "qsub_run: walltime ${REPLY} s: the run is told to save and stop ${PREEMPT_MARGIN:-300} s before it"
fi
status=0
run_task || status=$?
stop_stop_timer
if ((status == EXIT_PREEMPTED)) && resubmit; then
  status=0 # resubmitted: this job's part is done
fi
exit "$status"
