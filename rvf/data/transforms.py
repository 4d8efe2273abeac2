"""Every image that reaches a model goes through this file.

The pipeline has two halves, split where it is cheapest:

1. `load_image` decodes a file (or upload) once, converts any mode to RGB and resizes it to
   the run's square size, giving a uint8 tensor `(3, H, W)`. The decode cache, the per-file
   dataset, `predict.py` and the web app all call it, so pixels can never disagree.
2. `build_train_transform` / `build_eval_transform` return small `nn.Module`s that take a
   uint8 *batch* `(B, 3, H, W)` already on the training device and do augmentation and
   normalisation there. Moving uint8 instead of float32 is 4x less traffic, and augmenting a
   whole batch at once on the device costs almost nothing compared with PIL per sample.

Image size, mean, std and interpolation come from the model (`resolve_data_config`), the way
timm's `resolve_data_config` reads `model.pretrained_cfg`, never from constants here.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import BinaryIO, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

__all__ = [
    "BadImageError",
    "DataConfig",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "build_eval_transform",
    "build_train_transform",
    "load_image",
    "open_rgb",
    "resolve_data_config",
    "to_uint8",
    "ToUint8",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The formats those are, and the only ones decoded (Pillow's JPEG opener also reads cameras'
# MPO files). Pillow knows ~40 more; some shell out (EPS runs Ghostscript), none holds faces.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class BadImageError(ValueError):
    """An image that cannot be decoded: unreadable, truncated, empty or not an image."""


@dataclass(frozen=True)
class DataConfig:
    """What a model expects of its input; stored in every checkpoint's JSON."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
        )


def resolve_data_config(
    model: nn.Module | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> DataConfig:
    """Merge the model's declared input config with explicit overrides (which win).

    Args:
        model: any model from `rvf.models.create_model`; its `pretrained_cfg` gives defaults.
        image_size, mean, std, interpolation: overrides; None keeps the model's value.

    Returns:
        The resolved `DataConfig`.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {}) if model is not None else {}
    size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    interp = interpolation or cfg.get("interpolation") or "bilinear"
    if interp not in INTERPOLATIONS:  # what a timm model declares, e.g. "random"
        interp = "bilinear"
    return DataConfig(
        image_size=int(size),
        mean=tuple(float(v) for v in (mean or cfg.get("mean", (0.5, 0.5, 0.5)))),
        std=tuple(float(v) for v in (std or cfg.get("std", (0.5, 0.5, 0.5)))),
        interpolation=interp,
    )


def _name(src) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<upload>")


def open_rgb(src: str | os.PathLike | BinaryIO | bytes, max_pixels: int | None = None,
             min_side: int | None = None) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    Handles grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and 32-bit
    integer/float modes and EXIF orientation. Only `IMAGE_FORMATS` are decoded, and
    Pillow's decompression-bomb guard stays on.

    Args:
        src: a path, a binary file or bytes.
        max_pixels: refuse images with more pixels than this, from the header, before
            decoding them (a server's budget; Pillow's own limit is ~89 MP).
        min_side: refuse images narrower or shorter than this, from the header.

    Raises:
        BadImageError: naming the file, when it is empty, truncated, not an image in one
            of `IMAGE_FORMATS`, larger than `max_pixels` or smaller than `min_side`.
    """
    name = _name(src)
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    try:
        with Image.open(src, formats=IMAGE_FORMATS) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise BadImageError(f"{name}: {img.width}x{img.height} px is more than the "
                                    f"{max_pixels / 1e6:g} megapixels this server decodes")
            if min_side and min(img.width, img.height) < min_side:
                raise BadImageError(f"{name}: {img.width}x{img.height} px is too small to judge "
                                    f"(at least {min_side} px a side)")
            img.load()  # force the full decode now: truncation only shows up here
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # a tag of the wrong type: TypeError, struct.error...
                pass  # broken EXIF, sound pixels: keep the face as stored rather than lose it
            return _to_rgb(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{name}: image is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise BadImageError(f"{name}: not a readable image (empty, or not JPEG, PNG, WebP, GIF, BMP or TIFF)") from e
    except (MemoryError, Warning):  # a warning made an error by the caller's filter is the caller's to word
        raise
    except Exception as e:  # truncated, corrupt data, bad header
        # Beyond OSError/SyntaxError/ValueError, Pillow's decoders let struct.error, TypeError and
        # OverflowError out of damaged files (found by fuzzing); each is this file's fault, not ours.
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # Pillow's convert("RGB") clips these to 0..255 instead of scaling: scale ourselves,
        # in integers (round(v * 255 / 65535)), 4 bytes a pixel instead of float64's 8 and more.
        arr = (np.asarray(img, dtype=np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):  # 32-bit integer or float: stretch min..max to 0..255
        arr = np.asarray(img, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        # Nodata pixels (NaN, inf) at the ends of the range: one of them made min or max
        # non-finite, and the whole picture black.
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        arr = np.clip((arr - lo) * (255.0 / max(hi - lo, 1e-12)) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")  # palettes may carry transparency
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def to_uint8(img: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Centre-crop an RGB image to a square, resize it to `size` and return uint8 (3, H, W).

    rvf10k's images are square, where the crop is a no-op; for other uploads it keeps the
    face's aspect ratio instead of squashing it.
    """
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), INTERPOLATIONS[interpolation])
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_image(src, size: int, interpolation: str = "bilinear", max_pixels: int | None = None) -> torch.Tensor:
    """Decode an image (path, binary file or bytes) and return it as uint8 (3, size, size).

    Raises:
        BadImageError: naming the file, when it cannot be decoded (see `open_rgb`).
    """
    return to_uint8(open_rgb(src, max_pixels), size, interpolation)


class ToUint8:
    """Picklable `to_uint8` for a per-file dataset's `transform` (DataLoader workers)."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_uint8(img, self.size, self.interpolation)


class Normalize(nn.Module):
    """uint8 (B, 3, H, W) -> float32 normalised with the model's mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # Fold /255 into the affine map: one multiply-add per pixel.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return x.float() * self.scale + self.shift  # (B, 3, H, W)


class TrainAugment(nn.Module):
    """Per-sample augmentation of a uint8 batch on its own device, then normalisation.

    Each image gets its own random draw (unlike `torchvision.transforms.v2` applied to a
    batch tensor, which would flip or crop the whole batch the same way).

    Args:
        mean, std: normalisation of the model.
        hflip: probability of a horizontal flip.
        crop: cut each image to a random `crop` x `crop` window first, copying pixels exactly
            (no resize): the model trains on native-resolution patches, each epoch on
            different ones, and is evaluated on the whole image (it must pool globally).
        scale: (min, max) area fraction of a random resized crop; (1, 1) disables it.
        ratio: (min, max) aspect ratio of that crop.
        translate: shift each image by up to this many pixels in x and y, filling the edge by
            reflection. Whole-pixel moves copy pixels exactly, unlike a resized crop, which
            resamples (blurs) the fine texture a fake detector reads.
        brightness, contrast: jitter strength; 0 disables it.
        erase: probability of timm's `RandomErasing` (one rectangle of per-pixel noise, on the
            normalised image).
        downscale: probability that an image is shrunk by a factor from `downscale_range` and
            blown back up (bilinear; antialiased on the way down, as PIL resizes): the
            low-resolution copy a detector meets after a re-upload. One factor per batch
            (`F.interpolate` takes one size), which images get it drawn per image.
        downscale_range: (min, max) factor of the side.
    """

    def __init__(self, mean, std, *, hflip=0.0, crop=None, scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3), translate=0,
                 brightness=0.0, contrast=0.0, erase=0.0, downscale=0.0, downscale_range=(0.25, 1.0)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.crop = int(crop) if crop else None
        self.hflip, self.scale, self.ratio = float(hflip), tuple(scale), tuple(ratio)
        self.translate = int(translate)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.erase = float(erase)
        self.downscale, self.downscale_range = float(downscale), tuple(downscale_range)
        if not 0.0 < self.downscale_range[0] <= self.downscale_range[1] <= 1.0:
            raise ValueError(f"downscale_range must be (min, max) with 0 < min <= max <= 1, got {downscale_range}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        if self.crop is not None:
            x = self._random_crop(x)  # on uint8: a quarter of the bytes to move
        x = x.float()  # (B, 3, H, W), 0..255
        if self.downscale > 0:
            x = self._random_downscale(x)  # first: the degradation happened before anything else
        if self.scale != (1.0, 1.0):
            x = self._random_resized_crop(x)
        if self.hflip > 0:
            flip = torch.rand(b, 1, 1, 1, device=dev) < self.hflip
            x = torch.where(flip, x.flip(-1), x)
        if self.translate > 0:
            x = self._random_translate(x)
        if self.brightness > 0 or self.contrast > 0:
            gain = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.brightness
            c = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.contrast
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * c + mean) * gain
            x = x.clamp(0, 255)
        x = x * self.normalize.scale + self.normalize.shift
        if self.erase > 0:
            from timm.data.random_erasing import RandomErasing

            # Per-sample, in place, noise drawn on x's own device.
            x = RandomErasing(self.erase, mode="pixel", device=x.device)(x)
        return x

    def _random_downscale(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # The factor comes from the host's generator: no device sync, and seeded like the rest.
        f = float(torch.empty(()).uniform_(*self.downscale_range))
        small = F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                              antialias=True, align_corners=False)
        up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        # The whole batch is resampled and the picked images kept: gathering only the picked
        # ones would need their count on the host, a device sync per step.
        pick = torch.rand(b, 1, 1, 1, device=x.device) < self.downscale
        return torch.where(pick, up, x)

    def _random_translate(self, x: torch.Tensor) -> torch.Tensor:
        # Reflect-pad by t, then cut each sample's window at its own integer offset in [0, 2t].
        b, _, h, w = x.shape
        t = self.translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")  # (B, 3, H + 2t, W + 2t)
        return _windows(padded, h, w, torch.randint(0, 2 * t + 1, (2, b, 1), device=x.device))

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        c = self.crop
        if c > min(h, w):
            raise ValueError(f"crop_size {c} is larger than the {h}x{w} images")
        offsets = torch.stack([torch.randint(0, h - c + 1, (b, 1), device=x.device),
                               torch.randint(0, w - c + 1, (b, 1), device=x.device)])
        return _windows(x, c, c, offsets)

    def _random_resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        # One affine grid per sample: crop area ~ U(scale), log-aspect ~ U(log ratio),
        # random centre inside the image, resampled back to the input size.
        b, dev = x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        log_r = torch.empty(b, device=dev).uniform_(*np.log(self.ratio))
        r = torch.exp(log_r)
        sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the image
        sh = torch.sqrt(area / r).clamp(max=1.0)
        tx = (torch.rand(b, device=dev) * 2 - 1) * (1 - sw)
        ty = (torch.rand(b, device=dev) * 2 - 1) * (1 - sh)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sw, tx
        theta[:, 1, 1], theta[:, 1, 2] = sh, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _windows(x: torch.Tensor, h: int, w: int, offsets: torch.Tensor) -> torch.Tensor:
    """Each sample's own (h, w) window of x (B, C, H, W), its top-left corner at offsets (2, B, 1)."""
    dev = x.device
    dy, dx = offsets
    rows = (dy + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, h, 1)
    cols = (dx + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, w)
    batch = torch.arange(x.shape[0], device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return x[batch, chans, rows, cols]  # (B, C, h, w)


def build_train_transform(data_cfg: DataConfig, *, hflip: float = 0.0, crop_size: int | None = None,
                          scale=(1.0, 1.0), translate: int = 0, brightness: float = 0.0, contrast: float = 0.0,
                          erase: float = 0.0, downscale: float = 0.0, downscale_range=(0.25, 1.0)) -> nn.Module:
    """Return the on-device training transform: uint8 batch -> augmented, normalised float."""
    if not any([hflip, crop_size, tuple(scale) != (1.0, 1.0), translate, brightness, contrast, erase, downscale]):
        return Normalize(data_cfg.mean, data_cfg.std)
    return TrainAugment(data_cfg.mean, data_cfg.std, hflip=hflip, crop=crop_size, scale=scale, translate=translate,
                        brightness=brightness, contrast=contrast, erase=erase, downscale=downscale,
                        downscale_range=downscale_range)


def build_eval_transform(data_cfg: DataConfig) -> nn.Module:
    """Return the evaluation transform: uint8 batch -> normalised float, no randomness."""
    return Normalize(data_cfg.mean, data_cfg.std)
