"""Train several configs one after another and write a leaderboard.

    python scripts/train_zoo.py --data-dir ROOT --configs configs/lenet.yaml configs/alexnet.yaml
    python scripts/train_zoo.py --data-dir ROOT --configs configs/*.yaml --set epochs=5
    python scripts/train_zoo.py --leaderboard-only --output-root runs/zoo   # rebuild from finished runs

Each config runs as its own `scripts/train.py` process (so memory is returned between
models), under `--launcher` if given, e.g. --launcher "accelerate launch --multi_gpu".
Runs go to OUTPUT_ROOT/<config name>; all of them share one W&B group so they line up
side by side. leaderboard.md and leaderboard.png land in OUTPUT_ROOT. A config whose run
folder already holds a run is refused before anything trains: --skip-done keeps the finished
ones (with metrics.json) and --overwrite trains the rest again (without --skip-done, all of
them). The zoo never resumes a run that stopped early; `scripts/train.py --resume RUN_DIR`
does, if it saved an epoch. A config with `pretrained: true`
(configs/efficientnet_b0_imagenet.yaml) has its weights downloaded before the first run
trains, so a machine without network learns it at once.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rvf.cli import stdout_reader_may_leave  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=[],
                        help="YAML configs to train (required unless --leaderboard-only)")
    parser.add_argument("--data-dir", help="dataset root, passed to every run")
    parser.add_argument("--output-root", type=Path, default=Path("runs/zoo"),
                        help="runs go to OUTPUT_ROOT/<config name> (default: runs/zoo)")
    parser.add_argument("--group", help="W&B group (default zoo-<timestamp>)")
    parser.add_argument("--launcher", default="", help='prefix command, e.g. "accelerate launch --multi_gpu"')
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override passed to every run")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip configs whose run finished (has metrics.json); an unfinished run is still "
                             "refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again configs whose run folder already holds a run, finished or not (with "
                             "--skip-done: the unfinished ones only; default: refuse them)")
    parser.add_argument("--leaderboard-only", action="store_true", help="only rebuild the leaderboard")
    return parser


def fetch_pretrained(path: Path, cfg) -> list[str]:
    """Download a pretrained config's weights now (they are cached for its run), or say why not.

    Without network the hub fails after its retries, about a minute: better here than after
    the hours of training the configs before it take.
    """
    from rvf.models import create_model

    print(f"[zoo] {path.stem}: fetching its pretrained weights before anything trains", flush=True)
    try:
        create_model(cfg.model, pretrained=True, **{"num_classes": 2, **cfg.model_args})
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return [f"{path}: {first}"]  # rvf's message says how to use weights on disk
    return []


def check_model(path: Path, cfg) -> list[str]:
    """Build the config's model (no weights), pass it one image of its size and load its teachers,
    as train.py does before decoding.

    A typo in a model name, model_args or a teacher's folder, a size the model cannot take or a
    teacher that does not fit the run fails here rather than after the configs before it have trained.
    """
    from rvf import CLASSES
    from rvf.checkpoint import CheckpointError
    from rvf.config import ConfigError
    from rvf.data import resolve_data_config
    from rvf.distill import load_teachers
    from rvf.models import create_model
    from rvf.train import check_input_size

    try:
        model = create_model(cfg.model, **{"num_classes": len(CLASSES), **cfg.model_args})
        data_cfg = resolve_data_config(model, image_size=cfg.image_size, interpolation=cfg.interpolation)
        check_input_size(model, cfg.model, data_cfg.image_size, cfg.crop_size)
        load_teachers(cfg, data_cfg, CLASSES, "cpu")
    except (ConfigError, CheckpointError, ValueError, TypeError, RuntimeError) as e:
        return [f"{path}: {(str(e).splitlines() or [type(e).__name__])[0]}"]
    return []


def main(args) -> int:
    from rvf.config import ConfigError, load_config, parse_override
    from rvf.data import RVF10K, DatasetError
    from rvf.leaderboard import ResultsError, collect_runs, read_run_metrics, write_leaderboard
    from rvf.train import run_exists

    configs = [] if args.leaderboard_only else args.configs
    if not configs and not args.leaderboard_only:
        print("error: pass --configs FILE... (or --leaderboard-only to rebuild the leaderboard)", file=sys.stderr)
        return 2
    def done(cfg: Path) -> bool:  # a finished run that --skip-done keeps
        return args.skip_done and (args.output_root / cfg.stem / "metrics.json").is_file()

    # All of them checked before the first trains: a typo in the last must not wait hours.
    problems = []
    for cfg in configs:
        try:
            resolved = load_config(cfg, dict(parse_override(o) for o in args.overrides))
        except ConfigError as e:
            problems.append(str(e))
            continue
        if done(cfg):
            continue
        problems += check_model(cfg, resolved)
        if resolved.pretrained and not resolved.pretrained_file:
            problems += fetch_pretrained(cfg, resolved)
    stems = [cfg.stem for cfg in configs]
    problems += [f"two configs are named {s}.yaml: their runs would share {args.output_root / s}"
                 for s in sorted({s for s in stems if stems.count(s) > 1})]
    taken = [args.output_root / cfg.stem for cfg in configs
             if run_exists(args.output_root / cfg.stem) and not done(cfg)]
    finished = [str(out) for out in taken if (out / "metrics.json").is_file()]  # only without --skip-done
    unfinished = [str(out) for out in taken if not (out / "metrics.json").is_file()]
    if finished and not args.overwrite:
        problems.append(f"these run folders hold finished runs: {', '.join(finished)}; pass --skip-done to keep "
                        f"them, or --overwrite to train them again")
    if unfinished and not args.overwrite:
        # --skip-done cannot help here: what it keeps is a finished run.
        problems.append(f"these run folders hold runs that did not finish (no metrics.json; stopped, or still "
                        f"training): {', '.join(unfinished)}; pass --overwrite to train them again (or first "
                        f"finish one that saved an epoch with scripts/train.py --resume RUN_DIR)")
    try:
        launcher = shlex.split(args.launcher)
    except ValueError as e:  # an unbalanced quote
        launcher = []
        problems.append(f"--launcher {args.launcher!r}: {e}")
    if configs and launcher and shutil.which(launcher[0]) is None:
        problems.append(f"--launcher {args.launcher!r}: no command {launcher[0]!r} on PATH")
    if configs and args.data_dir:  # once here, rather than once per config as each run starts
        try:
            RVF10K(args.data_dir, "train")
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2

    group = args.group or time.strftime("zoo-%Y%m%d-%H%M%S")
    failed = []
    for cfg in configs:
        out = args.output_root / cfg.stem
        if done(cfg):
            print(f"[zoo] {cfg.stem}: done already, skipping", flush=True)
            continue
        cmd = (launcher or [sys.executable]) + [str(ROOT / "scripts" / "train.py"),
               "--config", str(cfg), "--output-dir", str(out), "--set", f"group={group}"]
        if args.overwrite:
            cmd.append("--overwrite")
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        for o in args.overrides:
            cmd += ["--set", o]
        print(f"[zoo] {cfg.stem}: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(cfg.stem)
            print(f"[zoo] {cfg.stem} FAILED; going on with the rest", file=sys.stderr, flush=True)
    runs = sorted(p for p in args.output_root.iterdir() if p.is_dir()) if args.output_root.is_dir() else []
    readable = []
    for run in runs:  # the output root may hold other things: an ensemble's or evaluate.py's folder
        try:
            if (run / "metrics.json").is_file():
                read_run_metrics(run / "metrics.json")
                readable.append(run)
        except ResultsError as e:
            print(f"[zoo] left out of the leaderboard: {e}", file=sys.stderr, flush=True)
    rows = collect_runs(readable)
    if failed:
        print(f"error: these runs failed: {', '.join(failed)}", file=sys.stderr)
    if not rows:
        print(f"error: no finished runs (metrics.json) under {args.output_root}", file=sys.stderr)
        return 1
    md = write_leaderboard(rows, args.output_root)
    # Only here: a reader that leaves while runs train stops the zoo, an error, not a quiet 0.
    with stdout_reader_may_leave():  # `| head`
        print(md.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
