"""Classify face images as real or fake with a trained checkpoint.

Usage:
    python scripts/predict.py --checkpoint runs/lenet photo.jpg faces/ --output preds.csv
    python scripts/predict.py --checkpoint runs/lenet faces/ --gradcam-dir cams/ --device cuda

Folders are searched recursively for image files (.jpg .jpeg .png .bmp .gif .webp .tif
.tiff); files named explicitly are tried whatever their extension. The CSV (to --output, or
stdout) has one row per predicted image: path, label ("fake"/"real" at the checkpoint's
calibrated threshold), p_fake, p_real, with --gradcam-dir the overlay's file name, and, when
the run has a framing check (framing.safetensors), `framing`: "ok", or "off" and why: the
face does not sit where the training faces sat (FFHQ's alignment), so its verdict means
little. Each file that cannot be read gets one line on stderr and no row; the others are
still predicted.

Exit status: 0 when at least one image was predicted (even if others were bad), 1 when none
was (no images found, or every one unreadable), 2 for a bad checkpoint, path or option; a
reader that stops early (`| head`) changes neither.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import csv  # noqa: E402

from rvf.cli import ALLOW_PICKLE_HELP, make_folders, output_dir, output_file, positive_int, stdout_reader_may_leave  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (model.safetensors + model.json) or an ensemble folder "
                             "(ensemble.json, written by scripts/ensemble.py --output-dir)")
    parser.add_argument("--output", type=output_file, default=None, help="CSV file to write (default: stdout)")
    parser.add_argument("--gradcam-dir", type=output_dir, default=None,
                        help="also write a Grad-CAM overlay PNG per image here (the CSV's gradcam column names it)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help=ALLOW_PICKLE_HELP)
    return parser


def main(args) -> int:
    from tqdm import tqdm

    from rvf.checkpoint import CheckpointError
    from rvf.inference import find_images, load_predictor, refuse_decompression_bombs
    from rvf.utils import atomic_path

    try:
        files = find_images(args.paths)
        predictor = load_predictor(args.checkpoint, device=args.device, allow_pickle=args.allow_pickle)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no image files found in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    refuse_decompression_bombs()  # these files may come from anywhere, like uploads

    gradcam_dir = args.gradcam_dir
    if error := make_folders(gradcam_dir, args.output.parent if args.output else None):
        print(error, file=sys.stderr)
        return 2
    # A bar for runs longer than one batch, on a terminal only (None: tqdm checks for a TTY).
    # Predicted a few batches at a time, each overlay written as it comes: holding a folder's
    # PNGs until the end made 3,000 faces with --gradcam-dir peak at 1,403 MB, now 1,158 (400: 1,047).
    chunk = 8 * args.batch_size  # whole batches, so every image is scored in the batch it always was
    rows, used_names, n_results = [], set(), 0
    with tqdm(total=len(files), unit="img", disable=True if len(files) <= args.batch_size else None,
              file=sys.stderr) as bar:
        for start in range(0, len(files), chunk):
            results = predictor.predict_sources([str(f) for f in files[start:start + chunk]],
                                                batch_size=args.batch_size, gradcam=gradcam_dir is not None,
                                                progress=bar.update)
            n_results += len(results)
            for r in results:
                if not r.ok:
                    tqdm.write(f"skipped: {r.error}", file=sys.stderr)  # above the bar, not through it
                    continue
                rows.append({"path": r.name, "label": r.label, "p_fake": f"{r.p_fake:.6f}",
                             "p_real": f"{r.p_real:.6f}"})
                if r.framing is not None:
                    rows[-1]["framing"] = "ok" if r.framing["ok"] else f"off: {r.framing['note']}"
                if r.gradcam_png is not None:
                    rows[-1]["gradcam"] = _unique_name(Path(r.name).stem, used_names)
                    (gradcam_dir / rows[-1]["gradcam"]).write_bytes(r.gradcam_png)

    if rows:
        fields = (["path", "label", "p_fake", "p_real"] + (["gradcam"] if gradcam_dir is not None else [])
                  + (["framing"] if predictor.describe()["framing_check"] else []))
        if args.output:
            with atomic_path(args.output) as tmp, open(tmp, "w", newline="") as f:
                _write_csv(f, fields, rows)
        else:
            with stdout_reader_may_leave():  # `| head`: it read what it wanted; the summary below still comes
                _write_csv(sys.stdout, fields, rows)
    n_bad = n_results - len(rows)
    n_fake = sum(row["label"] == "fake" for row in rows)
    n_off = sum(row.get("framing", "ok") != "ok" for row in rows)
    print(f"predicted {len(rows)} of {n_results} images ({n_fake} fake, {len(rows) - n_fake} real)"
          + (f"; {n_bad} could not be read" if n_bad else "")
          + (f"; {n_off} framed unlike the training faces (see the framing column)" if n_off else "")
          + (f"; wrote {args.output}" if args.output and rows else ""), file=sys.stderr)
    return 0 if rows else 1


def _write_csv(f, fields, rows) -> None:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def _unique_name(stem: str, used: set) -> str:
    """Return `<stem>.gradcam.png`, numbered if two inputs share a stem."""
    name, n = f"{stem}.gradcam.png", 1
    while name in used:
        name, n = f"{stem}.{n}.gradcam.png", n + 1
    used.add(name)
    return name


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
