#!/usr/bin/env bash
# Train speed on a CPU under `accelerate launch`, which exports OMP_NUM_THREADS=1 unless told
# otherwise: `cpu_threads: 1` (what every launched CPU run got before rvf chose the threads)
# against the default (the process's share of the physical cores), alternated ROUNDS times so
# both see the same machine. Each run is the seed's AlexNet+BN config for EPOCHS epochs.
#
#   bash benchmarks/cpu_threads.sh ROOT [OUT_FILE] [ROUNDS] [EPOCHS]
#
# ROOT is rvf10k (Kaggle layout); the decode cache is built by the first run and shared.
# Prints, and writes to OUT_FILE (default benchmarks/results/cpu_threads-cpu.txt), one line a
# run (img/s of each epoch, training seconds) and the mean ratio of training seconds.
set -euo pipefail
root=$(realpath -m "${1:?usage: bash benchmarks/cpu_threads.sh ROOT [OUT_FILE] [ROUNDS] [EPOCHS]}")
[ -d "$root" ] || { echo "ROOT $root is not a folder (rvf10k in Kaggle's layout)" >&2; exit 2; }
out_file=$(realpath -m "${2:-$(dirname "$0")/results/cpu_threads-cpu.txt}")  # both from where it was run
rounds=${3:-3}
source "$(dirname "$0")/_lib.sh"
check_rounds "$rounds"
epochs=${4:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$(find_python "$repo") || exit 1
cd "$repo"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

{
  echo "# bash benchmarks/cpu_threads.sh ROOT $(realpath --relative-to=. "$out_file") $rounds $epochs"
  echo "# $(date -u +%Y-%m-%d) | $("$python" -c 'from rvf.utils import device_name; print(device_name("cpu"))') | $(nproc) cores"
} > "$work/result"
for round in $(seq "$rounds"); do
  for mode in one auto; do
    extra=()
    [ "$mode" = one ] && extra=(--set cpu_threads=1)
    run="$work/$mode-$round"
    # --cpu: on a GPU machine too (the config file still has Accelerate export OMP_NUM_THREADS=1)
    env -u OMP_NUM_THREADS WANDB_MODE=offline "$python" -m accelerate.commands.launch --cpu \
      --config_file accelerate_config.yaml scripts/train.py --config configs/alexnet_bn.yaml --data-dir "$root" \
      --output-dir "$run" --epochs "$epochs" --tracker none "${extra[@]}" > "$run.log" 2>&1 \
      || { tail -20 "$run.log"; exit 1; }
    "$python" - "$run" "$mode" "$round" >> "$work/result" <<'EOF'
import json, re, sys
run, mode, rnd = sys.argv[1:]
m = json.load(open(f"{run}/metrics.json"))
threads = re.search(r"x 1, (\d+) thread", open(f"{run}.log").read()).group(1)
print(f"{mode:4s} round {rnd}: {threads} thread(s) | img/s {[round(h['images_per_second']) for h in m['history']]} "
      f"| train {m['train_seconds']:.1f} s")
EOF
    tail -1 "$work/result"
  done
done
"$python" - "$work/result" >> "$work/result" <<'EOF'
import re, sys
rows = [re.match(r"(\w+)\s+round (\d+):.*train ([\d.]+) s", line) for line in open(sys.argv[1])]
secs = {}
for r in filter(None, rows):
    secs.setdefault(r.group(1), []).append(float(r.group(3)))
ratios = [a / b for a, b in zip(secs["one"], secs["auto"])]
print(f"speed-up of the default over cpu_threads=1: {sum(ratios) / len(ratios):.2f}x "
      f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")
EOF
tail -1 "$work/result"
mkdir -p "$(dirname "$out_file")"
cp "$work/result" "$out_file"
