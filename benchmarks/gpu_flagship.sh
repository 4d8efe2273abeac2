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
#   3. device run, carrying the last part:  bash benchmarks/gpu_flagship.sh
#      -> unpacks, checks all 10,000 md5 sums, trains MODELS x SEEDS and writes
#         $OUT/flagship.json and $OUT/flagship.md (accuracy, ROC AUC, AP per run; mean +- std).
#
# Every seed holds out the same slice of train (SPLIT_SEED, default 42), so the seeds of a config
# are also scored as one ensemble (scripts/ensemble.py -> $OUT/<config>_ensemble.txt).
#
# Measured 2026-12-04 on one H200 (benchmarks/results/gpu-h200-2026-12-04.md): parts 01-03
# took 3-6 s of device time per call once the machine was warm; three seeds of the 512-grid flagship with
# their ensemble took 226 s, unpacking and md5 checks included (34 s of training per seed).
#
# Knobs: MODELS (configs, default flagship_alexnet_bn_grid512 then flagship_resnet18), SEEDS ("0 1 2"), SPLIT_SEED, EPOCHS
# (default: the config's), SETS (extra overrides, split on spaces, e.g. SETS="downscale=0.5", or
# SETS='model_args={"stem_stride":2}' with JSON for a mapping), DATA (where the parts are).
# Try it small on a CPU:
#   DATA=/tmp/parts SUBSET=64 EPOCHS=1 SEEDS=0 bash benchmarks/gpu_flagship.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${DATA:-.gpu_data}
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
    (cd "$ROOT" && md5sum --quiet -c "$OLDPWD/$PARTS/rvf10k.md5") || { echo "error: md5 mismatch: a part is missing or damaged" >&2; exit 1; }
    touch "$ROOT/.complete"
fi
echo "data: $(find "$ROOT/rvf10k" -name '*.jpg' | wc -l) images verified in $ROOT"

extra=()
[[ -n "${EPOCHS:-}" ]] && extra+=(--epochs "$EPOCHS")
[[ -n "${SUBSET:-}" ]] && extra+=(--set subset="$SUBSET")
for kv in ${SETS:-}; do extra+=(--set "$kv"); done
for cfg in $MODELS; do
    members=()
    for seed in $SEEDS; do
        name=$(basename "$cfg" .yaml)_seed$seed
        "$PY" scripts/train.py --config "$cfg" --data-dir "$ROOT" --output-dir "/tmp/rvf-flagship/$name" \
            --seed "$seed" --set split_seed="$SPLIT_SEED" --tracker none --overwrite "${extra[@]}" > "$OUT/$name.log" 2>&1 \
            || { tail -40 "$OUT/$name.log"; exit 1; }
        tr "\r" "\n" < "$OUT/$name.log" | grep "^valid (" | tail -1 || true
        members+=("/tmp/rvf-flagship/$name")
    done
    if (( ${#members[@]} > 1 )); then
        "$PY" scripts/ensemble.py --data-dir "$ROOT" --checkpoints "${members[@]}" \
            > "$OUT/$(basename "$cfg" .yaml)_ensemble.txt" 2> "$OUT/$(basename "$cfg" .yaml)_ensemble.log" \
            && cat "$OUT/$(basename "$cfg" .yaml)_ensemble.txt" || tail -20 "$OUT/$(basename "$cfg" .yaml)_ensemble.log"
    fi
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for m in sorted(pathlib.Path("/tmp/rvf-flagship").glob("*/metrics.json")):
    d = json.loads(m.read_text())
    v = d["valid"]
    runs.setdefault(m.parent.name.rsplit("_seed", 1)[0], []).append({
        "run": m.parent.name, "accuracy": v["accuracy"], "roc_auc": v["roc_auc"], "ap": v["average_precision"],
        "acc_at_threshold": v["accuracy_at_threshold"], "best_epoch": d["best_epoch"], "epochs": d["epochs"],
        "train_seconds": round(d["train_seconds"], 1), "device": d["device"]})
lines = ["| config | runs | accuracy % | ROC AUC | AP | train s/run | device |", "|---|---|---|---|---|---|---|"]
summary = {}
for cfg, rs in runs.items():
    def ms(k, scale=1.0):
        xs = [r[k] * scale for r in rs]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
    acc, auc, ap = ms("accuracy", 100), ms("roc_auc"), ms("ap")
    summary[cfg] = {"runs": rs, "accuracy_mean_std": acc, "roc_auc_mean_std": auc, "ap_mean_std": ap}
    lines.append(f"| {cfg} | {len(rs)} | {acc[0]:.2f} ± {acc[1]:.2f} | {auc[0]:.4f} ± {auc[1]:.4f} | "
                 f"{ap[0]:.4f} ± {ap[1]:.4f} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | {rs[0]['device']} |")
(out / "flagship.json").write_text(json.dumps(summary, indent=2))
(out / "flagship.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
