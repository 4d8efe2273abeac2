#!/usr/bin/env bash
# Wall time of one rvf script in two checkouts (e.g. before and after a change), alternated so
# both see the same machine, then whether the two wrote the same files.
#
#   bash benchmarks/ab.sh OLD_CHECKOUT NEW_CHECKOUT ROUNDS SCRIPT [ARGS...]
#
# An argument @OUT becomes a fresh folder for each run (kept from each checkout's last round and
# compared at the end); paths in ARGS are taken from where this is run. e.g.
#   git worktree add /tmp/old HEAD~1
#   bash benchmarks/ab.sh /tmp/old . 3 scripts/robustness.py --checkpoint runs/alexnet_bn \
#       --data-dir ROOT --output-dir @OUT
# Run it on an otherwise idle machine: two threads sharing two cores with anything else time that.
set -euo pipefail
old=$(cd "${1:?usage: see the header}" && pwd); new=$(cd "${2:?}" && pwd); rounds=${3:?}; script=${4:?}
shift 4
source "$(dirname "$0")/_lib.sh"
check_rounds "$rounds"
python=$(find_python "$new") || exit 1
args=()
for a in "$@"; do  # paths that exist here become absolute, as each run starts in its checkout
  if [ "$a" != @OUT ] && [ -e "$a" ]; then args+=("$(realpath "$a")"); else args+=("$a"); fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# bash benchmarks/ab.sh OLD NEW $rounds $script $* | $(date -u +%Y-%m-%d) | $(nproc) cores" \
     "| $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
commits "$old" "$new"
for r in $(seq "$rounds"); do
  for name in old new; do
    tree=$([ "$name" = old ] && echo "$old" || echo "$new")
    rm -rf "${work:?}/$name"
    run=("${args[@]/#@OUT/$work/$name}")
    t0=$(date +%s.%N)
    (cd "$tree" && "$python" "$script" "${run[@]}" > "$work/log" 2>&1) || { cat "$work/log"; exit 1; }
    printf 'round %s, %s: %s s\n' "$r" "$name" "$(seconds_since "$t0")"
  done
done
if [ -d "$work/old" ]; then
  diff -rq "$work/old" "$work/new" > /dev/null && echo "outputs: identical" || { echo "outputs: DIFFERENT"; diff -rq "$work/old" "$work/new" || true; }
fi
