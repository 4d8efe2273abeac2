#!/usr/bin/env bash
# Issue 7's flagship candidates at native 256 px on a lent GPU (`device` tool), in two steps.
#
# rvf10k is 282 MB as a gzipped tar and only 64 MiB (the working tree included) travel per
# device call, so the data goes over in 56 MiB parts, one per call, into the git-ignored
# .gpu_data/ that stays on the warm machine between calls (it is given back after 30 s idle:
# make the calls back to back).
#
#   1. here:  bash benchmarks/gpu_flagship.sh pack ROOT        # -> .gpu_data/rvf10k.tgz.part-00..04
#   2. device run, once per part, carry [".gpu_data/rvf10k.tgz.part-0K"] (part 00 with
#      ".gpu_data/rvf10k.md5"), command `ls -l .gpu_data`
#      (the first call can carry part 00 and run benchmarks/gpu_check.sh as well)
#   3. device run, carrying the last part:  bash benchmarks/gpu_flagship.sh [SWEEP ARGS]
#      -> unpacks, checks all 10,000 md5 sums, then runs benchmarks/flagship_sweep.py: trains
#         every variant over the seeds and writes $OUT/flagship.md and $OUT/flagship.json
#         (holdout and valid figures per run, mean +- std, each variant's seeds as an ensemble).
#
# With no arguments it trains MODELS x SEEDS (every seed holds out the same slice of train,
# SPLIT_SEED, default 42). Given arguments, they go to the sweep as they are; the one a device
# call wants can pick a variant on the holdout slice (--select) and stops before the call's limit
# (--budget-s), e.g. for the scale augmentation docs/experiments.md leaves to a GPU:
#   bash benchmarks/gpu_flagship.sh --select --budget-s 480 --variants \
#       configs/flagship_alexnet_bn_grid512.yaml "configs/flagship_alexnet_bn_grid512.yaml downscale=0.5"
#
# Measured 2026-12-04 on one H200 (benchmarks/results/gpu-h200-2026-12-04.md): parts 01-03
# took 3-6 s of device time per call once the machine was warm; three seeds of the 512-grid flagship with
# their ensemble took 226 s, unpacking and md5 checks included (34 s of training per seed).
#
# Knobs: MODELS (configs, default flagship_alexnet_bn_grid512 then flagship_resnet18), SEEDS ("0 1 2"),
# SETS (overrides for each of MODELS, split on spaces, e.g. SETS="downscale=0.5", or
# SETS='model_args={"stem_stride":2}' with JSON for a mapping), and for every run SPLIT_SEED, EPOCHS
# (default: the config's) and SUBSET; BUDGET_S (the sweep's --budget-s: set it a minute under the
# call's limit); DATA (where the parts are), OUT (default flagship/).
# Try it small on a CPU:
#   DATA=/tmp/parts SUBSET=64 EPOCHS=1 SEEDS=0 bash benchmarks/gpu_flagship.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=$(realpath -m "${DATA:-.gpu_data}")  # absolute: the md5 check runs from inside ROOT
PART_MB=${PART_MB:-56}
PY=${PYTHON:-python3}

if [[ "${1:-}" == "pack" ]]; then
    root=${2:?usage: gpu_flagship.sh pack ROOT}
    [[ -f "$root/train.csv" && -d "$root/rvf10k" ]] || { echo "error: $root is not rvf10k's Kaggle layout (train.csv, rvf10k/)" >&2; exit 2; }
    mkdir -p "$PARTS"
    rm -f "$PARTS"/rvf10k.tgz.part-*
    (cd "$root" && find rvf10k -name '*.jpg' -print0 | sort -z | xargs -0 md5sum) > "$PARTS/rvf10k.md5"
    tar -C "$root" -cf - train.csv valid.csv rvf10k | gzip -1 | split -b "${PART_MB}M" -d -a 2 - "$PARTS/rvf10k.tgz.part-"
    # The md5 list travels with the first part.
    ls -l "$PARTS"
    exit 0
fi

OUT=${OUT:-flagship}
MODELS=${MODELS:-configs/flagship_alexnet_bn_grid512.yaml configs/flagship_resnet18.yaml}
SEEDS=${SEEDS:-0 1 2}
SPLIT_SEED=${SPLIT_SEED:-42}
ROOT=/tmp/rvf10k
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled RVF_CACHE_DIR=${RVF_CACHE_DIR:-/tmp/rvf-cache}
mkdir -p "$OUT"
"$PY" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/device.txt"

if [[ ! -f "$ROOT/.complete" ]]; then
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    cat "$PARTS"/rvf10k.tgz.part-* | tar -xzf - -C "$ROOT"
    (cd "$ROOT" && md5sum --quiet -c "$PARTS/rvf10k.md5") || { echo "error: md5 mismatch: a part is missing or damaged" >&2; exit 1; }
    touch "$ROOT/.complete"
fi
echo "data: $(find "$ROOT/rvf10k" -name '*.jpg' | wc -l) images verified in $ROOT"

# The knobs above, or the sweep's own arguments (benchmarks/flagship_sweep.py --help) when given.
common=()
[[ -n "${EPOCHS:-}" ]] && common+=(--set epochs="$EPOCHS")
[[ -n "${SUBSET:-}" ]] && common+=(--set subset="$SUBSET")
[[ -n "${BUDGET_S:-}" ]] && common+=(--budget-s "$BUDGET_S")
if (( $# )); then
    sweep=("$@")
else
    variants=()
    for cfg in $MODELS; do variants+=("$cfg ${SETS:-}"); done
    # shellcheck disable=SC2206  # SEEDS is a list of numbers
    sweep=(--variants "${variants[@]}" --seeds $SEEDS)
fi
exec "$PY" benchmarks/flagship_sweep.py --data-dir "$ROOT" --out "$OUT" --split-seed "$SPLIT_SEED" "${common[@]}" "${sweep[@]}"
