"""The rvf web app: a page and a JSON API that classify uploaded faces as real or fake.

Run it with the development server (binds 127.0.0.1, debug off):

    python scripts/app.py --checkpoint runs/lenet

or under gunicorn, with the checkpoint from the environment:

    RVF_CHECKPOINT=runs/lenet gunicorn -w 1 --threads 4 -b 127.0.0.1:8000 "rvf.web:create_app()"

Settings can also be passed to the factory: `"rvf.web:create_app({'MAX_CONTENT_LENGTH': 5242880})"`.
"""

from __future__ import annotations

import os

import torch
from flask import Flask

from rvf.inference import load_predictor, refuse_decompression_bombs

__all__ = ["create_app", "init_predictor"]


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure an instance of the Flask application.

    Args:
        test_config: settings that override the defaults (and the environment), e.g.
            `{"TESTING": True, "MODEL_CHECKPOINT": path}`.

    Raises:
        RuntimeError: when no checkpoint is configured.
        rvf.checkpoint.CheckpointError: when the checkpoint cannot be loaded.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        # A run folder (model.safetensors + model.json) or an ensemble folder (ensemble.json).
        MODEL_CHECKPOINT=os.environ.get("RVF_CHECKPOINT"),
        DEVICE=os.environ.get("RVF_DEVICE", "cpu"),  # cpu, cuda or auto
        ALLOW_PICKLE=False,  # True: also load a .pt/.pth state dict, with torch.load(weights_only=True)
        MAX_CONTENT_LENGTH=10 * 1024 * 1024,  # whole request, bytes; larger uploads get a 413
        MAX_FILES=32,  # images per request
        # Pixels per image, read from the header before decoding: a 16-bit PNG of 88 MP is a
        # 170 KB upload that takes GBs to decode. 40 MP is a 7300 x 5500 photo.
        MAX_IMAGE_PIXELS=40_000_000,
        # Pixels per request, all its images together: 32 blank 40 MP PNGs are a 2.4 MB upload
        # that took 11.6 s to decode and classify (benchmarks/upload_cost.py). Images past the
        # budget get an error entry each; a browser sends a few photos per request, far under it.
        MAX_REQUEST_PIXELS=160_000_000,
        # Pixels a side, at least: a thumbnail this small says nothing about GAN texture.
        MIN_IMAGE_SIDE=32,
        BATCH_SIZE=16,  # images per forward pass
        TORCH_THREADS=os.environ.get("RVF_TORCH_THREADS"),  # None: torch's default (all cores)
    )
    if test_config is not None:
        app.config.update(test_config)
    for key in ("MAX_CONTENT_LENGTH", "MAX_FILES", "MAX_IMAGE_PIXELS", "MAX_REQUEST_PIXELS", "MIN_IMAGE_SIDE"):
        value = app.config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if app.config["MAX_REQUEST_PIXELS"] < app.config["MAX_IMAGE_PIXELS"]:  # else one allowed image can never pass
        raise ValueError(f"MAX_REQUEST_PIXELS ({app.config['MAX_REQUEST_PIXELS']}) must be at least "
                         f"MAX_IMAGE_PIXELS ({app.config['MAX_IMAGE_PIXELS']})")
    # Werkzeug refuses more than 1,000 form parts with a 413; stop at the file limit instead.
    app.config["MAX_FORM_PARTS"] = app.config["MAX_FILES"] + 8
    init_predictor(app)

    from . import views

    app.register_blueprint(views.bp)
    return app


def init_predictor(app: Flask) -> None:
    """Load the model once for this app and keep it in `app.extensions["rvf"]`.

    Loading per request would re-read the weights every time; `g` lives for one request only.
    """
    checkpoint = app.config.get("MODEL_CHECKPOINT")
    if not checkpoint:
        raise RuntimeError("no model checkpoint configured: pass --checkpoint DIR to scripts/app.py "
                           "or set RVF_CHECKPOINT=DIR (a folder with model.safetensors + model.json, or an "
                           "ensemble folder with ensemble.json)")
    if app.config.get("TORCH_THREADS"):
        # Process-wide. One intra-op thread per forward avoids OpenMP's stalls when the cores
        # are shared (other workers, other jobs): on a busy 2-core box it was ~20x faster.
        torch.set_num_threads(int(app.config["TORCH_THREADS"]))
    # Uploads are untrusted: an image between Pillow's warning and error limits is refused too.
    refuse_decompression_bombs()
    predictor = load_predictor(checkpoint, device=app.config["DEVICE"], allow_pickle=bool(app.config["ALLOW_PICKLE"]))
    predictor.max_pixels = app.config["MAX_IMAGE_PIXELS"]
    predictor.min_side = app.config["MIN_IMAGE_SIDE"]
    app.extensions["rvf"] = predictor
