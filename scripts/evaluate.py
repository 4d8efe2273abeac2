"""Evaluate a trained model on a split of rvf10k and write the same reports as training.

    python scripts/evaluate.py --checkpoint runs/lenet --data-dir ROOT [--split valid] [--output-dir OUT]
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 scripts/evaluate.py ...   # 2-process CPU DDP

Writes metrics.json, classification_report.txt, confusion_matrix.png, roc.png and
probabilities.csv (label, p_fake, path: one row per image) into OUT (default CHECKPOINT/eval-SPLIT).
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
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a training run's output folder (model.safetensors + model.json)")
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root (either layout)")
    parser.add_argument("--split", default="valid", choices=["train", "valid", "test"],
                        help="default: valid. train scores the images the model was fitted on too, so it "
                             "is no estimate of accuracy on new faces")
    parser.add_argument("--output-dir", type=output_dir, help="default CHECKPOINT/eval-SPLIT")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per process (default: 128)")
    parser.add_argument("--cache-dir", type=output_dir,
                        help="decode cache folder (default $RVF_CACHE_DIR or ~/.cache/rvf)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    parser.add_argument("--tta-hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="also score each image's mirror and average the logits "
                             "(default: as the model was trained, see its model.json)")
    add_cpu_threads(parser)
    return parser


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rvf.checkpoint import CheckpointError
    from rvf.config import ConfigError
    from rvf.data import BadImageError, DatasetError
    from rvf.evaluate import evaluate_checkpoint

    try:
        # In here, not around main: a print's BrokenPipeError is an OSError, which would be named below.
        with stdout_reader_may_leave():  # `| head`: its last act is the line of scores, after the reports
            evaluate_checkpoint(args.checkpoint, args.data_dir, args.split, args.output_dir,
                                args.batch_size, args.cache_dir, args.skip_bad, args.tta_hflip,
                                args.cpu_threads)
    except (CheckpointError, ConfigError, DatasetError, BadImageError) as e:
        if not getattr(e, "reported_elsewhere", False):  # another process prints it (rvf.train)
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not getattr(e, "reported_elsewhere", False):  # e.g. a full disk while the main process decodes
            print(f"error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    finally:
        end_process_group()  # under a launcher: left to exit, gloo's threads at times died on SIGABRT
