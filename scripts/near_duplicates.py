"""Find near-copies of training images in the holdout slice and the valid split.

    python scripts/near_duplicates.py --data-dir ROOT [--holdout 0.1 --split-seed 42] [--output-dir OUT]

A near-copy in an evaluation set is scored as if it were new while the model has, in effect,
seen it. Each holdout image (the slice of train that training selects epochs on, drawn exactly
as `train.py` draws it from --holdout and --split-seed) and each valid image is compared with
every image the model is fitted on, by the cosine of small mean-centred thumbnails (1.0 for a
copy; see rvf/data/near_duplicates.py). Prints, per comparison, the nearest neighbours'
similarity quantiles and the pairs above --threshold; with --output-dir, also writes
near_duplicates.json, near_duplicates.csv (every pair above the threshold, most similar
first) and near_duplicates.png (the top pairs side by side, query left).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import float_in, make_folders, non_negative_int, output_dir, positive_int, stdout_reader_may_leave  # noqa: E402

fraction = float_in(0.0, 1.0)  # --holdout, as the training config takes it
cosine = float_in(-1.0, 1.0, what="a cosine")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root (either layout)")
    parser.add_argument("--splits", nargs="+", default=["valid"], choices=["valid", "test"],
                        help="evaluation splits to check besides the holdout slice (default: valid)")
    parser.add_argument("--holdout", type=fraction, default=0.1,
                        help="the training config's holdout fraction (default: 0.1, as configs/); 0 skips the slice")
    parser.add_argument("--split-seed", type=int, default=42,
                        help="the seed that drew the slice: the config's split_seed, else its seed (default: 42)")
    parser.add_argument("--threshold", type=cosine, default=0.95,
                        help="thumbnail cosine above which a pair counts as a near-copy (default: 0.95; on "
                             "rvf10k the pairs above it are one face with small changes of hair, expression or "
                             "background, and below about 0.93 mostly two faces in a similar pose)")
    parser.add_argument("--thumbnail", type=positive_int, default=32, help="thumbnail side in px (default: 32)")
    parser.add_argument("--output-dir", type=output_dir, help="write JSON, CSV and the pairs' PNG here")
    parser.add_argument("--montage", type=non_negative_int, default=8,
                        help="pairs shown in near_duplicates.png (default: 8; 0: no PNG)")
    parser.add_argument("--cache-dir", type=output_dir,
                        help="decode cache folder (default $RVF_CACHE_DIR or ~/.cache/rvf)")
    parser.add_argument("--num-workers", type=non_negative_int, help="decoding processes (default: all cores)")
    return parser


def summarise(name, matches, query, reference, threshold):
    """One comparison's figures and its pairs above the threshold."""
    import numpy as np

    sim = matches.similarity
    hits = matches.above(threshold)
    q_labels = np.asarray([query[i][1] for i in range(len(query))])
    r_labels = np.asarray([reference[j][1] for j in matches.index])
    pairs = [dict(query=query[i][0], query_label=int(q_labels[i]), match=reference[matches.index[i]][0],
                  match_label=int(r_labels[i]), cosine=round(float(sim[i]), 5)) for i in hits]
    return dict(
        comparison=name, images=len(sim),
        quantiles={q: round(float(np.quantile(sim, float(q))), 4) for q in ("0.5", "0.9", "0.99", "1.0")},
        above_threshold=len(hits),
        above_threshold_same_label=int((q_labels[hits] == r_labels[hits]).sum()),
        above_threshold_by_label={"fake": int((q_labels[hits] == 0).sum()), "real": int((q_labels[hits] == 1).sum())},
    ), pairs


def write_montage(pairs, path: Path, side: int = 128) -> None:
    from PIL import Image

    from rvf.data import open_rgb

    sheet = Image.new("RGB", (2 * side, side * len(pairs)), "white")
    for row, p in enumerate(pairs):
        for col, key in enumerate(("query", "match")):
            sheet.paste(open_rgb(p[key]).resize((side, side), Image.BILINEAR), (col * side, row * side))
    sheet.save(path)


def main(args) -> int:
    from rvf.data import RVF10K, BadImageError, DatasetError, build_cache, holdout_split
    from rvf.data.near_duplicates import nearest_neighbours, thumbnails

    if error := make_folders(args.output_dir):  # before the decoding
        print(error, file=sys.stderr)
        return 2
    try:
        train = RVF10K(args.data_dir, "train")
        others = {split: RVF10K(args.data_dir, split) for split in args.splits}

        def decode(ds, name):
            # Thumbnails are area averages, so decoding at twice their side is all they need.
            return build_cache(ds.samples, 2 * args.thumbnail, cache_dir=args.cache_dir, name=name,
                               num_workers=args.num_workers)

        train_images = decode(train, "train")
        fit, held = holdout_split(train.targets, args.holdout, args.split_seed)
        thumbs = thumbnails(train_images.images, args.thumbnail)
        fit_samples = [train.samples[i] for i in fit]
        comparisons = []
        if len(held):
            held_samples = [train.samples[i] for i in held]
            comparisons.append((f"holdout ({len(held)} of train) -> fit", thumbs[held], held_samples))
        for split, ds in others.items():
            comparisons.append((f"{split} -> fit", thumbnails(decode(ds, split).images, args.thumbnail), ds.samples))
    except (DatasetError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the decode cache's: a full disk (reserved up front), a cache folder it cannot make
        print(f"error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        return 1

    results, all_pairs, lines = [], [], []
    for name, query, samples in comparisons:
        summary, pairs = summarise(name, nearest_neighbours(query, thumbs[fit]), samples, fit_samples, args.threshold)
        results.append(summary)
        all_pairs += [dict(comparison=name, **p) for p in pairs]
        q, by_label = summary["quantiles"], summary["above_threshold_by_label"]
        lines.append(f"{name}: nearest-neighbour cosine median {q['0.5']:.3f}, p99 {q['0.99']:.3f}, "
                     f"max {q['1.0']:.3f}; {summary['above_threshold']} of {summary['images']} above "
                     f"{args.threshold:g} ({by_label['fake']} fake, {by_label['real']} real; "
                     f"{summary['above_threshold_same_label']} match a training image of the same label)")

    if args.output_dir:
        out = args.output_dir
        meta = dict(data_dir=str(args.data_dir), holdout=args.holdout, split_seed=args.split_seed,
                    threshold=args.threshold, thumbnail=args.thumbnail, comparisons=results)
        (out / "near_duplicates.json").write_text(json.dumps(meta, indent=2) + "\n")
        all_pairs.sort(key=lambda p: -p["cosine"])
        with open(out / "near_duplicates.csv", "w", newline="") as f:
            fields = ["comparison", "cosine", "query", "query_label", "match", "match_label"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(all_pairs)
        if args.montage and all_pairs:
            write_montage(all_pairs[:args.montage], out / "near_duplicates.png")
        lines.append(f"wrote {len(all_pairs)} pairs to {out / 'near_duplicates.csv'}")
    # Printed once the files are written: a reader that leaves early (`| head -1`) stops the script.
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    with stdout_reader_may_leave():  # `| head`
        sys.exit(main(get_args_parser().parse_args()))
