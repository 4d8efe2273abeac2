"""Download rvf10k from Kaggle (kagglehub) and print the root to pass as --data-dir.

    python scripts/download_data.py [--dest DIR] [--force]

Public datasets need no credentials with recent kagglehub; if Kaggle asks for them, set
KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json in ~/.kaggle. Without network it fails
at once and says how to download by hand.

Exit status, as train.py's: 1 when the download fails (network, credentials), 2 when the copy
at --dest is not a readable rvf10k.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, help="folder to download into (default: kagglehub's cache)")
    parser.add_argument("--force", action="store_true", help="download again even if a copy exists")
    return parser


def main(args) -> int:
    from rvf.data import RVF10K, DatasetError
    from rvf.data.download import DownloadError, download_rvf10k

    try:
        root = download_rvf10k(args.dest, force=args.force)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        train, valid = RVF10K(root, "train"), RVF10K(root, "valid")
    except DatasetError as e:  # e.g. a half-extracted earlier download at --dest
        print(f"error: {e}\n(pass --force to download it again)", file=sys.stderr)
        return 2
    print(f"rvf10k is in {root} ({len(train)} train, {len(valid)} valid images)", file=sys.stderr)
    print(root)  # stdout: just the root, for DATA=$(python scripts/download_data.py)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
