"""Export a checkpoint to ONNX or TorchScript, and check the export against PyTorch.

The exported graph is the whole inference step after decoding: the checkpoint's eval
transform (uint8 -> normalised float), the model and a softmax. Its input is a uint8 batch
`image` of shape (B, 3, S, S) (RGB, already resized with `rvf.data.transforms.load_image`),
its output `probs` of shape (B, 2) = [P(fake), P(real)]; the batch size is dynamic. The
checkpoint's `model.json` travels inside the file (ONNX `metadata_props`, TorchScript
`_extra_files`), so the threshold, class names and input size are never lost.

Usage:
    path = export_checkpoint("runs/lenet", "onnx")
    max_diff = check_parity(path, "runs/lenet", atol=1e-4)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rvf.checkpoint import load_pretrained
from rvf.cli import EXPORT_ATOL, EXPORT_FORMATS
from rvf.data.transforms import DataConfig, build_eval_transform
from rvf.utils import atomic_path, predict_logits

__all__ = ["FORMATS", "ExportError", "ProbabilityModel", "check_parity", "default_output", "export_checkpoint",
           "load_exported"]

FORMATS = EXPORT_FORMATS  # format -> the file it writes by default
ONNX_OPSET = 18
DEFAULT_ATOL = EXPORT_ATOL  # on probabilities


class ExportError(RuntimeError):
    """An export that failed or does not match PyTorch."""


class ProbabilityModel(nn.Module):
    """uint8 (B, 3, S, S) -> (B, 2) probabilities: eval transform, model, softmax in one module."""

    def __init__(self, model: nn.Module, data_cfg: DataConfig, tta_hflip: bool = False):
        super().__init__()
        self.normalize = build_eval_transform(data_cfg)
        self.model = model
        self.tta_hflip = tta_hflip  # the mirror pass is traced into the exported graph

    @classmethod
    def from_checkpoint(cls, checkpoint) -> tuple["ProbabilityModel", dict, DataConfig]:
        """Load a run folder; return (module in eval mode, its model.json, its data config)."""
        model, meta, data_cfg = load_pretrained(checkpoint, "cpu")
        return cls(model, data_cfg, tta_hflip=bool(meta.get("tta_hflip", False))).eval(), meta, data_cfg

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = predict_logits(self.model, self.normalize(image), hflip=self.tta_hflip)
        return logits.float().softmax(dim=1)  # (B, 2)


def _adaptive_max_pool2d(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    """`aten.adaptive_max_pool2d` as slices and maxes, for a static H and W.

    The ONNX exporter has no translation for it (LeNet's head pools its last map to 13x13), and ONNX's
    MaxPool cannot express uneven windows. Window i covers [floor(i*H/oh), ceil((i+1)*H/oh)),
    as in PyTorch; taking the max over rows, then columns, gives the same result exactly.
    The indices output is never used at inference, so it is left as zeros.
    """
    h, w = x.shape[-2:]
    oh, ow = output_size
    rows = [x[..., (i * h) // oh: -((-(i + 1) * h) // oh), :].amax(dim=-2, keepdim=True) for i in range(oh)]
    x = torch.cat(rows, dim=-2)  # (B, C, oh, W)
    cols = [x[..., (j * w) // ow: -((-(j + 1) * w) // ow)].amax(dim=-1, keepdim=True) for j in range(ow)]
    out = torch.cat(cols, dim=-1)  # (B, C, oh, ow)
    return out, torch.zeros_like(out, dtype=torch.int64)


_ONNX_DECOMPOSITIONS = {torch.ops.aten.adaptive_max_pool2d.default: _adaptive_max_pool2d}


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _cause_line(e: BaseException) -> str:
    """Return "Type: first line" of the exception at the root of `e`'s chain.

    Exporters wrap the cause in pages of advice and graph dumps: torch.onnx's ConversionError runs
    to 20 lines of colour codes, next steps and "Original traceback", and the one line that says
    what went wrong is its cause's; torch.export's data-dependent guard error is 16 lines.
    """
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(e)).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def default_output(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Return where an export goes unless told: beside the weights, e.g. `DIR/model.onnx`."""
    return Path(checkpoint) / FORMATS[fmt]


@contextlib.contextmanager
def _jit_deprecation_ignored():
    # torch >= 2.10 marks all of torch.jit deprecated (FutureWarning on trace, save, load);
    # TorchScript is still what many C++/mobile runtimes load, so we keep it behind this.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None) -> Path:
    """Export a checkpoint folder to one file.

    Args:
        checkpoint: folder with `model.safetensors` + `model.json`.
        fmt: "onnx" or "torchscript".
        output: file to write; default `default_output(checkpoint, fmt)`. Written atomically.

    Returns:
        The path written.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        ExportError: the exporter failed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {sorted(FORMATS)}")
    module, meta, data_cfg = ProbabilityModel.from_checkpoint(checkpoint)
    s = data_cfg.image_size
    example = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8)  # (B, 3, S, S)
    output = Path(output) if output is not None else default_output(checkpoint, fmt)
    meta_json = json.dumps(meta, default=str)
    try:
        if fmt == "onnx":
            exported = torch.export.export(
                module, (example,), dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}})
            exported = exported.run_decompositions(_ONNX_DECOMPOSITIONS)
            program = torch.onnx.export(exported, (example,), input_names=["image"], output_names=["probs"],
                                        opset_version=ONNX_OPSET, dynamo=True, verbose=False)
            program.model.metadata_props.update({"rvf_meta": meta_json, "model_name": str(meta["model_name"])})
            with atomic_path(output) as tmp:
                program.save(str(tmp), external_data=False)
        else:
            with torch.no_grad(), _jit_deprecation_ignored():
                # check_trace re-traces and re-runs the model; check_parity below checks more.
                traced = torch.jit.trace(module, (example,), check_trace=False)
                with atomic_path(output) as tmp:
                    torch.jit.save(traced, str(tmp), _extra_files={"model.json": meta_json})
    except Exception as e:  # exporters raise many types; name the model and keep the cause
        raise ExportError(f"{fmt} export of {meta['model_name']!r} failed: {_cause_line(e)}") from e
    return output


def load_exported(path: str | os.PathLike, fmt: str):
    """Load an exported file; return (run(uint8 batch) -> probs (B, 2) numpy, meta dict)."""
    path = Path(path)
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(images) -> np.ndarray:
            return session.run(["probs"], {"image": np.asarray(images, dtype=np.uint8)})[0]

        return run, json.loads(props.get("rvf_meta", "{}"))
    if fmt == "torchscript":
        extra = {"model.json": ""}
        with _jit_deprecation_ignored():
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)

        def run(images) -> np.ndarray:
            # Plain interpretation: the profiling executor re-optimises for every new batch
            # shape, which costs seconds per call in a parity check and changes no result.
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return scripted(torch.as_tensor(np.asarray(images, dtype=np.uint8))).numpy()

        return run, json.loads(extra["model.json"] or "{}")
    raise ValueError(f"format {fmt!r} is not one of {sorted(FORMATS)}")


def check_parity(path: str | os.PathLike, fmt: str, checkpoint: str | os.PathLike,
                 images: torch.Tensor | None = None, atol: float = DEFAULT_ATOL) -> float:
    """Compare an export's probabilities with PyTorch's on the same uint8 images.

    Args:
        path: the exported file.
        fmt: its format.
        checkpoint: the checkpoint it came from.
        images: uint8 (B, 3, S, S); default 3 random images (a batch size the export never saw).
        atol: largest allowed absolute difference of any probability.

    Returns:
        The largest absolute difference.

    Raises:
        ExportError: when it exceeds `atol`, or the file cannot be loaded and run (onnxruntime
            missing, or refusing the file).
    """
    module, _, data_cfg = ProbabilityModel.from_checkpoint(checkpoint)
    if images is None:
        s = data_cfg.image_size
        images = torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(images).numpy()  # (B, 2)
    try:
        run, _ = load_exported(path, fmt)
        got = run(images.numpy())
    except Exception as e:  # ImportError, onnxruntime's and TorchScript's many error types
        raise ExportError(f"{path}: cannot run the {fmt} file to check it: {_cause_line(e)}") from e
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:  # also catches NaN
        raise ExportError(f"{path}: {fmt} probabilities differ from PyTorch's by {diff:.3g} (> atol {atol:g})")
    return diff
