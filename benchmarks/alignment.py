r"""How tightly are the faces aligned, real against fake? A probe of where-the-face-sits as evidence.

    python benchmarks/alignment.py --data-dir ROOT [--split train] [--image-size 128] [--max-shift 6]

FFHQ's real faces and StyleGAN's fakes are both aligned on the eyes, so a face's position is
not obviously evidence. This measures it: every face is matched with the split's mean face over
the eye band (rows 3/8 to 9/16 and the middle half of the columns of the aligned face), and the
whole-pixel shift of up to --max-shift pixels with the highest normalised cross-correlation is
that face's offset. It prints, per class, the std of the row and column offsets, the share of
faces more than 2 px off and the mean best correlation, then the ROC AUC with which the offset's
length alone picks the real faces. On rvf10k's train split at 128 px the fakes sit tighter; see
docs/experiments.md ("Where the face sits", session 22).

Images come from rvf's decoded cache (rvf.data.build_cache), so a run after training at the
same size decodes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rvf.framing import EYE_BAND, face_offsets, grey  # noqa: E402

__all__ = ["EYE_BAND", "face_offsets", "grey", "get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="rvf10k root (Kaggle layout) or an ImageFolder-style folder")
    p.add_argument("--split", default="train", help="split to measure (default: train)")
    p.add_argument("--image-size", type=int, default=128, help="side the faces are resized to (default: 128)")
    p.add_argument("--max-shift", type=int, default=6, help="largest shift tried, pixels each way (default: 6)")
    return p


def main(args: argparse.Namespace) -> dict:
    from sklearn.metrics import roc_auc_score

    from rvf.data import RVF10K, build_cache

    ds = RVF10K(args.data_dir, args.split)
    images = build_cache(ds.samples, args.image_size, name=args.split)
    labels = np.asarray(ds.targets)
    faces = grey(images.images)  # (N, S, S)
    offsets, corr = face_offsets(faces, faces.mean(0), max_shift=args.max_shift)
    length = offsets.float().norm(dim=1).numpy()
    result = {}
    print(f"{args.split}, {len(labels)} faces at {args.image_size} px, shifts up to {args.max_shift} px")
    for label, name in enumerate(ds.classes):
        mine = labels == label
        row_std, col_std = offsets[mine].float().std(dim=0).tolist()
        result[name] = dict(row_std=row_std, col_std=col_std, over_2px=float((length[mine] > 2).mean()),
                            corr=float(corr[mine].mean()))
        print(f"{name:>5}: offset std {row_std:.2f} px (rows) / {col_std:.2f} px (columns), "
              f"{100 * result[name]['over_2px']:.1f} % more than 2 px off, mean correlation {result[name]['corr']:.3f}")
    result["auc"] = float(roc_auc_score(labels == 1, length))
    print(f"ROC AUC of the offset's length for 'real': {result['auc']:.4f}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
