"""Export a trained checkpoint to ONNX or TorchScript and check it against PyTorch.

Usage:
    python scripts/export.py --checkpoint runs/lenet --format onnx [--output lenet.onnx]
    python scripts/export.py --checkpoint runs/lenet --format torchscript

The file takes a uint8 batch `image` (B, 3, S, S) — RGB, resized to the checkpoint's input
size — and returns `probs` (B, 2) = [P(fake), P(real)]; normalisation is inside. After
writing, the script compares its probabilities with PyTorch's on random images and fails
(exit 1) if any differs by more than --atol, removing the file so that nothing downstream
takes it for a finished export.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import math  # noqa: E402

from rvf.cli import EXPORT_ATOL, EXPORT_FORMATS, float_in, output_file  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder with model.safetensors + model.json")
    parser.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS))
    parser.add_argument("--output", type=output_file, default=None,
                        help="file to write (default: model.onnx / model.torchscript.pt in the checkpoint folder)")
    parser.add_argument("--atol", type=float_in(0, math.inf), default=EXPORT_ATOL,
                        help=f"largest allowed probability difference from PyTorch (default: {EXPORT_ATOL:g})")
    return parser


def main(args) -> int:
    from rvf.checkpoint import CheckpointError
    from rvf.export import ExportError, check_parity, export_checkpoint

    path = None
    try:
        path = export_checkpoint(args.checkpoint, args.format, args.output)
        diff = check_parity(path, args.format, args.checkpoint, atol=args.atol)
    except (CheckpointError, ExportError, ValueError) as e:
        removed = ""
        if path is not None and path.exists():  # written, then failed its check
            path.unlink()
            removed = f" (removed {path})"
        print(f"error: {e}{removed}", file=sys.stderr)
        return 1 if isinstance(e, ExportError) else 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB); max |p - p_torch| = {diff:.2e} (atol {args.atol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
