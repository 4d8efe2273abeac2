"""Use a trained detector: one `Predictor` for the web app, `scripts/predict.py` and export checks.

Everything that turns an image into a verdict lives here, once:

- decoding and resizing with the training pipeline's own `load_image` and eval transform, at
  the checkpoint's size, mean, std and interpolation (so the app, the CLI and `evaluate` give
  a file the same probability);
- `p_fake = softmax(logits)[:, 0]` (logit 0 = fake, 1 = real) and the verdict at the
  checkpoint's calibrated threshold: "fake" iff `p_fake >= threshold`;
- Grad-CAM with `pytorch_grad_cam.GradCAM` on `rvf.models.get_cam_layer(model)`, for the
  class of the verdict, rendered as a PNG overlay;
- the run's framing check (`rvf.framing`), when it has one: whether the face sits where the
  training faces sat, a warning beside the verdict, never a change to it.

An `EnsemblePredictor` serves several of them as one (the mean P(fake) at the ensemble's own
calibrated threshold); `load_predictor` returns whichever a folder holds.

Usage:
    predictor = load_predictor("runs/lenet")  # or an ensemble folder from scripts/ensemble.py
    results = predictor.predict_sources(["a.jpg", "b.png"], gradcam=True)
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rvf.checkpoint import ENSEMBLE_MANIFEST, load_pretrained, meta_threshold
from rvf.data.transforms import IMAGE_EXTENSIONS, BadImageError, DataConfig, build_eval_transform, open_rgb, to_uint8
from rvf.framing import FramingReference
from rvf.models import get_cam_layer
from rvf.utils import predict_logits

__all__ = [
    "Detector",
    "EnsemblePredictor",
    "Prediction",
    "Predictor",
    "find_images",
    "load_predictor",
    "refuse_decompression_bombs",
    "resolve_device",
]

# Overlays are drawn at least this large: a 64 px LeNet input is too small to read on a page.
MIN_OVERLAY_SIZE = 256


def refuse_decompression_bombs() -> None:
    """Turn Pillow's `DecompressionBombWarning` into an error for this whole process.

    Pillow raises `DecompressionBombError` above 2 x `Image.MAX_IMAGE_PIXELS` (~179 MP) but only
    *warns* between 1x and 2x, then decodes hundreds of MB. A process that reads untrusted
    files (the web app, the predict CLI) calls this once at startup; `Predictor.load` then
    reports such files as bad images. Done once, not per request with `catch_warnings`,
    because warning filters are process-global and not thread-safe to swap.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map "auto" to cuda when available, else cpu; check that an explicit cuda exists."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's own message lists some 20 device types
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, by image extension) into a sorted, unique list.

    A file named explicitly is kept whatever its extension, so a mislabelled or bad file is
    reported rather than silently skipped. A path that does not exist raises FileNotFoundError.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return list(dict.fromkeys(found))  # keep order, drop duplicates


@dataclass
class Prediction:
    """The outcome for one image: a verdict, or the reason there is none.

    Exactly one of (`label`, `p_fake`, `p_real`) and `error` is set.
    """

    name: str
    threshold: float
    label: str | None = None  # "fake" or "real"
    p_fake: float | None = None
    p_real: float | None = None
    error: str | None = None
    gradcam_png: bytes | None = None  # PNG bytes of the overlay, when asked for
    framing: dict | None = None  # `rvf.framing.Framing.to_dict()`, when the model has a framing check

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """Return the JSON-able fields that are set (the PNG stays out: callers encode it)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "gradcam_png"}


class Detector:
    """What the web app and the CLI need from a detector: verdicts for a list of sources.

    Subclasses set `threshold` and implement `_predict_chunk`, `model_name` and `describe`.
    """

    threshold: float
    # Refuse images with more pixels than this before decoding them (None: Pillow's ~89 MP).
    # A server sets it: a 16-bit PNG of 88 MP is 170 KB to upload and GBs to decode.
    max_pixels: int | None = None
    # Refuse images smaller than this on either side (None: any size). A server sets it: a
    # 3x5 px upload stretched to the model's input would get a verdict that means nothing.
    min_side: int | None = None
    # The folder it was loaded from, by name only (a server's paths are its own): what tells two
    # runs of one architecture apart on the page and in /api/health.
    run: str | None = None

    def open(self, src, name: str | None = None) -> Image.Image:
        """Decode one image to full-size 8-bit RGB, as training's `load_image` does.

        Raises:
            BadImageError: empty, truncated, not an image, or too large to decode safely.
        """
        if name is None:
            name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<upload>")
        if isinstance(src, bytes):
            src = io.BytesIO(src)
        if isinstance(src, io.BytesIO) and not hasattr(src, "name"):
            src.name = name  # error messages name the file by this
        if _is_empty(src):
            raise BadImageError(f"{name}: empty file (0 bytes)")
        try:
            return open_rgb(src, max_pixels=self.max_pixels, min_side=self.min_side)
        except Image.DecompressionBombWarning as e:  # an error under `refuse_decompression_bombs`
            raise BadImageError(f"{name}: image is too large to decode safely ({e})") from e

    def _decode(self, chunk: list, views: set) -> list[dict | str]:
        """Decode each (source, name) once and resize it to every (size, interpolation) view.

        An ensemble's members and the Grad-CAM overlay each want their own size: one decode
        feeds them all. Returns, per source, {view: uint8 (3, S, S)} or the error message.
        """
        decoded = []
        for src, name in chunk:
            try:
                img = self.open(src, name)
                decoded.append({view: to_uint8(img, *view) for view in views})
            except BadImageError as e:
                decoded.append(str(e))
        return decoded

    def verdict(self, p_fake: float) -> str:
        """Return "fake" iff p_fake reaches the calibrated threshold, else "real"."""
        return "fake" if p_fake >= self.threshold else "real"

    def predict_sources(self, sources: Sequence, names: Sequence[str] | None = None, *,
                        batch_size: int = 32, gradcam: bool = False,
                        progress=None) -> list[Prediction]:
        """Predict paths, file objects or bytes; bad images become error entries, not exceptions.

        Args:
            sources: what `load_image` accepts, one per image.
            names: what to call each image in results; defaults to the path or "<upload>".
            batch_size: images per forward pass.
            gradcam: also render a Grad-CAM overlay PNG for each good image.
            progress: optional callable(n) told how many images each batch finished (tqdm.update).

        Returns:
            One `Prediction` per source, in order.
        """
        if names is None:
            names = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else "<upload>" for s in sources]
        if len(names) != len(sources):
            raise ValueError(f"got {len(names)} names for {len(sources)} sources")
        results: list[Prediction] = []
        for start in range(0, len(sources), batch_size):
            chunk = list(zip(sources[start:start + batch_size], names[start:start + batch_size]))
            results += self._predict_chunk(chunk, gradcam)
            if progress is not None:
                progress(len(chunk))
        return results

    def _predict_chunk(self, chunk: list, gradcam: bool) -> list[Prediction]:
        raise NotImplementedError

    def _score(self, out: list[Prediction], good: list[int], p_fake: Sequence[float]) -> None:
        """Attach each good image's P(fake) and verdict; a score that is not a number becomes that
        image's error (a NaN would read as "real" and is not valid JSON)."""
        for i, p in zip(good, p_fake, strict=True):
            if math.isfinite(p):
                out[i].p_fake, out[i].p_real, out[i].label = p, 1.0 - p, self.verdict(p)
            else:
                out[i].error = f"{out[i].name}: the model's score is {p} (its forward pass overflowed on this image)"


class Predictor(Detector):
    """A model loaded once with its preprocessing, threshold and Grad-CAM layer.

    Args:
        model: a model from `rvf.models.create_model`, weights loaded.
        meta: the checkpoint's `model.json` (see `rvf.checkpoint`).
        data_cfg: the input config the model was trained with.
        device: where to run it.
        framing: the run's framing reference (`framing.safetensors`), or None for no check.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, data_cfg: DataConfig, device="cpu",
                 framing: FramingReference | None = None):
        self.device = torch.device(device)
        self.framing = framing
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.data_cfg = data_cfg
        self.transform = build_eval_transform(data_cfg).to(self.device)
        self.classes = list(meta.get("classes", ["fake", "real"]))
        if self.classes[:2] != ["fake", "real"]:
            raise ValueError(f"expected classes ['fake', 'real'] (logit 0 = fake), got {self.classes}")
        self.tta_hflip = bool(meta.get("tta_hflip", False))  # scored as it was calibrated
        self.threshold = meta_threshold(meta)
        # Chosen once per model, never guessed per request.
        self.cam_layer = get_cam_layer(self.model)
        # timm's Swin, MambaOut...: their stages hand on (B, H, W, C), which Grad-CAM would read as (B, C, H, W).
        self._cam_channels_last = getattr(self.model, "output_fmt", None) == "NHWC"
        # One forward at a time: torch already spreads one pass over every core, and Grad-CAM's
        # hooks on the shared model would otherwise record another thread's activations.
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        allow_pickle: bool = False) -> "Predictor":
        """Load `model.safetensors` + `model.json` (raises `CheckpointError` naming the file).

        `allow_pickle` also accepts a `.pt`/`.pth`/... state dict, read with
        `torch.load(weights_only=True)` (see `rvf.checkpoint.load_pretrained`).
        """
        from rvf.checkpoint import CheckpointError

        device = resolve_device(device)
        model, meta, data_cfg = load_pretrained(directory, device, allow_pickle=allow_pickle)
        try:
            framing = FramingReference.load(directory)  # None for runs trained before the check
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        predictor = cls(model, meta, data_cfg, device, framing)
        predictor.run = Path(directory).resolve().name
        return predictor

    # --- facts for the UI and the health check ---

    @property
    def model_name(self) -> str:
        return str(self.meta["model_name"])

    @property
    def image_size(self) -> int:
        return self.data_cfg.image_size

    def describe(self) -> dict:
        """Model name, input size, threshold and the valid-set metrics recorded at training."""
        valid = (self.meta.get("metrics") or {}).get("valid") or {}
        return {
            "model": self.model_name,
            "run": self.run,
            "input_size": self.image_size,
            "threshold": self.threshold,
            "tta_hflip": self.tta_hflip,
            "epoch": self.meta.get("epoch"),
            "valid_accuracy": valid.get("accuracy"),
            "valid_accuracy_at_threshold": valid.get("accuracy_at_threshold"),  # what the verdicts score
            "valid_roc_auc": valid.get("roc_auc"),
            "framing_check": self.framing is not None,
        }

    # --- inference ---

    @property
    def view(self) -> tuple[int, str]:
        """The (size, interpolation) this model reads an image at."""
        return self.data_cfg.image_size, self.data_cfg.interpolation

    @property
    def overlay_view(self) -> tuple[int, str]:
        """The (size, interpolation) its Grad-CAM overlay is drawn at."""
        return max(self.data_cfg.image_size, MIN_OVERLAY_SIZE), self.data_cfg.interpolation

    def load(self, src, size: int | None = None) -> torch.Tensor:
        """Decode one image to a uint8 (3, S, S) tensor exactly as training did.

        Raises:
            BadImageError: empty, truncated, not an image, or too large to decode safely.
        """
        return to_uint8(self.open(src), size or self.data_cfg.image_size, self.data_cfg.interpolation)

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Return P(fake) for a uint8 batch (B, 3, S, S), as a float32 CPU tensor (B,)."""
        x = self.transform(images.to(self.device))  # (B, 3, S, S) float
        with self._lock:
            logits = predict_logits(self.model, x, hflip=self.tta_hflip)  # (B, 2)
        return logits.float().softmax(dim=1)[:, 0].cpu()  # (B,)

    def _predict_chunk(self, chunk: list, gradcam: bool) -> list[Prediction]:
        decoded = self._decode(chunk, {self.view, self.overlay_view} if gradcam else {self.view})
        out = [Prediction(name=name, threshold=self.threshold, error=d if isinstance(d, str) else None)
               for (_, name), d in zip(chunk, decoded)]
        good = [i for i, r in enumerate(out) if r.ok]
        if not good:
            return out
        batch = torch.stack([decoded[i][self.view] for i in good])  # (B, 3, S, S) uint8
        self._score(out, good, self.predict_batch(batch).tolist())
        self._check_framing(out, good, batch)
        if gradcam:
            targets = [self.classes.index(out[i].label) if out[i].ok else 0 for i in good]
            cams = self.gradcam(batch, targets)  # (B, S, S)
            for i, cam in zip(good, cams, strict=True):
                if out[i].ok:
                    out[i].gradcam_png = self.overlay_png(decoded[i][self.overlay_view], cam)
        return out

    def _check_framing(self, out: list[Prediction], good: list[int], batch: torch.Tensor) -> None:
        """Attach each good image's framing check (the model's own view of it) to its prediction."""
        if self.framing is not None:
            for i, f in zip(good, self.framing.check(batch), strict=True):
                if out[i].ok:
                    out[i].framing = f.to_dict()

    # --- Grad-CAM ---

    def gradcam(self, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
        """Grad-CAM heatmaps for a uint8 batch (B, 3, S, S).

        Args:
            images: the decoded batch, as from `load`.
            targets: class index per image to explain (0 = fake, 1 = real); None explains
                the verdict at the calibrated threshold.

        Returns:
            float32 array (B, S, S), each map scaled to [0, 1].
        """
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if targets is None:
            targets = [self.classes.index(self.verdict(p)) for p in self.predict_batch(images).tolist()]
        x = self.transform(images.to(self.device))  # (B, 3, S, S) float
        with self._lock, torch.enable_grad():
            cam = GradCAM(self.model, target_layers=[self.cam_layer],
                          reshape_transform=functools.partial(_to_grid, channels_last=self._cam_channels_last))
            try:
                maps = cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])  # (B, S, S)
            finally:
                # Not `with GradCAM(...)`: its __exit__ swallows IndexError with a print.
                cam.activations_and_grads.release()
                self.model.zero_grad(set_to_none=True)  # free the parameter grads backward made
        return np.nan_to_num(maps.astype(np.float32), nan=0.0)

    def overlay_png(self, image, cam: np.ndarray, alpha: float = 0.5) -> bytes:
        """Blend a [0, 1] heatmap (S, S) over the image, resized like the model saw it; PNG bytes.

        The overlay is drawn at `overlay_view`, max(model size, 256) px, so small-input models
        stay legible. `image` is that view's uint8 (3, H, W) tensor, or a source to decode.
        """
        from pytorch_grad_cam.utils.image import show_cam_on_image

        size, interpolation = self.overlay_view
        if not isinstance(image, torch.Tensor):
            image = to_uint8(self.open(image), size, interpolation)
        rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0  # (H, W, 3)
        heat = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]  # (1, 1, S, S)
        heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        overlay = show_cam_on_image(rgb, heat.clamp(0, 1).numpy(), use_rgb=True, image_weight=1 - alpha)
        buf = io.BytesIO()
        # Fast zlib: `optimize=True` spent 29 ms of an overlay's 32 compressing it, for files 9 % smaller.
        Image.fromarray(overlay).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


class EnsemblePredictor(Detector):
    """Several trained detectors served as one, as `scripts/ensemble.py` scored them.

    P(fake) is the mean of the members' P(fake), each member decoding the image at its own
    size and filter and with its own test-time flips; the verdict uses the ensemble's
    threshold, calibrated on the members' shared holdout slice. The heat map is the mean of
    the members' Grad-CAM maps (each scaled to [0, 1]) for the ensemble's verdict.

    Args:
        members: the loaded member predictors (two or more).
        threshold: the ensemble's calibrated P(fake) threshold.
        valid: the ensemble's valid-split figures from its manifest (accuracy, roc_auc).
    """

    def __init__(self, members: Sequence[Predictor], threshold: float, valid: dict | None = None):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = list(members)
        self.threshold = float(threshold)
        self.valid = dict(valid or {})
        # The overlay is drawn by the member that sees the most pixels; the framing check is the
        # largest member's that has one (the members were trained on the same faces).
        self._largest = max(self.members, key=lambda m: m.image_size)
        self._framed = max((m for m in self.members if m.framing is not None), key=lambda m: m.image_size,
                           default=None)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                       allow_pickle: bool = False) -> "EnsemblePredictor":
        """Load the members listed in `directory/ensemble.json` (see `rvf.ensemble`).

        Raises:
            CheckpointError: naming the manifest, or the member's file, at fault; also for a member
                whose weights changed after the ensemble was built.
        """
        from rvf.checkpoint import CheckpointError
        from rvf.ensemble import MANIFEST, check_member_weights, read_manifest

        manifest = read_manifest(directory)
        device = resolve_device(device)
        members = []
        for m in manifest["members"]:
            try:
                members.append(Predictor.from_checkpoint(m, device, allow_pickle))
            except CheckpointError as e:
                raise CheckpointError(f"{Path(directory) / MANIFEST} lists member {m}: {e}") from e
        # Hashed after loading: a file replaced in between fails the check instead of passing it.
        check_member_weights(directory, manifest)
        ensemble = cls(members, manifest["threshold"], manifest["valid"])
        ensemble.run = Path(directory).resolve().name
        return ensemble

    @property
    def model_name(self) -> str:
        return "ensemble(" + " + ".join(m.model_name for m in self.members) + ")"

    @property
    def image_size(self) -> int:
        return self._largest.image_size

    def describe(self) -> dict:
        """As `Predictor.describe`, for the ensemble, plus each member's own description."""
        return {
            "model": self.model_name,
            "run": self.run,
            "input_size": self.image_size,
            "threshold": self.threshold,
            "tta_hflip": any(m.tta_hflip for m in self.members),
            "epoch": None,
            "valid_accuracy": self.valid.get("accuracy"),
            "valid_accuracy_at_threshold": self.valid.get("accuracy_at_threshold"),
            "valid_roc_auc": self.valid.get("roc_auc"),
            "framing_check": self._framed is not None,
            "members": [m.describe() for m in self.members],
        }

    def _predict_chunk(self, chunk: list, gradcam: bool) -> list[Prediction]:
        views = {m.view for m in self.members} | ({self._largest.overlay_view} if gradcam else set())
        decoded = self._decode(chunk, views)
        out = [Prediction(name=name, threshold=self.threshold, error=d if isinstance(d, str) else None)
               for (_, name), d in zip(chunk, decoded)]
        good = [i for i, r in enumerate(out) if r.ok]
        if not good:
            return out
        batches = [torch.stack([decoded[i][m.view] for i in good]) for m in self.members]  # (B, 3, S_m, S_m) each
        p_fake = torch.stack([m.predict_batch(b) for m, b in zip(self.members, batches)]).mean(0)  # (B,)
        self._score(out, good, p_fake.tolist())
        if self._framed is not None:
            self._framed._check_framing(out, good, batches[self.members.index(self._framed)])
        if gradcam:
            targets = [self._largest.classes.index(out[i].label) if out[i].ok else 0 for i in good]
            size = self.image_size
            cams = torch.stack([
                F.interpolate(torch.from_numpy(m.gradcam(b, targets))[:, None], size=(size, size),
                              mode="bilinear", align_corners=False)[:, 0]
                for m, b in zip(self.members, batches)
            ]).mean(0)  # (B, S, S), the members' maps each in [0, 1]
            for i, cam in zip(good, cams.numpy(), strict=True):
                if out[i].ok:
                    out[i].gradcam_png = self._largest.overlay_png(decoded[i][self._largest.overlay_view], cam)
        return out


def load_predictor(directory: str | os.PathLike, device: str | torch.device = "cpu",
                   allow_pickle: bool = False) -> Predictor | EnsemblePredictor:
    """Load a run folder (`model.safetensors` + `model.json`) or an ensemble folder (`ensemble.json`)."""
    if (Path(directory) / ENSEMBLE_MANIFEST).is_file():
        return EnsemblePredictor.from_directory(directory, device, allow_pickle)
    return Predictor.from_checkpoint(directory, device, allow_pickle)


def _is_empty(src) -> bool:
    if isinstance(src, bytes):
        return not src
    if isinstance(src, io.BytesIO):
        return not src.getbuffer().nbytes
    if isinstance(src, (str, os.PathLike)):
        return os.path.isfile(src) and os.path.getsize(src) == 0
    return False


def _to_grid(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The (B, C, h, w) map Grad-CAM weighs, from a cam layer's output.

    ViT-style tokens (B, N, C) are reshaped to a square grid, dropping class/prefix tokens;
    a (B, h, w, C) map (`channels_last`, timm's NHWC models) is permuted; a (B, C, h, w) map
    passes through unchanged.
    """
    if t.dim() == 4 and channels_last:
        return t.permute(0, 3, 1, 2)
    if t.dim() != 3:
        return t
    side = math.isqrt(t.shape[1])
    grid = t[:, t.shape[1] - side * side:, :]  # (B, h*w, C): prefix tokens come first in timm
    return grid.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)  # (B, C, h, w)

