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
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The eye band of a face aligned as FFHQ aligns it, as fractions of the image: (top, bottom, left, right).
EYE_BAND = (3 / 8, 9 / 16, 1 / 4, 3 / 4)


def grey(images, batch_size: int = 1024) -> torch.Tensor:
    """uint8 `(N, 3, H, W)` (a memory map is fine) -> float32 `(N, H, W)`, the mean of the channels."""
    return torch.cat([torch.as_tensor(np.array(images[i:i + batch_size])).float().mean(1)
                      for i in range(0, len(images), batch_size)])


def face_offsets(faces: torch.Tensor, template: torch.Tensor, band: tuple[float, float, float, float] = EYE_BAND,
                 max_shift: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each face's shift against `template` over `band`, by normalised cross-correlation.

    Args:
        faces: `(N, H, W)` grey faces.
        template: `(H, W)`, e.g. the mean face.
        band: the compared window as fractions of H and W: (top, bottom, left, right).
        max_shift: largest shift tried, in pixels, each way along each axis.

    Returns:
        offsets `(N, 2)` (rows, columns: where the face's band lies against the template's,
        + = down / right) and the best correlation `(N,)`, 1.0 for a perfect match.
    """
    n, h, w = faces.shape
    r0, r1, c0, c1 = round(band[0] * h), round(band[1] * h), round(band[2] * w), round(band[3] * w)
    if r0 < max_shift or c0 < max_shift or r1 + max_shift > h or c1 + max_shift > w:
        raise ValueError(f"max_shift {max_shift} takes the band {(r0, r1, c0, c1)} outside a {h}x{w} image")
    t = template[r0:r1, c0:c1]
    t = (t - t.mean()) / t.std(unbiased=False)  # zero mean, so a window's mean cancels in the dot product
    window = faces[:, None, r0 - max_shift:r1 + max_shift, c0 - max_shift:c1 + max_shift]  # (N, 1, bh + 2S, bw + 2S)
    size = t.shape
    dot = F.conv2d(window, t[None, None]) / t.numel()  # (N, 1, 2S + 1, 2S + 1): mean((P - mean P) * T)
    mean = F.avg_pool2d(window, size, stride=1)
    std = (F.avg_pool2d(window * window, size, stride=1) - mean * mean).clamp_min(1e-6).sqrt()
    ncc = (dot / std).flatten(1)  # (N, (2S + 1)^2)
    best, idx = ncc.max(dim=1)
    side = 2 * max_shift + 1
    offsets = torch.stack([idx // side, idx % side], dim=1) - max_shift
    return offsets, best


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
