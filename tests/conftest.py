"""Shared fixtures: a tiny random-weight checkpoint, the Flask app built on it, and images.

Images come from `../shared/data/rvf10k-mini` when it is there (real faces), else they are
generated; bad and unusual files (truncated, bombs, CMYK, 16-bit, ...) are always generated.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from rvf.checkpoint import save_pretrained  # noqa: E402
from rvf.data.transforms import resolve_data_config  # noqa: E402
from rvf.models import create_model  # noqa: E402

MINI = ROOT.parent / "shared" / "data" / "rvf10k-mini"
METRICS = {"valid": {"accuracy": 0.8125, "roc_auc": 0.9031}, "holdout": {"accuracy": 0.8, "roc_auc": 0.9}}


def make_checkpoint(directory: Path, model_name: str = "lenet", *, image_size: int | None = None,
                    threshold: float | None = 0.5, metrics: dict | None = METRICS, seed: int = 0,
                    tta_hflip: bool | None = None) -> Path:
    """Save a random-weight model as an rvf checkpoint (model.safetensors + model.json)."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=2)
    meta = {
        "model_name": model_name,
        "model_args": {"num_classes": 2},
        "data_config": resolve_data_config(model, image_size=image_size).to_dict(),
        "classes": ["fake", "real"],
        "epoch": 3,
        "config": {"model": model_name},
    }
    if threshold is not None:
        meta["threshold"] = threshold
    if metrics is not None:
        meta["metrics"] = metrics
    if tta_hflip is not None:
        meta["tta_hflip"] = tta_hflip
    return save_pretrained(directory, model, meta)


@pytest.fixture
def one_torch_thread():
    """Run torch on one intra-op thread for this test, then restore the setting.

    On a 2-core runner that other jobs share, torch's default of one OpenMP thread per core
    stalls at every parallel region: the suite measured 126 s with it and 53 s without it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight LeNet checkpoint (64 px), shared by the whole session: read-only."""
    return make_checkpoint(tmp_path_factory.mktemp("lenet"))


@pytest.fixture
def app(checkpoint):
    # Imported here, not above: the training tests also run where Flask is not installed
    # (the GPU machine's image), and this file is loaded for every test.
    from rvf.web import create_app

    return create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint)})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


# --- images ---

def image_bytes(fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (256, 256), seed: int = 0,
                **save_kw) -> bytes:
    """Encode a smooth random image (a face stand-in) in any format and mode."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    rgb = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype("<u2"))  # mode I;16
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be `width` x `height` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_jpeg() -> bytes:
    return image_bytes("JPEG", quality=90)


# Valid files in every format and mode we promise to convert (name -> bytes).
VALID_IMAGES = {
    "rgb.jpg": lambda: image_bytes("JPEG"),
    "rgb.png": lambda: image_bytes("PNG"),
    "anim.gif": lambda: image_bytes("GIF", mode="P"),
    "photo.webp": lambda: image_bytes("WEBP"),
    "photo.bmp": lambda: image_bytes("BMP"),
    "photo.tiff": lambda: image_bytes("TIFF"),
    "gray.png": lambda: image_bytes("PNG", mode="L"),
    "rgba.png": lambda: image_bytes("PNG", mode="RGBA"),
    "palette.png": lambda: image_bytes("PNG", mode="P"),
    "cmyk.jpg": lambda: image_bytes("JPEG", mode="CMYK"),
    "deep16.png": lambda: image_bytes("PNG", mode="I;16"),
    "wide.jpg": lambda: image_bytes("JPEG", size=(400, 240)),
    "tiny.png": lambda: image_bytes("PNG", size=(9, 9)),
}

# Files that must be refused with a clear message (name -> bytes).
BAD_IMAGES = {
    "empty.jpg": lambda: b"",
    "notes.txt": lambda: b"this is not an image\n",
    "paper.pdf": lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "truncated.jpg": lambda: good_jpeg()[:1500],
    "bomb.png": lambda: png_header_only(50_000, 50_000),  # > 2x MAX_IMAGE_PIXELS: Pillow's error
    "warnbomb.png": lambda: png_header_only(10_000, 10_000),  # between 1x and 2x: Pillow only warns
}


@pytest.fixture(scope="session")
def face_paths(tmp_path_factory) -> list[Path]:
    """Four face images: 2 real + 2 fake from rvf10k-mini when present, else generated JPEGs."""
    split = MINI / "rvf10k" / "valid"
    if split.is_dir():
        paths = sorted((split / "real").glob("*.jpg"))[:2] + sorted((split / "fake").glob("*.jpg"))[:2]
        if len(paths) == 4:
            return paths
    out = tmp_path_factory.mktemp("faces")
    paths = []
    for i in range(4):
        p = out / f"face{i}.jpg"
        p.write_bytes(image_bytes("JPEG", seed=i))
        paths.append(p)
    return paths
