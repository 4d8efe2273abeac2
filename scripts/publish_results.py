"""Publish finished runs into results/ and regenerate the leaderboard and the README's table.

    python scripts/publish_results.py runs/zoo/lenet runs/zoo/alexnet      # copy, then rebuild
    python scripts/publish_results.py                                     # only rebuild

Each run folder's small report files (metrics.json, config, classification report, confusion
matrix, curves, ROC, architecture, robustness) are copied to RESULTS/<run name>; weights,
resume states, W&B folders and samples.png (dataset faces) never are. Then RESULTS/leaderboard.md
and .png are rebuilt from every published run, and the table between the README's results
markers is rewritten from the same files, so the README can only show measured runs.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders (each with metrics.json)")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "rvf10k", help="published results root")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose results table to rewrite")
    return parser


def main(args) -> int:
    from rvf.leaderboard import collect_runs, publish_run, update_readme, write_leaderboard

    for run in args.runs:
        try:
            print(f"published {run} -> {publish_run(run, args.results)}")
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    rows = collect_runs(sorted(p for p in args.results.iterdir() if p.is_dir()))
    if not rows:
        print(f"error: no published runs (metrics.json) under {args.results}", file=sys.stderr)
        return 2
    print(f"wrote {write_leaderboard(rows, args.results)} ({len(rows)} runs)")
    try:
        changed = update_readme(args.readme, rows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: results table {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
