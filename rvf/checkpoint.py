"""The self-describing best model: `model.safetensors` + `model.json`.

The JSON holds everything needed to rebuild and use the model without the training code's
config or any pickle: `create_model(meta["model_name"], **meta["model_args"])`, the input
size, mean, std and interpolation, the class names, the decision threshold and the metrics.
(Accelerate's `save_state` folders are the other artifact: they exist only to resume.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rvf.data.transforms import DataConfig
from rvf.utils import atomic_path, atomic_write_text

__all__ = ["CheckpointError", "WEIGHTS_NAME", "META_NAME", "save_pretrained", "load_pretrained", "read_meta"]

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def save_pretrained(directory: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `model.json` atomically into `directory`.

    The weights are written first and the JSON last, each by rename, so a reader that finds
    a JSON always finds the weights it describes.

    Args:
        directory: output folder.
        model: the (unwrapped) model.
        meta: at least `model_name`, `model_args`, `data_config`, `classes`.
    """
    for key in ("model_name", "model_args", "data_config", "classes"):
        if key not in meta:
            raise ValueError(f"checkpoint meta lacks {key!r}")
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model_name": meta["model_name"]})
    atomic_write_text(directory / META_NAME, json.dumps(meta, indent=2, default=_jsonable))
    return directory


def _jsonable(o):
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_meta(directory: str | os.PathLike) -> dict:
    """Read and check `model.json` of a checkpoint folder."""
    directory = Path(directory)
    meta_path = directory / META_NAME
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not meta_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f" It holds pickle file(s) {pickles}: rvf loads only safetensors + JSON, because "
                f"unpickling can run arbitrary code." if pickles else "")
        raise CheckpointError(f"{directory} is not an rvf checkpoint: expected {WEIGHTS_NAME} and {META_NAME} "
                              f"(written by scripts/train.py).{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    missing = [k for k in ("model_name", "model_args", "data_config", "classes") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {missing}")
    return meta


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint folder, without unpickling anything.

    Returns:
        (model in eval mode on `device`, meta dict, `DataConfig`).

    Raises:
        CheckpointError: naming the file, for a missing/invalid checkpoint, an unknown model
            name or weights whose shapes do not match the model.
    """
    from rvf.models import create_model

    directory = Path(directory)
    meta = read_meta(directory)
    try:
        model = create_model(meta["model_name"], **meta["model_args"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{directory / META_NAME}: cannot build model {meta['model_name']!r}: {e}") from e
    try:
        state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{directory / WEIGHTS_NAME} is not a valid safetensors file: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} does not match model {meta['model_name']!r}: "
                              f"{str(e).splitlines()[0]} ...") from e
    model.to(device).eval()
    return model, meta, DataConfig.from_dict(meta["data_config"])
