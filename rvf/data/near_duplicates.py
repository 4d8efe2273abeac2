"""Near-duplicate images across splits: is the evaluation set really unseen?

A held-out image that is a near-copy of a training image is scored as if it were new while the
model has, in effect, seen it. rvf10k has such pairs: StyleGAN faces from nearby latents, one
face with small changes of hair, expression or background; 38 of valid's 1,500 fakes have one
in train (scripts/near_duplicates.py).
This module finds them with the cheapest measure that does: each image becomes a small
thumbnail (area-averaged, so JPEG noise and fine texture cancel out), minus its own mean so that
a brightness shift does not matter, scaled to unit length; the cosine of two thumbnails is then
their correlation, 1.0 for a copy. At this scale (thousands of images) a brute-force matrix
product is exact and quick, so no index library is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Matches", "nearest_neighbours", "thumbnails"]


def thumbnails(images, size: int = 32, batch_size: int = 1024) -> torch.Tensor:
    """Unit-length, mean-centred thumbnails, `(N, 3 * size * size)` float32.

    Args:
        images: uint8 `(N, 3, H, W)`, a numpy array (e.g. a decoded cache's memory map) or a
            tensor; H and W of at least `size`.
        size: thumbnail side; 32 keeps a face's layout and drops its texture.
        batch_size: images converted at a time, to bound memory on large splits.
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.array(images[start:start + batch_size])).float()  # a copy: memmaps are read-only
        x = F.adaptive_avg_pool2d(x, size).flatten(1)
        out.append(F.normalize(x - x.mean(dim=1, keepdim=True), dim=1))
    return torch.cat(out) if out else torch.empty(0, 3 * size * size)


@dataclass
class Matches:
    """For each query image, its most similar reference image."""

    similarity: np.ndarray  # (Q,) cosine of the thumbnails, 1.0 for a copy
    index: np.ndarray  # (Q,) position of that image among the references

    def above(self, threshold: float) -> np.ndarray:
        """Query positions whose nearest reference is above `threshold`, most similar first."""
        hits = np.flatnonzero(self.similarity > threshold)
        return hits[np.argsort(-self.similarity[hits], kind="stable")]


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False,
                       chunk: int = 2048) -> Matches:
    """Nearest reference thumbnail (by cosine) of every query thumbnail.

    Args:
        query, reference: outputs of `thumbnails`.
        exclude_self: query and reference are the same images, so skip each one's own match.
        chunk: query rows per matrix product, to bound memory (chunk x len(reference) floats).
    """
    if len(reference) == 0:
        raise ValueError("no reference images to compare with")
    sims, idxs = [], []
    for start in range(0, len(query), chunk):
        s = query[start:start + chunk] @ reference.T
        if exclude_self:
            rows = torch.arange(len(s))
            s[rows, rows + start] = -2.0  # below any cosine
        best, idx = s.max(dim=1)
        sims.append(best)
        idxs.append(idx)
    if not sims:
        return Matches(np.empty(0, np.float32), np.empty(0, np.int64))
    return Matches(torch.cat(sims).numpy(), torch.cat(idxs).numpy())
