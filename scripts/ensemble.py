r"""Score several trained detectors together: mean P(fake), threshold calibrated on the holdout slice.

    python scripts/ensemble.py --checkpoints runs/zoo/vgg16_bn_best runs/zoo/alexnet_bn_best --data-dir ROOT \
        --output-dir runs/ensemble

Each member uses its own input size and test-time flips, as it was trained. The members must
have held out the same slice of train (same `holdout` and `split_seed` in their configs;
`split_seed` defaults to `seed`), because the ensemble's threshold is calibrated on it. Runs
trained on all of train (`holdout: 0`) average only with each other, at the threshold 0.5 they
kept, and show "-" for holdout accuracy.

Prints each member's and the ensemble's valid accuracy and ROC AUC, then every smaller
ensemble of the same members by size and where a fit over the sizes says many more such
members would go: whether another seed is still worth training. Writes metrics.json,
classification_report.txt, confusion_matrix.png, roc.png and probabilities.csv (label, p_fake,
path as evaluate.py writes them, then p_fake:RUN for each member) into OUT.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import add_cpu_threads, end_process_group, output_dir, positive_int, stdout_reader_may_leave  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, nargs="+", type=Path, metavar="RUN",
                        help="two or more training run folders (model.safetensors + model.json)")
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root (either layout)")
    parser.add_argument("--output-dir", type=output_dir, help="where the reports go (default: print only)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per process (default: 128)")
    parser.add_argument("--cache-dir", type=output_dir,
                        help="decode cache folder (default $RVF_CACHE_DIR or ~/.cache/rvf)")
    add_cpu_threads(parser)
    return parser


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from accelerate import PartialState

    from rvf.checkpoint import CheckpointError
    from rvf.config import ConfigError
    from rvf.data import BadImageError, DatasetError
    from rvf.ensemble import EnsembleError, evaluate_ensemble

    try:
        m = evaluate_ensemble(args.checkpoints, args.data_dir, args.output_dir, args.batch_size, args.cache_dir,
                              args.cpu_threads)
    except (CheckpointError, ConfigError, DatasetError, BadImageError, EnsembleError) as e:
        if not getattr(e, "reported_elsewhere", False):  # another process prints it (rvf.train)
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not getattr(e, "reported_elsewhere", False):  # e.g. a full disk while the main process decodes
            print(f"error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1
    if not PartialState().is_main_process:  # every process scored its share and has the figures: one prints
        return 0
    rows = [(r["checkpoint"], r) for r in m["members"]] + [("ensemble (mean P(fake))", m)]
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}s}  holdout   valid split")
    print(f"{'':{width}s}  accuracy  accuracy  ROC AUC  acc@threshold")
    for name, r in rows:
        v, hold = r["valid"], f"{r['holdout']['accuracy']:8.2%}" if r["holdout"] else f"{'-':>8s}"
        print(f"{name:{width}s}  {hold}  {v['accuracy']:8.2%}  {v['roc_auc']:7.4f}  "
              f"{v['accuracy_at_threshold']:8.2%}")
    sub = m["sub_ensembles"]
    print("\nsmaller ensembles of these members (valid split, mean over the subsets of each size):")
    print("members  subsets  accuracy  (lowest - highest)  ROC AUC")
    for s in sub["sizes"]:
        print(f"{s['members']:7d}  {s['subsets']:7d}  {s['accuracy']:8.2%}  ({s['accuracy_min']:.2%} - "
              f"{s['accuracy_max']:.2%})  {s['roc_auc']:7.4f}")
    if sub["limit"]:
        print(f"fit a - b/members: with many more members like these, about {sub['limit']['accuracy']:.2%} "
              f"accuracy and ROC AUC {sub['limit']['roc_auc']:.4f} (a guide, not a bound)")
    return 0


if __name__ == "__main__":
    try:
        with stdout_reader_may_leave():  # `| head`
            sys.exit(main(get_args_parser().parse_args()))
    finally:
        end_process_group()  # under a launcher: left to exit, gloo's threads at times died on SIGABRT
