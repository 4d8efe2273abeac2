#!/usr/bin/env bash
# predict.py's wall time in two checkouts of rvf (e.g. before and after a change), alternated
# so both see the same machine: one file (start-up bound), then a folder with Grad-CAM overlays.
#
#   bash benchmarks/predict_ab.sh OLD_CHECKOUT NEW_CHECKOUT RUN IMAGE FOLDER [ROUNDS]
#
# e.g. git worktree add /tmp/old HEAD~1, then
#   bash benchmarks/predict_ab.sh /tmp/old . runs/lenet face.jpg rvf10k-mini/rvf10k/valid
# Prints one line a run, and whether both wrote the same predictions CSV.
set -euo pipefail
old=$(cd "${1:?usage: see the header}" && pwd); new=$(cd "${2:?}" && pwd)
run=$(cd "${3:?}" && pwd); image=$(realpath "${4:?}"); folder=$(realpath "${5:?}"); rounds=${6:-3}
source "$(dirname "$0")/_lib.sh"
check_rounds "$rounds"
python=$(find_python "$new") || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# bash benchmarks/predict_ab.sh OLD NEW RUN IMAGE FOLDER $rounds | $(date -u +%Y-%m-%d) | $(nproc) cores"
commits "$old" "$new"
timed() {  # label tree args...: wall seconds of predict.py in that checkout
  local label=$1 tree=$2; shift 2
  local t0
  t0=$(date +%s.%N)
  (cd "$tree" && "$python" scripts/predict.py --checkpoint "$run" "$@" > "$work/log" 2>&1) || { cat "$work/log"; exit 1; }
  printf '%s %s: %s s\n' "$label" "$([ "$tree" = "$old" ] && echo old || echo new)" "$(seconds_since "$t0")"
}
for r in $(seq "$rounds"); do
  for tree in "$old" "$new"; do timed "one file, round $r," "$tree" "$image" --output "$work/one.csv"; done
done
for r in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    name=$([ "$tree" = "$old" ] && echo old || echo new)
    rm -rf "$work/cams-$name"
    timed "folder + --gradcam-dir, round $r," "$tree" "$folder" --output "$work/$name.csv" --gradcam-dir "$work/cams-$name"
  done
done
echo "overlays: old $(du -sk "$work/cams-old" | cut -f1) KiB, new $(du -sk "$work/cams-new" | cut -f1) KiB" \
     "($(find "$work/cams-new" -type f | wc -l) files)"
cmp -s "$work/old.csv" "$work/new.csv" && echo "predictions CSV: identical" || echo "predictions CSV: DIFFERENT"
