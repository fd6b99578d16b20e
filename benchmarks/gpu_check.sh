#!/usr/bin/env bash
# The GPU check: one command, start to finish in under 8 minutes on one H200, every table and log written
# under one output folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]             # OUT_DIR: argument, else $OUT, else ./gpu_check_out
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # (or DRY_RUN=1) print every section's command, run
#                                                      # none and write nothing (OUT_DIR is not created)
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # every section on the CPU with tiny settings (the tests)
#
# Sections: install (only when torch is missing: pip install -e .), env (nvidia-smi, torch), the step
# benchmark (benchmarks/bench_pretrain.py) for mixmim_base, mixmim_large, mixmim_huge and SimMIM in bf16 with
# a batch sweep up to the largest batch that fits, the eager and --grad_ckpt paths and a --compile row, the
# data-rate check of the packed loader against the measured step rate (benchmarks/bench_data.py), a 1-epoch
# synthetic pretraining on the device, and a finetune plus an evaluation of its checkpoint.
# A section that fails or runs past its time limit is logged and the next one runs; the last lines
# (also in summary.txt) say which sections passed. The exit status is 0 only when every section passed.
# BUDGET_S (default 450; 1800 with --tiny) bounds the whole run: a section gets at most the time left,
# and none starts with less than 20 s left (it is reported as skipped).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
TINY=0
DRY_RUN="${DRY_RUN:-0}"
OUT_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tiny) TINY=1 ;;
    --device) DEVICE="${2:?--device needs cpu or cuda}"; shift ;;
    --device=*) DEVICE="${1#--device=}" ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (expected --dry-run, --tiny, --device cpu|cuda, OUT_DIR)" >&2; exit 2 ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
if [[ "$DEVICE" != cpu && "$DEVICE" != cuda ]]; then
  echo "gpu_check.sh: --device $DEVICE: expected cpu or cuda" >&2; exit 2
fi
OUT_DIR="${OUT_DIR:-${OUT:-./gpu_check_out}}"
if [[ "$DRY_RUN" == 1 ]]; then
  [[ "$OUT_DIR" == /* ]] || OUT_DIR="$PWD/${OUT_DIR#./}"  # named in the printed commands, never created
else
  mkdir -p "$OUT_DIR"
  OUT_DIR="$(cd "$OUT_DIR" && pwd)"
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

# Settings: the H200 run, or tiny ones that exercise every section on a CPU in seconds.
# Tiny settings run in fp32: bf16 is emulated, five times slower, on CPUs without AVX512-BF16/AMX.
if [[ "$TINY" == 1 ]]; then
  AMP=fp32; AMP_RUN=off; BASE=mixmim_tiny; LARGE=mixmim_tiny; HUGE=mixmim_tiny
  B="$PY -m benchmarks.bench_pretrain --device $DEVICE --amp $AMP"
  B="$B --input_size 64 --steps 1 --warmup 0 --peak_seconds 0.05 --peak_n 256"
  SWEEP_BASE="--batch_size 2"; SWEEP_LARGE="--batch_size 2"; SWEEP_HUGE="--batch_size 2"
  ONE_BATCH="--batch_size 2"; COMPILE="--compile --compile_backend eager"  # graph capture, no C++ build
  DATA="--n 64 --batch_size 4 --min_seconds 0.3 --workers 0 1"
  TRAIN="--model mixmim_tiny --input_size 64 --num_samples 16 --batch_size 4 --num_workers 0"
  TUNE="--model mixmim_tiny --input_size 64 --num_samples 8 --num_eval_samples 8 --batch_size 4 --num_workers 0"
  LIMIT=600; LIMIT_LONG=600; BUDGET_S="${BUDGET_S:-1800}"  # a loaded CPU, not the 8-minute GPU budget
else
  AMP=bf16; AMP_RUN=bf16; BASE=mixmim_base; LARGE=mixmim_large; HUGE=mixmim_huge
  B="$PY -m benchmarks.bench_pretrain --device $DEVICE --amp $AMP"
  B="$B --steps 5 --warmup 2 --peak_seconds 1"
  SWEEP_BASE="--batch_size 128 256 --max_batch 1024"; SWEEP_LARGE="--batch_size 128 256 --max_batch 512"
  SWEEP_HUGE="--batch_size 64 128 256"
  ONE_BATCH="--batch_size 256"; COMPILE="--compile"
  DATA="--n 2048 --batch_size 256 --min_seconds 3 --workers 1 2 4 8"
  TRAIN="--model mixmim_base --num_samples 4096 --batch_size 256 --num_workers 4"
  TUNE="--model mixmim_base --num_samples 1024 --num_eval_samples 512 --batch_size 128 --num_workers 4"
  LIMIT=90; LIMIT_LONG=150
fi

BUDGET_S="${BUDGET_S:-450}"
NAMES=(); RESULTS=()
# section NAME LIMIT_SECONDS COMMAND: run COMMAND (a shell string) within the limit, output in NAME.log
section() {
  local name="$1" limit="$2" cmd="$3" start=$SECONDS rc=0
  local left=$((BUDGET_S - SECONDS))
  NAMES+=("$name")
  if [[ "$DRY_RUN" != 1 && $left -lt 20 ]]; then
    RESULTS+=("SKIPPED: ${left} s of the ${BUDGET_S} s budget left")
    printf '== %s: %s\n' "$name" "${RESULTS[-1]}"
    return 0
  fi
  [[ $limit -gt $left && "$DRY_RUN" != 1 ]] && limit=$left
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '== %s (limit %ss)\n   %s\n' "$name" "$limit" "$cmd"
    RESULTS+=("dry-run")
    return 0
  fi
  printf '== %s (limit %ss): %s\n' "$name" "$limit" "$cmd"
  timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee "$OUT_DIR/$name.log" || rc=$?
  if [[ $rc -eq 0 ]]; then
    RESULTS+=("PASS ($((SECONDS - start)) s)")
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    RESULTS+=("FAIL: over its ${limit} s limit")
  else
    RESULTS+=("FAIL: exit status $rc, see $name.log")
  fi
  printf '== %s: %s\n' "$name" "${RESULTS[-1]}"
}

IMPORTS="import torch, main_pretrain, main_finetune, sarwmix.data.packed"
section install 300 "if $PY -c 'import torch' 2>/dev/null; then echo 'torch found: install skipped'; \
else $PY -m pip install -e '$REPO'; fi; $PY -c '$IMPORTS; print(\"torch\", torch.__version__)'"
section env 60 "(command -v nvidia-smi >/dev/null && nvidia-smi || echo 'nvidia-smi: not found'); \
$PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"devices\", \
torch.cuda.device_count(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'; nproc"
section bench_base "$LIMIT_LONG" "$B --model $BASE $SWEEP_BASE --compare-eager --grad_ckpt"
section bench_large "$LIMIT" "$B --model $LARGE $SWEEP_LARGE --grad_ckpt"
section bench_huge "$LIMIT_LONG" "$B --model $HUGE $SWEEP_HUGE --grad_ckpt"
section bench_simmim "$LIMIT" "$B --model $BASE --mode simmim $ONE_BATCH --compare-eager"
# The fastest row of the base table is the step rate the loaders must sustain (a fixed one if it failed).
STEP="\$(grep -qs ' optimised ' '$OUT_DIR/bench_base.log' && echo --step_table '$OUT_DIR/bench_base.log' \
|| echo --step_img_s 3000)"
section data_rate "$LIMIT_LONG" "$PY -m benchmarks.bench_data $DATA $STEP"
section pretrain "$LIMIT_LONG" "$PY main_pretrain.py $TRAIN --device $DEVICE --amp $AMP_RUN --epochs 1 \
--warmup_epochs 0 --vis_samples 2 --no-progress --output_dir '$OUT_DIR/pretrain'"
section finetune "$LIMIT_LONG" "$PY main_finetune.py $TUNE --device $DEVICE --amp $AMP_RUN --epochs 1 \
--warmup_epochs 0 --no-progress --finetune '$OUT_DIR/pretrain/checkpoint.pth' --output_dir '$OUT_DIR/finetune'"
section eval "$LIMIT" "$PY main_finetune.py $TUNE --device $DEVICE --amp $AMP_RUN --eval --no-progress \
--resume '$OUT_DIR/finetune/checkpoint_best.pth' --output_dir '$OUT_DIR/eval'"
# Last: compilation time depends on the machine's compiler and cores, so it must not hold up the rest.
section bench_compile "$LIMIT_LONG" "$B --model $BASE $ONE_BATCH $COMPILE"

# summary.txt beside the logs; a dry run only prints (it writes nothing anywhere)
keep_summary() { if [[ "$DRY_RUN" == 1 ]]; then cat; else tee "$OUT_DIR/summary.txt"; fi; }
failed=0
{
  [[ "$DRY_RUN" == 1 ]] && echo "dry run: the commands above were printed, none was run and nothing was written"
  echo "gpu_check summary ($DEVICE$([[ "$TINY" == 1 ]] && echo ', tiny settings'), output $OUT_DIR)"
  for i in "${!NAMES[@]}"; do
    printf '  %-14s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
    [[ "${RESULTS[$i]}" == PASS* ]] || failed=$((failed + 1))
  done
  [[ "$DRY_RUN" == 1 ]] || echo "  $((${#NAMES[@]} - failed)) of ${#NAMES[@]} sections passed"
} | keep_summary
[[ "$DRY_RUN" == 1 ]] || ! grep -qE '^  [a-z_]+ +(FAIL|SKIPPED)' "$OUT_DIR/summary.txt"
