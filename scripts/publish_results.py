"""Publish finished runs into results/ and regenerate the leaderboard and the README's table.

    python scripts/publish_results.py runs/zoo/lenet runs/zoo/alexnet      # copy, then rebuild
    python scripts/publish_results.py                                     # only rebuild

Each run folder's small report files (metrics.json, config, classification report, confusion
matrix, curves, ROC, architecture, robustness) replace RESULTS/<run name> as a whole; weights,
resume states, W&B folders and samples.png (dataset faces) never go there. Report files of the
previous publication that the run lacks (e.g. robustness.* from an earlier training) are
dropped and named, unless it was the same training (an equal metrics.json): then they are kept.
A folder holding files no run publishes (put there by hand) is refused. Then RESULTS/leaderboard.md
and .png are rebuilt from every published run, and the table between the README's results
markers is rewritten from the same files, so the README can only show measured runs.

The table names each row's config as configs/<run name>.yaml and heads itself "the full rvf10k
valid split", so a run is refused unless its folder is named after a config in configs/, its
config.yaml trains what that config says (paths, tracking and speed settings may differ:
rvf.config.RECIPE_NEUTRAL_KEYS) and it was scored on all 3,000 valid images (--force publishes
it anyway). Everything is checked before anything is copied.
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
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "rvf10k",
                        help="published results root (default: results/rvf10k in this repository)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="README whose results table to rewrite (default: this repository's)")
    parser.add_argument("--force", action="store_true",
                        help="publish runs not named after a config in configs/, trained with other settings than "
                             "it, or not scored on the full valid split")
    return parser


FULL_VALID = 3000  # rvf10k's valid split


def check_run(run: Path, force: bool, results: Path) -> str | None:
    """Return why `run` cannot go into the README's table or replace its published folder, or None."""
    from rvf.leaderboard import ResultsError, read_run_metrics, unpublished_files

    metrics = run / "metrics.json"
    if not run.is_dir():
        return f"{run}: no such run folder"
    if not metrics.is_file():
        return f"{run}: no metrics.json; is the run finished?"
    try:  # --force or not: a file the tables cannot read would break every later rebuild
        n = read_run_metrics(metrics)["valid"].get("n")
    except ResultsError as e:
        return str(e)
    if foreign := unpublished_files(results / run.name):  # --force or not: republishing would delete them
        return (f"{results / run.name}: holds {', '.join(foreign)}, which no run publishes (put there by hand?) and "
                f"publishing {run} would delete; move them out of that folder first")
    if force:
        return None
    committed = ROOT / "configs" / f"{run.name}.yaml"
    if not committed.is_file():
        return (f"{run}: the table would call it configs/{run.name}.yaml, which does not exist; name the run "
                f"folder after its config (train_zoo.py does), or pass --force")
    if why := check_recipe(run, committed):
        return why
    if n != FULL_VALID:
        return f"{run}: scored on {n} valid images, not rvf10k's {FULL_VALID}; pass --force to publish it anyway"
    return None


def check_recipe(run: Path, committed: Path) -> str | None:
    """Return why `run`'s config.yaml is not `committed`'s recipe (e.g. --set epochs=1), or None.

    Keys that do not change what is trained (paths, tracking, speed: `RECIPE_NEUTRAL_KEYS`) may differ.
    """
    from rvf.config import ConfigError, load_config, recipe_differences

    used = run / "config.yaml"
    if not used.is_file():
        return f"{run}: no config.yaml, so nothing says it was trained as {committed.name}; pass --force to publish it"
    try:
        got, want = load_config(used), load_config(committed)
    except ConfigError as e:
        return f"{e}; pass --force to publish {run} anyway"
    differences = recipe_differences(got, want)
    if not differences:
        return None
    return (f"{run}: trained with other settings than configs/{committed.name}, which the table would name: "
            + ", ".join(f"{k} {ran!r} (the config's: {says!r})" for k, (ran, says) in differences.items())
            + "; retrain it as the config says, or pass --force")


def main(args) -> int:
    from rvf.leaderboard import (
        README_END,
        README_START,
        ResultsError,
        collect_runs,
        publish_run,
        update_readme,
        write_leaderboard,
    )

    problems = [why for run in args.runs if (why := check_run(run, args.force, args.results))]
    if not args.readme.is_file():
        problems.append(f"--readme {args.readme}: no such file")
    elif README_START not in (text := args.readme.read_text()) or README_END not in text:
        problems.append(f"{args.readme}: no results markers ({README_START!r} ... {README_END!r})")
    if not args.runs and not args.results.is_dir():
        problems.append(f"--results {args.results}: no such folder")
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    for run in args.runs:
        try:
            dest, dropped, kept = publish_run(run, args.results)
        except OSError as e:  # e.g. a full disk: the published folder is swapped in whole or not at all
            print(f"error: publishing {run}: {e}; {args.results / run.name} is as it was", file=sys.stderr)
            return 1
        print(f"published {run} -> {dest}")
        if dropped:
            print(f"  dropped the previous training's {', '.join(dropped)}: {run} has none")
        if kept:
            print(f"  kept {', '.join(kept)}: the same training was published there before (metrics.json unchanged)")
    try:
        # A hidden .NAME.publishing-PID folder is what a killed publish left, not a run.
        rows = collect_runs(sorted(p for p in args.results.iterdir() if p.is_dir() and not p.name.startswith(".")))
    except ResultsError as e:  # a folder put there by hand
        print(f"error: {e}", file=sys.stderr)
        return 2
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
