"""Tiny synthetic real-vs-fake datasets that tests write into tmp_path.

Fakes are noisy and reddish, reals smooth and bluish, so a small model can learn them in
an epoch or two: enough to see a pipeline learning without any real face on disk.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rvf10k-mini"


def face(label: int, size: int = 32, seed: int = 0) -> Image.Image:
    """One synthetic image: label 0 = fake (noisy, red), 1 = real (smooth, blue)."""
    rng = np.random.default_rng(seed * 2 + label)
    base = np.array([170, 90, 80] if label == 0 else [80, 100, 170], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = base + 40 * np.stack([xx, yy, xx * yy], -1)
    img += rng.normal(0, 45 if label == 0 else 5, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_folder_dataset(root: Path, n: int = 8, size: int = 32, splits=("train", "valid"), ext: str = "jpg") -> Path:
    """Write ROOT/{split}/{fake,real}/*.ext with `n` images per class and split."""
    for s, split in enumerate(splits):
        for label, cls in enumerate(("fake", "real")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                face(label, size, seed=1000 * s + i).save(d / f"{i:05d}.{ext}")
    return root


def make_kaggle_dataset(root: Path, n: int = 8, size: int = 32) -> Path:
    """Write Kaggle's layout: ROOT/{train,valid}.csv and ROOT/rvf10k/{split}/{real,fake}/*.jpg."""
    make_folder_dataset(root / "rvf10k", n, size)
    for split in ("train", "valid"):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "original_path", "id", "label", "label_str", "path"])
            k = 0
            for label, cls in ((1, "real"), (0, "fake")):
                for p in sorted((root / "rvf10k" / split / cls).glob("*.jpg")):
                    w.writerow([k, f"/kaggle/input/x/{p.stem}.png", p.stem, label, cls, f"{split}/{cls}/{p.name}"])
                    k += 1
    return root


def blurry_face(seed: int = 0, size: int = 64):
    """A random blurry grey 'face' (float (S, S), 20..220): structure everywhere, so every shift differs."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size // 8, size // 8, generator=g)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1) * 200 + 20


def aligned_faces(n: int, size: int = 64, jitter: int = 1, seed: int = 0):
    """uint8 (n, 3, S, S): one face moved by up to `jitter` px each way and lightly noised, as aligned faces are.

    What rvf.framing's tests fit a framing reference on; `torch.roll` of one by a few pixels is a reframed face.
    """
    import torch

    rng = np.random.default_rng(seed)
    base = blurry_face(size=size)
    out = []
    for _ in range(n):
        dy, dx = rng.integers(-jitter, jitter + 1, 2).tolist()
        f = torch.roll(base, (dy, dx), dims=(0, 1)) + torch.from_numpy(rng.normal(0, 4, (size, size))).float()
        out.append(f.clamp(0, 255).to(torch.uint8).expand(3, size, size))
    return torch.stack(out)


def png_bytes(image) -> bytes:
    """uint8 (3, H, W) tensor -> PNG bytes."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()
