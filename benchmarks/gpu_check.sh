#!/usr/bin/env bash
# The GPU measurements of issue 5, prepared as one device run (`device` tool, one H100):
#
#   bash benchmarks/gpu_check.sh          # results (JSON, Markdown, a summary) land in $OUT
#
# rvf10k cannot travel to that machine (64 MiB limit, no internet), so everything runs on
# random 256 px JPEGs of rvf10k's shape and split sizes: a throughput measurement, not an
# accuracy one. What it measures, on the same GPU in the same run:
#   1. scripts/benchmark.py: the plain loop vs rvf's path (split resident on the GPU, bf16,
#      channels_last, fused Adam: training's defaults) for LeNet and AlexNet: images/s and the ratio (goal >= 5x);
#   2. the seven seed configs, 20 epochs each, through the real training loop
#      (scripts/train_zoo.py, bf16): the sum of their train_seconds (goal <= 60 s).
# Scale it down to try it on a CPU: N_TRAIN=70 EPOCHS=1 DEVICE=cpu MP=no bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
N_TRAIN=${N_TRAIN:-7000}
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}
MP=${MP:-bf16}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled RVF_CACHE_DIR=${RVF_CACHE_DIR:-/tmp/rvf-cache}
mkdir -p "$OUT"
DATA=/tmp/rvf-synthetic
rm -rf "$DATA" /tmp/rvf-zoo
"$PY" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/device.txt"

# 1) plain loop vs rvf, same data, model and steps (also writes the synthetic set)
"$PY" scripts/benchmark.py --synthetic "$N_TRAIN" --synthetic-dir "$DATA" --model lenet --device "$DEVICE" \
    --mixed-precision "$MP" --scaling 0 --out "$OUT" 2>&1 | tee "$OUT/bench-lenet.log"
"$PY" scripts/benchmark.py --data-dir "$DATA" --model alexnet --device "$DEVICE" \
    --mixed-precision "$MP" --scaling 0 --repeats 2 --out "$OUT" 2>&1 | tee "$OUT/bench-alexnet.log"

# 2) the seven seed configs through train(): total training time
ZOO=(configs/{lenet,alexnet,inception_v1,vgg16,resnet50,alexnet_bn,vgg16_bn}.yaml)
"$PY" scripts/train_zoo.py --data-dir "$DATA" --configs "${ZOO[@]}" --output-root /tmp/rvf-zoo \
    --set tracker=none --set epochs="$EPOCHS" --set mixed_precision="$MP" > "$OUT/zoo.log" 2>&1 \
    || { tail -50 "$OUT/zoo.log"; exit 1; }
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for m in sorted(pathlib.Path("/tmp/rvf-zoo").glob("*/metrics.json")):
    d = json.loads(m.read_text())
    rows.append({"config": m.parent.name, "train_seconds": round(d["train_seconds"], 2), "epochs": d["epochs"],
                 "images_per_second": round(d["images_per_second"], 1), "device": d["device"],
                 "mixed_precision": d["mixed_precision"], "device_data": d.get("device_data")})
total = round(sum(r["train_seconds"] for r in rows), 2)
summary = {"runs": rows, "total_train_seconds": total, "goal_seconds": 60}
(out / "zoo.json").write_text(json.dumps(summary, indent=2))
for r in rows:
    print(f"{r['config']:>14}: {r['train_seconds']:8.2f} s  {r['images_per_second']:9.1f} img/s  {r['device']}")
print(f"{'total':>14}: {total:8.2f} s of training for {len(rows)} configs x {rows[0]['epochs'] if rows else 0} epochs")
PY
