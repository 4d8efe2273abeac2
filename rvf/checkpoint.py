"""The self-describing best model: `model.safetensors` + `model.json`.

The JSON holds everything needed to rebuild and use the model without the training code's
config or any pickle: `create_model(meta["model_name"], **meta["model_args"])`, the input
size, mean, std and interpolation, the class names, the decision threshold and the metrics.
(Accelerate's `save_state` folders are the other artifact: they exist only to resume.)

Pickled weights (`.pt`, `.pth`, `.ckpt`, `.bin`, `.pkl`) are refused unless the caller passes
`allow_pickle=True` (`--allow-pickle` in the scripts), and even then are read with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rvf.data.transforms import INTERPOLATIONS, DataConfig
from rvf.utils import atomic_path, atomic_write_text, json_text

__all__ = ["CheckpointError", "WEIGHTS_NAME", "META_NAME", "ENSEMBLE_MANIFEST", "check_threshold", "save_pretrained",
           "load_pretrained", "read_meta", "weights_sha256"]

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
ENSEMBLE_MANIFEST = "ensemble.json"  # an ensemble folder's (rvf.ensemble): here, where loading it is decided
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def save_pretrained(directory: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `model.json` atomically into `directory`.

    The weights are written first and the JSON last, each by rename. Both carry one random
    save id (`weights_id` in the JSON): two renames are not one atomic step, and a kill between
    them would otherwise pair new weights with the old JSON (and its threshold) unnoticed;
    `load_pretrained` refuses such a pair.

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
    save_id = uuid.uuid4().hex
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model_name": meta["model_name"], "save_id": save_id})
    meta = {**meta, "weights_id": save_id}
    atomic_write_text(directory / META_NAME, json_text(meta))  # NaN as null: jq or JSON.parse refuse a bare NaN
    return directory


def weights_sha256(directory: str | os.PathLike) -> str:
    """Return the hex sha256 of `directory/model.safetensors`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    # In chunks, so a 500 MB model is not read into memory beside the one loaded; ~1.6 GB/s on a dev CPU.
    with open(Path(directory) / WEIGHTS_NAME, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(directory: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """Read and check `model.json` of a checkpoint folder (and that its weights file is there)."""
    directory = Path(directory)
    meta_path = directory / META_NAME
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; a checkpoint is the run folder that holds "
                              f"{WEIGHTS_NAME} and {META_NAME}: {directory.parent}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not meta_path.is_file() or _weights_path(directory, allow_pickle) is None:
        raise CheckpointError(_not_a_checkpoint(directory, allow_pickle))
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    missing = [k for k in ("model_name", "model_args", "data_config", "classes") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {missing}")
    try:
        data_cfg = DataConfig.from_dict(meta["data_config"])
        if data_cfg.image_size < 1 or len(data_cfg.mean) != 3 or len(data_cfg.std) != 3:
            raise ValueError("image_size must be positive and mean and std three numbers each")
        if data_cfg.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: bad \"data_config\" {meta['data_config']!r} "
                              f"({type(e).__name__}: {e})") from None
    if meta.get("threshold") is not None:
        check_threshold(meta["threshold"], meta_path)
    if list(meta["classes"])[:2] != ["fake", "real"]:  # logit 0 = fake everywhere in rvf
        raise CheckpointError(f"{meta_path}: \"classes\" must be [\"fake\", \"real\"], got {meta['classes']!r}")
    return meta


# A checkpoint without a stored threshold (null, or none at all) decides at the argmax.
DEFAULT_THRESHOLD = 0.5


def meta_threshold(meta: dict) -> float:
    """The P(fake) threshold `model.json` stores, or `DEFAULT_THRESHOLD` where it stores none."""
    threshold = meta.get("threshold")
    return DEFAULT_THRESHOLD if threshold is None else float(threshold)


# calibrate_threshold's "never fake" candidate sits just above 1, so the range does too.
THRESHOLD_MAX = 1.0 + 1e-6


def check_threshold(value, source: os.PathLike | str) -> float:
    """Return a stored P(fake) threshold as a float, or raise `CheckpointError` naming `source`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= THRESHOLD_MAX:
        raise CheckpointError(f"{source}: \"threshold\" must be a probability in [0, 1], got {value!r}")
    return float(value)


def _pickles(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def _weights_path(directory: Path, allow_pickle: bool) -> Path | None:
    """Return `model.safetensors`, else (only with `allow_pickle`) the folder's one pickle file."""
    if (directory / WEIGHTS_NAME).is_file():
        return directory / WEIGHTS_NAME
    pickles = _pickles(directory) if allow_pickle else []
    return pickles[0] if len(pickles) == 1 else None


def _not_a_checkpoint(directory: Path, allow_pickle: bool) -> str:
    names = [p.name for p in _pickles(directory)]
    from rvf.ensemble import MANIFEST  # lazily: rvf.ensemble pulls in scikit-learn

    if (directory / MANIFEST).is_file():
        hint = (" It is an ensemble folder (ensemble.json): scripts/predict.py and scripts/app.py serve it; "
                "to evaluate or export, use its member runs one by one (listed in ensemble.json).")
    elif (directory / WEIGHTS_NAME).is_file():
        hint = f" It has {WEIGHTS_NAME} but no {META_NAME}, which names the model to build for those weights."
    elif (directory / META_NAME).is_file() and not names:
        hint = f" It has {META_NAME} but no {WEIGHTS_NAME}: the weights are missing (an unfinished copy?)."
    elif not names:
        hint = ""
    elif not allow_pickle:
        hint = (f" It holds pickle file(s) {names}: rvf loads only safetensors + JSON, because unpickling can "
                f"run arbitrary code; to load a state dict from one with torch.load(weights_only=True), pass "
                f"--allow-pickle to scripts/predict.py or scripts/app.py (allow_pickle=True in Python).")
    elif len(names) > 1:
        hint = f" It holds several pickle files {names}: keep only the one to load."
    else:
        hint = f" It holds {names} but no {META_NAME}, which names the model to build for those weights."
    return (f"{directory} is not an rvf checkpoint: expected {WEIGHTS_NAME} and {META_NAME} "
            f"(written by scripts/train.py).{hint}")


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """Rebuild a model from a checkpoint folder, without unpickling anything by default.

    Args:
        directory: folder with `model.json` and `model.safetensors`.
        device: where to put the model.
        allow_pickle: when the folder has no `model.safetensors`, read the state dict from its
            one `.pt`/`.pth`/`.ckpt`/`.bin`/`.pkl` file with `torch.load(weights_only=True)`.
            Off by default: unpickling a file from an unknown source can run code, and
            `weights_only=True` (which refuses anything but tensors and plain containers)
            is then the only guard.

    Returns:
        (model in eval mode on `device`, meta dict, `DataConfig`).

    Raises:
        CheckpointError: naming the file, for a missing/invalid checkpoint, a pickle without
            `allow_pickle`, weights and JSON from different saves, an unknown model name,
            weights whose shapes do not match the model, or weights that hold NaN or inf.
    """
    from rvf.models import create_model

    directory = Path(directory)
    meta = read_meta(directory, allow_pickle)
    weights = _weights_path(directory, allow_pickle)
    try:
        model = create_model(meta["model_name"], **meta["model_args"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{directory / META_NAME}: cannot build model {meta['model_name']!r}: {e}") from e
    state = _read_safetensors(weights, meta) if weights.name == WEIGHTS_NAME else _read_pickle(weights)
    # Such a model scores every image NaN, which thresholds to "real" without a word.
    if broken := [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise CheckpointError(f"{weights}: {len(broken)} tensor(s) hold NaN or inf ({', '.join(broken[:3])}"
                              f"{', ...' if len(broken) > 3 else ''}): a diverged run, or a damaged file")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch's first line only says "Error(s) in loading state_dict"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:300]
        raise CheckpointError(f"{weights} does not match model {meta['model_name']!r} "
                              f"(model_args {meta['model_args']}): {detail}") from e
    model.to(device).eval()
    return model, meta, DataConfig.from_dict(meta["data_config"])


def _read_safetensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            save_id = (f.metadata() or {}).get("save_id")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    if meta.get("weights_id") is not None and save_id != meta["weights_id"]:
        raise CheckpointError(f"{path} and {META_NAME} are from different saves (a save was interrupted between "
                              f"the two files): retrain, or --resume the run that wrote them")
    return state


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any global outside torch's allow-list
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it would not import
        detail = (f"it refers to {found.group(1)}, which weights_only=True does not allow" if found
                  else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise CheckpointError(f"{path}: cannot load it with torch.load(weights_only=True): {detail}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (parameter name -> tensor)")
    return state
