"""Give a trained run a framing check: where its training faces sit, so the app can warn about others.

    python scripts/framing.py --checkpoint runs/X --data-dir ROOT [--split train] [--quantile 0.01]

Training writes framing.safetensors itself (from the faces it fitted on, holdout slice left
out); this adds one to a run trained before it did, or refits one from the whole split,
holdout slice included. It measures the faces at the checkpoint's own size and filter (read
from rvf's decoded cache, so a split cached by training decodes nothing), then writes
CHECKPOINT/framing.safetensors and prints the limits. From then on the web app,
scripts/predict.py and scripts/robustness.py report, for each face, whether it sits
where the training faces sat (see rvf/framing.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import float_in, stdout_reader_may_leave  # noqa: E402

# --quantile: the share of training faces each limit may leave out.
quantile = float_in(0.0, 0.5, include_low=False)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a training run's folder")
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="the dataset it was trained on (rvf10k's Kaggle layout or an ImageFolder-style folder)")
    parser.add_argument("--split", default="train", help="the faces to measure (default: train)")
    parser.add_argument("--quantile", type=quantile, default=0.01,
                        help="share of those faces each limit may leave out (default: 0.01, i.e. 99 %% are 'ok')")
    parser.add_argument("--overwrite", action="store_true", help="replace the run's framing check if it has one")
    return parser


def main(args) -> int:
    from rvf.checkpoint import CheckpointError, read_meta
    from rvf.data import RVF10K, BadImageError, DataConfig, DatasetError, build_cache
    from rvf.framing import FILE_NAME, FramingReference, dataset_images

    try:
        meta = read_meta(args.checkpoint, allow_pickle=True)
        if (args.checkpoint / FILE_NAME).exists() and not args.overwrite:
            print(f"error: {args.checkpoint / FILE_NAME} exists; pass --overwrite to refit it", file=sys.stderr)
            return 2
        data_cfg = DataConfig.from_dict(meta["data_config"])
        ds = RVF10K(args.data_dir, args.split)
        faces = build_cache(ds.samples, data_cfg.image_size, interpolation=data_cfg.interpolation, name=args.split)
        ref = FramingReference.fit(dataset_images(faces), quantile=args.quantile)
        path = ref.save(args.checkpoint)
    except (CheckpointError, DatasetError, BadImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1
    share = f"{100 * (1 - ref.quantile):g} %"
    print(f"{path}: {ref.n} faces of {args.data_dir}/{args.split} at {ref.size} px; {share} sit within "
          f"{ref.max_offset:.2f} px ({100 * ref.max_offset / ref.size:.1f} % of the side) of the mean face's eyes "
          f"and match it with correlation >= {ref.min_correlation:.3f}")
    return 0


if __name__ == "__main__":
    with stdout_reader_may_leave():  # `| head`
        sys.exit(main(get_args_parser().parse_args()))
