"""Small helpers shared across rvf."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["PeakSampler", "atomic_path", "atomic_write_text", "count_parameters", "device_name", "json_text",
           "make_folder", "output_folder", "remove_empty", "predict_logits", "tree_rss"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash or kill before the rename leaves the old file (or none) in place, never a
    half-written one: readers only ever see complete files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes 0600, and some writers make the file anew (safetensors' save_file, 0600
        # again): give it the usual mode once written, or a web app run as another user cannot read it.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, create: bool = True) -> Iterator[Path]:
    """Create the folder `path` now and yield it; if the block fails, remove what this made and is still empty.

    Made before a long job so that a bad path fails first, but a job that then fails must not
    leave an empty report folder (e.g. RUN/eval-valid) that looks like a result. `create`
    False (a process other than the main one) makes and removes nothing.
    """
    path = Path(path)
    made = make_folder(path) if create else []
    try:
        yield path
    except BaseException:
        remove_empty(made)
        raise


def make_folder(path: str | os.PathLike) -> list[Path]:
    """`mkdir -p path`; return the folders it made, deepest first (for `remove_empty`)."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that are empty; one written into stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(data, indent: int | None = 2) -> str:
    """`data` as strict JSON: NaN and inf become null, numpy and torch values plain numbers and
    lists, paths and devices strings, tuples lists.

    Python's json would write NaN as a bare `NaN`, which browsers' JSON.parse, jq and most
    other parsers refuse.
    """
    import json
    import math

    def clean(o):
        if hasattr(o, "tolist"):  # numpy / torch scalars and arrays: plain numbers and lists
            o = o.tolist()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, os.PathLike) or type(o).__name__ == "device":
            return str(o)
        return o

    return json.dumps(clean(data), indent=indent, allow_nan=False)


def count_parameters(model) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def predict_logits(model, x, hflip: bool = False):
    """Return `model(x)`; with `hflip`, the mean of the logits of each image and its mirror.

    The one place test-time flips happen, so training's holdout/valid evaluation, the
    evaluate and robustness scripts, exports and the web app all score a model the same way
    (its `model.json` says whether it was selected and calibrated with flips).
    """
    logits = model(x)  # (B, classes)
    if hflip:
        logits = (logits + model(x.flip(-1))) / 2
    return logits


def device_name(device) -> str:
    """Describe a torch device for reports, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def has_native_bf16(device) -> bool:
    """Whether `device` runs bfloat16 matrix maths in hardware: a CUDA GPU that supports it
    (Ampere and later), or a CPU with AVX512-BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire
    Rapids). Elsewhere bf16 autocast is emulated and slower than fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Private but stable helpers (torch >= 2.1); a torch without them gets fp32.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_mixed_precision(setting: str | None, device) -> str | None:
    """Resolve the `mixed_precision` config for Accelerate.

    "auto" takes what the launcher asked for (`accelerate launch --mixed_precision fp16`, or
    its config file) when that is not "no", else bf16 where `device` has native bf16, else
    "no". None leaves it to Accelerate, i.e. exactly the launcher's setting; "no", "fp16" and
    "bf16" are used as given.
    """
    if setting != "auto":
        return setting
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher != "no":
        return launcher
    return "bf16" if has_native_bf16(device) else "no"


def tree_rss(pid: int | None = None) -> int:
    """Resident memory, in bytes, of process `pid` (default: this one) and all its descendants.

    What a benchmark or load test measures: a DataLoader's workers and a gunicorn master's
    workers hold memory of their own. A child that exits while it is read is skipped; a `pid`
    that is gone counts 0.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakSampler:
    """Call `fn` every `interval` seconds in a thread while the block runs; keep the largest value.

        with PeakSampler(tree_rss) as mem:
            work()
        mem.peak  # bytes, at its highest
    """

    def __init__(self, fn, interval: float = 0.05):
        import threading

        self.fn, self.interval, self.peak = fn, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.fn())

    def __enter__(self) -> "PeakSampler":
        self.peak = self.fn()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.fn())
