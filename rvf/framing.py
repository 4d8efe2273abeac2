"""Is a face framed as the training faces were? The check the app and the CLI run beside each verdict.

rvf10k's faces are aligned on the eyes (FFHQ's alignment), and the detectors read where a face's
features sit as well as what they look like: moving a face by 4 of its 256 pixels takes the ones
measured near chance (docs/experiments.md, session 22). A verdict on a photo framed some other
way (a phone picture, a loose crop, a face turned upside down) says little, so each run also
keeps a `FramingReference`, written beside the weights as `framing.safetensors`:

- the training faces' mean grey face, at min(input size, 128) px;
- how far (whole pixels) and how well (normalised cross-correlation) each of up to 4,000
  training faces matches that mean over the eye band (`face_offsets`);
- the limits that 99 % of those faces stay within: an offset length and a correlation floor.

`FramingReference.check` places a new face the same way and calls it "off" when its eyes sit
further from the mean face's than 99 % of training faces' do, or match it worse. About 2 % of
faces framed as the training faces were are called off by construction; that is the price of a
warning that fires on reframed ones. The check warns; it never changes a verdict.

Usage:
    ref = FramingReference.fit(train_images)            # uint8 (N, 3, H, W), e.g. a memory map
    ref.save(run_dir); ref = FramingReference.load(run_dir)  # None when the run has none
    checks = ref.check(batch)                           # uint8 (B, 3, S, S): one `Framing` each
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EYE_BAND", "FILE_NAME", "Framing", "FramingReference", "dataset_images", "face_offsets", "grey"]

FILE_NAME = "framing.safetensors"
# The eye band of a face aligned as FFHQ aligns it, as fractions of the image: (top, bottom, left, right).
EYE_BAND = (3 / 8, 9 / 16, 1 / 4, 3 / 4)
# The check runs at most this large: 2 native pixels of a 256 px face per step, and cheap.
MAX_SIZE = 128
# Offsets are searched up to this fraction of the side each way (10 px at 128 px): far enough
# that the training faces' 99th percentile lies inside the search, not on its edge.
MAX_SHIFT_FRACTION = 10 / 128
# What framing.safetensors keeps beside the template, as JSON strings in its metadata.
_LIMITS = ("max_shift", "max_offset", "min_correlation", "quantile", "n")


def grey(images, size: int | None = None, batch_size: int = 512) -> torch.Tensor:
    """uint8 `(N, 3, H, W)` (a tensor, an array or a memory map) -> float32 `(N, s, s)` grey faces.

    Grey is the mean of the channels; with `size`, the faces are resized to it (antialiased, as
    Pillow's resize is), so a 256 px model's faces and a 64 px model's are compared alike.
    """
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if chunk is None:  # every file of it unreadable (a per-file dataset with skip_bad)
            continue
        g = _tensor(chunk).float().mean(1, keepdim=True)  # (B, 1, H, W)
        if size is not None and g.shape[-1] != size:
            g = F.interpolate(g, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(g[:, 0])
    return torch.cat(out) if out else torch.empty(0, size or 0, size or 0)


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
    t = template[r0:r1, c0:c1].double()
    t = (t - t.mean()) / t.std(unbiased=False).clamp_min(1e-6)  # zero mean: a window's mean cancels in the dot
    window = faces[:, r0 - max_shift:r1 + max_shift, c0 - max_shift:c1 + max_shift].double()  # (N, bh + 2S, bw + 2S)
    # NCC ignores a constant added to a face: centring keeps the sums below small, so float64 is exact enough.
    window = window - window.mean(dim=(1, 2), keepdim=True)
    dot = _correlate(window, t) / t.numel()  # (N, 2S + 1, 2S + 1): mean((P - mean P) * T) per shift
    mean = _box_mean(window, *t.shape)
    std = (_box_mean(window * window, *t.shape) - mean * mean).clamp_min(1e-6).sqrt()
    ncc = (dot / std).flatten(1).float()  # (N, (2S + 1)^2)
    best, idx = ncc.max(dim=1)
    side = 2 * max_shift + 1
    offsets = torch.stack([idx // side, idx % side], dim=1) - max_shift
    return offsets, best


def _correlate(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum(x[i + a, j + b] * t[a, b]) for every placement of `t` inside `x` (..., H, W), by FFT.

    For a kernel this large (24x64 at 128 px) torch's CPU conv2d and avg_pool2d are slow: a batch
    of 32 faces took 60.5 ms with them and 2.6 ms with this and `_box_mean` (one thread, 2-core
    EPYC). The product wraps around, but only at the placements that leave `x`, which are cut off.
    """
    (H, W), (h, w) = x.shape[-2:], t.shape
    spectrum = torch.fft.rfft2(x, s=(H, W)) * torch.fft.rfft2(t, s=(H, W)).conj()
    return torch.fft.irfft2(spectrum, s=(H, W))[..., :H - h + 1, :W - w + 1]


def _box_mean(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The mean of every h x w window of `x` (..., H, W), from an integral image."""
    c = F.pad(x, (1, 0, 1, 0)).cumsum(-1).cumsum(-2)
    return (c[..., h:, w:] - c[..., :-h, w:] - c[..., h:, :-w] + c[..., :-h, :-w]) / (h * w)


@dataclass
class Framing:
    """Where one face sits against the training faces, and whether that is usual.

    `offset` is (down, right) in hundredths of the picture's side: (0, 0) is where the training
    faces' eyes sit on average, and 1.56 is 4 pixels of a 256 px face.
    """

    ok: bool
    offset: tuple[float, float]
    correlation: float
    note: str | None = None  # why the face is "off", in words for the page and the CLI

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class FramingReference:
    """The training faces' mean face and the limits their framing stays within.

    Attributes:
        template: the mean grey face, `(s, s)` float32.
        max_shift: the largest offset searched, pixels at size s, each way.
        max_offset: the offset length (pixels at size s) that `1 - quantile` of training faces stay within.
        min_correlation: the eye-band correlation that `1 - quantile` of training faces reach.
        quantile: the share of training faces allowed past each limit.
        n: how many training faces the limits were measured on.
    """

    template: torch.Tensor
    max_shift: int
    max_offset: float
    min_correlation: float
    quantile: float
    n: int

    @property
    def size(self) -> int:
        return int(self.template.shape[-1])

    @classmethod
    def fit(cls, images, quantile: float = 0.01, size: int | None = None, max_images: int = 4000,
            seed: int = 0) -> "FramingReference":
        """Measure the framing of training faces.

        Args:
            images: N square uint8 `(3, H, W)` faces: a tensor, an array, a memory map, or
                `dataset_images(ds)` for a dataset of (image, label) pairs.
            quantile: the share of these faces each limit may leave out (0.01: 99 % are "ok").
            size: the side the check runs at (default: min(H, 128)).
            max_images: at most this many faces, drawn at random (seeded), are measured.
        """
        if not 0 < quantile < 0.5:
            raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
        n = len(images)
        if n < 2:
            raise ValueError(f"need at least 2 faces to fit a framing reference, got {n}")
        size = size or min(int(images[0].shape[-1]), MAX_SIZE)
        pick = np.arange(n)
        if n > max_images:
            pick = np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))
        faces = grey(_Rows(images, pick), size)  # (n, s, s)
        template = faces.mean(0)
        max_shift = max(1, round(MAX_SHIFT_FRACTION * size))
        offsets, corr = face_offsets(faces, template, max_shift=max_shift)
        length = offsets.float().norm(dim=1)
        return cls(template=template.contiguous(), max_shift=max_shift,
                   max_offset=float(torch.quantile(length, 1 - quantile)),
                   min_correlation=float(torch.quantile(corr, quantile)), quantile=quantile, n=len(faces))

    def check(self, images) -> list[Framing]:
        """Place each face of a uint8 `(B, 3, S, S)` batch against the training faces."""
        faces = grey(images, self.size)
        offsets, corr = face_offsets(faces, self.template, max_shift=self.max_shift)
        length = offsets.float().norm(dim=1)
        out = []
        for (dy, dx), c, n in zip(offsets.tolist(), corr.tolist(), length.tolist()):
            notes = []
            # At the search's edge the true offset is at least the one found: "or more". Whether the
            # face is off is still judged on that length, so the note can never say "7.8 % away
            # (99 % are within 10.5 %)" when the training faces themselves reach past the edge.
            at_edge = max(abs(dy), abs(dx)) >= self.max_shift
            if n > self.max_offset:
                far = f"{100 * n / self.size:.1f} %" + (" or more" if at_edge else "")
                within = 100 * self.max_offset / self.size
                notes.append(f"the eyes sit {far} of the picture's side away from where the training faces' do "
                             f"({100 * (1 - self.quantile):g} % of those are within {within:.1f} %)")
            if c < self.min_correlation:
                notes.append(f"the eye region matches the training faces' poorly (correlation {c:.2f}; "
                             f"{100 * (1 - self.quantile):g} % of those reach {self.min_correlation:.2f})")
            out.append(Framing(ok=not notes, offset=(round(100 * dy / self.size, 2), round(100 * dx / self.size, 2)),
                               correlation=round(c, 4),
                               note=("; ".join(notes) + ". The verdict holds for faces framed as the training "
                                     "faces were (FFHQ's alignment, the whole crop)") if notes else None))
        return out

    # --- files ---

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `framing.safetensors` (the template, the limits in its metadata) into `directory`."""
        from safetensors.torch import save_file

        from rvf.utils import atomic_path

        path = Path(directory) / FILE_NAME
        meta = {k: json.dumps(getattr(self, k)) for k in _LIMITS}
        with atomic_path(path) as tmp:  # a unique temp name: two saves never write one file
            save_file({"template": self.template.float().contiguous()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FramingReference | None":
        """Read `directory/framing.safetensors`; None when the run has none (trained before the check existed).

        Raises:
            ValueError: naming the file, when it exists but cannot be read.
        """
        from safetensors import safe_open

        path = Path(directory) / FILE_NAME
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                template = f.get_tensor("template")
            fields = {k: json.loads(meta[k]) for k in _LIMITS}
        except Exception as e:  # safetensors' own errors, a missing key, bad JSON
            raise ValueError(f"{path} is not a valid framing reference: {type(e).__name__}: {e}") from e
        if template.dim() != 2 or template.shape[0] != template.shape[1]:
            raise ValueError(f"{path}: template must be a square (s, s) tensor, got {tuple(template.shape)}")
        return cls(template=template.float(), **fields)


def dataset_images(dataset) -> Sequence:
    """The images of a dataset of (uint8 image, label) pairs, as `FramingReference.fit` reads them."""
    if hasattr(dataset, "images") and hasattr(dataset, "indices"):  # a decoded cache: no per-item copy
        return _Rows(dataset.images, dataset.indices)
    return _Rows(_FirstOf(dataset), np.arange(len(dataset)))


class _FirstOf:
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, i: int):
        item = self.dataset[int(i)]
        return None if item is None else item[0]  # None: unreadable, under skip_bad


class _Rows:
    """Rows `pick` of an array-like, sliceable as `grey` slices: only the picked faces are read."""

    def __init__(self, images, pick: Sequence[int]):
        self.images, self.pick = images, np.asarray(pick)

    def __len__(self) -> int:
        return len(self.pick)

    def __getitem__(self, i):
        if isinstance(i, slice):  # unreadable files (None) left out; None when that is all of them
            rows = [r for r in (self.images[j] for j in self.pick[i]) if r is not None]
            return torch.stack([_tensor(r) for r in rows]) if rows else None
        return self.images[self.pick[i]]


def _tensor(x) -> torch.Tensor:
    """A tensor as it is; an array or memory map copied into one (a memory map is read-only)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))
