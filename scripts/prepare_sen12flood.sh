#!/usr/bin/env bash
# Prepare SEN12-FLOOD for finetuning: unzip (if a .zip is given) -> align S1 onto the S2 grid
# -> build the image pairs -> drop partial-coverage pairs, then print the class counts per split.
# Result: OUT/train/*.npy, OUT/test/*.npy, OUT/test_sequences.txt (read by sarwmix.data.sen12flood_loader).
# Intermediates live in OUT/_work and are removed at the end unless --keep_intermediate is given.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: scripts/prepare_sen12flood.sh ZIP_OR_ROOT OUT [--test_sequences FILE | --test_fraction F]
                                     [--seed N] [--skip_bad] [--keep_intermediate]
  ZIP_OR_ROOT  the downloaded SEN12-FLOOD .zip, or a folder holding S1list.json and the sequence folders
  OUT          output folder; receives train/ and test/ pair files (earlier pairs there are replaced)
  --test_sequences FILE  sequences for the test split (one per line); default: a seeded 20% of sequences
  --test_fraction F      fraction of sequences for test (default 0.2), drawn with --seed (default 0)
  --skip_bad             skip and count S1 entries whose files are missing or bad instead of failing
USAGE
  exit 2
}

[[ $# -ge 2 ]] || usage
SRC=$1
OUT=$2
shift 2
ALIGN_ARGS=()
PAIR_ARGS=()
KEEP=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --test_sequences|--test_fraction|--seed)
      [[ $# -ge 2 ]] || usage
      PAIR_ARGS+=("$1" "$2")
      shift 2 ;;
    --skip_bad) ALIGN_ARGS+=(--skip_bad); PAIR_ARGS+=(--skip_bad); shift ;;
    --keep_intermediate) KEEP=1; shift ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done

# Run the project's modules even when it is not pip-installed.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
WORK="$OUT/_work"
mkdir -p "$WORK"

if [[ -f "$SRC" && "$SRC" == *.zip ]]; then
  echo "[1/4] unzip $SRC"
  rm -rf "$WORK/unzipped"
  # python's zipfile: no dependency on the unzip binary.
  "$PYTHON" -m zipfile -e "$SRC" "$WORK/unzipped"
  SEARCH="$WORK/unzipped"
elif [[ -d "$SRC" ]]; then
  echo "[1/4] use the folder $SRC"
  SEARCH="$SRC"
else
  echo "error: $SRC is neither a .zip file nor a folder" >&2
  exit 2
fi
mapfile -t LISTINGS < <(find "$SEARCH" -maxdepth 3 -name S1list.json | sort)
if [[ ${#LISTINGS[@]} -eq 0 ]]; then
  echo "error: no S1list.json within 3 levels of $SRC (expected the SEN12FLOOD root)" >&2
  exit 2
fi
ROOT=$(dirname "${LISTINGS[0]}")

echo "[2/4] align S1 onto the S2 grid: $ROOT -> $WORK/aligned"
"$PYTHON" -m sarwmix.prep.sen12_align_s1_to_s2 "$ROOT" "$WORK/aligned" ${ALIGN_ARGS[@]+"${ALIGN_ARGS[@]}"}

echo "[3/4] build pairs -> $OUT/train, $OUT/test"
"$PYTHON" -m sarwmix.prep.sen12_data_prep "$WORK/aligned" "$WORK/aligned/S1list.json" "$OUT" --overwrite \
  ${PAIR_ARGS[@]+"${PAIR_ARGS[@]}"}

echo "[4/4] drop pairs with >= 25% zeros in a channel"
"$PYTHON" -m sarwmix.prep.sen12_prune_partial_pairs "$OUT" --threshold 0.25 --delete

if [[ $KEEP -eq 0 ]]; then
  rm -rf "$WORK"
fi
echo "class counts:"
"$PYTHON" -c 'import sys; from sarwmix.prep.sen12_data_prep import print_class_counts as p; sys.exit(p(sys.argv[1]))' \
  "$OUT"
