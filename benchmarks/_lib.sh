# Shared by the A/B benchmark scripts (sourced, not run).

# find_python CHECKOUT: the python to time with, as an absolute path (links kept: a venv's python
# is one), so that runs starting in other checkouts use the same one. $PYTHON, else the README's
# set-up (CHECKOUT/.venv), else python3 on the PATH.
find_python() {
  local py=${PYTHON:-}
  [ -z "$py" ] && [ -x "$1/.venv/bin/python" ] && py=$1/.venv/bin/python
  py=$(command -v "${py:-python3}") || { echo "no python found: set PYTHON" >&2; return 1; }
  echo "$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
}

# check_rounds N: exit 2 unless N is a whole number of at least 1.
check_rounds() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number of at least 1, got '$1'" >&2; exit 2; }
}

# commits OLD NEW: the header line that says which two commits were timed, and whether NEW has
# changes on top (new files too: an untracked module is part of what runs).
commits() {
  echo "# old: $(git -C "$1" rev-parse --short HEAD) | new: $(git -C "$2" rev-parse --short HEAD)$([ -z "$(git -C "$2" status --porcelain)" ] || echo ' + changes')"
}

# seconds_since T0: wall seconds since T0 (from `date +%s.%N`), two decimals; awk, as bc is not everywhere.
seconds_since() {
  awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}
