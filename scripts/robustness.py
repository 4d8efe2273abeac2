"""Evaluate a trained detector under JPEG re-compression, rescaling, blur and noise (and, asked, reframing).

    python scripts/robustness.py --checkpoint runs/lenet --data-dir ROOT [--split valid] [--limit 1000]

Conditions: clean, JPEG q = 95 / 75 / 50, down-then-up scaling 0.5x / 0.25x, Gaussian blur
(radius 1 px) and Gaussian noise (std 8 of 255), each applied at the image's native size
before the model's own resize. Writes robustness.md (table), robustness.json and
robustness.png into OUT (default CHECKPOINT/robustness-SPLIT). Each row has accuracy, its change
from clean, the share of fakes and of reals called right (which way the verdicts moved), ROC
AUC and average precision.

--perturbations picks others, as KIND:VALUE (clean alone takes none), e.g. how much a detector leans on where the
face sits (the picture moved down and right by whole native pixels, edges repeated):
    python scripts/robustness.py --checkpoint runs/X --data-dir ROOT --perturbations clean shift:1 shift:2 shift:4

When the run has a framing check (framing.safetensors: written by training, or added to an
older run by scripts/framing.py), the table also says which share of the faces the web app
and the CLI would have warned about as framed unlike the training faces, and the accuracy
on the rest; crop:F (a random square of F of the side) and rotate:DEG reframe a face as
another tool might.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import non_negative_int, output_dir, positive_int, stdout_reader_may_leave  # noqa: E402


def at_least_two(text: str) -> int:
    """--limit: one image of each class at the least."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (one image of each class)")
    return value


def perturbation(text: str):
    """--perturbations: KIND:VALUE (or clean), checked here so that a typo stops before any evaluation."""
    from rvf.robustness import Perturbation

    try:
        return Perturbation.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a training run's folder")
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root (either layout)")
    parser.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="default: valid")
    parser.add_argument("--output-dir", type=output_dir, help="default CHECKPOINT/robustness-SPLIT")
    parser.add_argument("--limit", type=at_least_two, help="a stratified subset of this many images (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="images per forward pass, a face under each condition counted once: "
                             "128 = 16 faces x 8 conditions (default: 128)")
    parser.add_argument("--num-workers", type=non_negative_int,
                        help="decoding processes; 0 decodes in this one (default: cores, at most 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto, a GPU when there is one)")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    parser.add_argument("--perturbations", nargs="+", type=perturbation, metavar="KIND:VALUE",
                        help="conditions to run, in order, e.g. clean jpeg:75 shift:2; kinds: clean, jpeg (quality), "
                             "scale (factor), blur (radius), noise (std of 255), shift (pixels down and right), "
                             "crop (share of the side kept), rotate (degrees); each but clean needs its value "
                             "(default: the list above)")
    return parser


def main(args) -> int:
    from rvf.checkpoint import CheckpointError
    from rvf.data import BadImageError, DatasetError
    from rvf.robustness import evaluate_robustness

    try:
        result = evaluate_robustness(args.checkpoint, args.data_dir, args.split, args.output_dir, args.limit,
                                     args.batch_size, args.num_workers, perturbations=args.perturbations,
                                     device=args.device, skip_bad=args.skip_bad)
    except (CheckpointError, DatasetError, BadImageError, ValueError) as e:  # ValueError: --device
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1
    out = args.output_dir or args.checkpoint / f"robustness-{args.split}"
    print((Path(out) / "robustness.md").read_text(), end="")
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    with stdout_reader_may_leave():  # `| head`
        sys.exit(main(get_args_parser().parse_args()))
