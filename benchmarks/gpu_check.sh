#!/usr/bin/env bash
# The GPU measurements of issue 5, prepared as one device run (`device` tool, one H100):
#
#   bash benchmarks/gpu_check.sh          # results land in $OUT (at most 8 small files)
#
# rvf10k cannot travel to that machine (64 MiB limit, no internet), so everything runs on
# random 256 px JPEGs of rvf10k's shape and split sizes: a throughput measurement, not an
# accuracy one. What it measures, on the same GPU in the same run:
#   0. tests/test_step.py: the CUDA-graph step replays the eager step's updates (GPU-only tests);
#   1. scripts/benchmark.py: the plain loop vs rvf's path (split resident on the GPU, bf16,
#      channels_last, fused Adam), eagerly and with the step as a CUDA graph, for LeNet and
#      AlexNet: images/s and the ratios (goal >= 5x);
#   2. the seven seed configs, 20 epochs each, through the real training loop
#      (scripts/train_zoo.py, bf16) in each of ZOO_MODES: "auto" (the default: cuda_graph=null,
#      a graph wherever the capture works, eager steps where it fails, and zoo.json says which),
#      "graph" (cuda_graph=true: a failed capture stops that config) or "eager" (false); e.g.
#      ZOO_MODES="auto eager" for both: the sum of their train_seconds (goal <= 60 s).
# Measured 2026-11-28 on one H100 (eager only, before rvf.step existed): 445 s of wall time.
# Scale it down to try it on a CPU: N_TRAIN=70 EPOCHS=1 DEVICE=cpu MP=no ZOO_MODES=eager bash benchmarks/gpu_check.sh
# It leaves the synthetic data and runs in /tmp/rvf-synthetic and /tmp/rvf-gpu-check for a second
# look: rm -rf them when done.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
N_TRAIN=${N_TRAIN:-7000}
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}
MP=${MP:-bf16}
ZOO_MODES=${ZOO_MODES:-auto}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled RVF_CACHE_DIR=${RVF_CACHE_DIR:-/tmp/rvf-cache}
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA GPU here (or no torch for $PY): the check is for a GPU; on a CPU scale it down as the header says" >&2
  exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DATA=/tmp/rvf-synthetic
WORK=/tmp/rvf-gpu-check  # everything large stays here; only small text comes back
rm -rf "$DATA" "$WORK" && mkdir -p "$WORK"
"$PY" -c 'import torch, accelerate, timm; print("torch", torch.__version__, "| accelerate", accelerate.__version__, "| timm", timm.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/device.txt"
# Each stage has its own time limit, so one that hangs or runs long still leaves the later
# stages (and everything already written to $OUT) to come back. Override to scale.
T_TESTS=${T_TESTS:-180} T_BENCH=${T_BENCH:-150} T_ZOO=${T_ZOO:-300}

# 0) correctness of the graphed step first: a wrong graph makes every later number meaningless
if [[ "$DEVICE" == cuda ]]; then
    timeout "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/test_step.py > "$OUT/pytest.log" 2>&1
    echo "tests/test_step.py: rc=$? ($(tail -1 "$OUT/pytest.log"))"
fi

# 1) plain loop vs rvf, same data, model and steps (the first call also writes the synthetic set)
timeout "$T_BENCH" "$PY" scripts/benchmark.py --synthetic "$N_TRAIN" --synthetic-dir "$DATA" --model lenet --device "$DEVICE" \
    --mixed-precision "$MP" --scaling 0 --out "$WORK/bench" > "$OUT/bench-lenet.log" 2>&1 || tail -30 "$OUT/bench-lenet.log"
timeout "$T_BENCH" "$PY" scripts/benchmark.py --data-dir "$DATA" --model alexnet --device "$DEVICE" \
    --mixed-precision "$MP" --scaling 0 --repeats 2 --out "$WORK/bench" > "$OUT/bench-alexnet.log" 2>&1 || tail -30 "$OUT/bench-alexnet.log"
cat "$WORK"/bench/*.md 2>/dev/null

# 2) the seven seed configs through train(): total training time, per mode
ZOO=(configs/{lenet,alexnet,inception_v1,vgg16,resnet50,alexnet_bn,vgg16_bn}.yaml)
for mode in $ZOO_MODES; do
    case $mode in auto) graph=null ;; graph) graph=true ;; eager) graph=false ;;
        *) echo "error: ZOO_MODES takes auto, graph or eager, got '$mode'" >&2; exit 2 ;; esac
    timeout "$T_ZOO" "$PY" scripts/train_zoo.py --data-dir "$DATA" --configs "${ZOO[@]}" --output-root "$WORK/zoo-$mode" --overwrite \
        --set tracker=none --set epochs="$EPOCHS" --set mixed_precision="$MP" --set cuda_graph="$graph" \
        > "$WORK/zoo-$mode.log" 2>&1 || { echo "zoo ($mode) failed:"; tail -40 "$WORK/zoo-$mode.log"; }
done
"$PY" - "$OUT" "$WORK" $ZOO_MODES <<'PY'
import json, pathlib, sys
out, work, modes = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
summary = {}
for mode in modes:
    rows = []
    for m in sorted((work / f"zoo-{mode}").glob("*/metrics.json")):
        d = json.loads(m.read_text())
        rows.append({"config": m.parent.name, "train_seconds": round(d["train_seconds"], 2), "epochs": d["epochs"],
                     "images_per_second": round(d["images_per_second"], 1), "device": d["device"],
                     "mixed_precision": d["mixed_precision"], "device_data": d.get("device_data"),
                     "cuda_graph": d.get("cuda_graph"), "cuda_graph_error": d.get("cuda_graph_error")})
    total = round(sum(r["train_seconds"] for r in rows), 2)
    summary[mode] = {"runs": rows, "total_train_seconds": total, "goal_seconds": 60}
    for r in rows:
        print(f"{mode:>6} {r['config']:>14}: {r['train_seconds']:8.2f} s  {r['images_per_second']:9.1f} img/s  "
              f"{r['device']}  graph={r['cuda_graph']}" + (f" ({r['cuda_graph_error']})" if r["cuda_graph_error"] else ""))
    print(f"{mode:>6} {'total':>14}: {total:8.2f} s of training for {len(rows)} configs x {rows[0]['epochs'] if rows else 0} epochs")
(out / "zoo.json").write_text(json.dumps(summary, indent=2))
PY
# Small text only (metrics, logs, benchmark JSON): checkpoints and plots stay behind.
(cd "$WORK" && find . \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \) -size -4M -print0 \
    | tar --null -czf "$OUT/results.tgz" -T -)
ls -l "$OUT"
