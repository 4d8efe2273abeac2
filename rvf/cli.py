"""What the command-line scripts share: argparse types that check a value where it is typed.

A bad number or output path then fails at once, as argparse's own one-line error naming the
flag, instead of as a traceback after minutes of scoring.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

__all__ = ["ALLOW_PICKLE_HELP", "EXPORT_FORMATS", "EXPORT_ATOL", "non_negative_int", "positive_int", "port",
           "positive_float", "float_in", "output_file", "output_dir", "make_folders", "add_cpu_threads",
           "end_process_group", "stdout_reader_may_leave"]

# --allow-pickle's help (predict.py, app.py); here rather than in rvf.checkpoint, which imports torch
ALLOW_PICKLE_HELP = ("load weights from a .pt/.pth/.ckpt/.bin state dict when the folder has no "
                     "model.safetensors (read with torch.load(weights_only=True)); off by default "
                     "because unpickling a file can run code")

# export.py's --format choices (each with the file it writes by default) and --atol default: here, for
# its --help, rather than in rvf.export, which imports torch and takes them from here
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
EXPORT_ATOL = 1e-4  # on probabilities: float32 kernels differ by ~1e-7, a wrong graph by far more


def _whole_number(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, counts, threads)."""
    return _whole_number(text, 1)


def port(text: str) -> int:
    """A TCP port, 1-65535 (the OS would otherwise bind 70000 as 70000 mod 65536, silently)."""
    return _whole_number(text, 1, 65535)


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (worker processes: 0 works in the main process)."""
    return _whole_number(text, 0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """A finite number above 0 (sizes in MB; "inf" would overflow the byte counts made of it)."""
    value = _number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value:g}")
    return value


def float_in(low: float, high: float, *, include_low: bool = True, what: str = "") -> Callable[[str], float]:
    """An argparse type for a number in [low, high), or (low, high) without `include_low`.

    `what` names the kind of number in the error, e.g. "a cosine": "must be a cosine in [-1, 1)".
    """
    def parse(text: str) -> float:
        value = _number(text)
        if not (low <= value if include_low else low < value) or not value < high:
            interval = f"{'[' if include_low else '('}{low:g}, {high:g})"
            raise argparse.ArgumentTypeError(f"must be {what + ' ' if what else ''}in {interval}, got {value:g}")
        return value

    return parse


def output_file(text: str) -> Path:
    """A file to write: anything but an existing folder (its parent folders are created)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file path, e.g. {path / 'out'}")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into: anything but an existing file (created when missing)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a folder to write into")
    return path


def make_folders(*folders: Path | None) -> str | None:
    """Make each folder (None: skipped) now, before any work; return the one-line error for one that
    cannot be made (a read-only place, a path under a file), else None.

    Found now, not as a traceback after minutes of decoding or timing, with the results lost.
    """
    try:
        for folder in folders:
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"error: cannot write there: {e.strerror or e} ({e.filename})"
    return None


def add_cpu_threads(parser: argparse.ArgumentParser) -> None:
    """--cpu-threads, for the scripts run under `accelerate launch` (whose OMP_NUM_THREADS=1 rvf overrides)."""
    parser.add_argument("--cpu-threads", type=positive_int, metavar="N",
                        help="torch threads per process on a CPU (default: this process's share of the physical "
                             "cores, or OMP_NUM_THREADS when you set it; the 1 accelerate launch exports is not "
                             "followed)")


def end_process_group() -> None:
    """Tear down torch.distributed's process group, if a launcher's script set one up.

    Left up until interpreter exit (a script that stops on an error leaves it so), gloo's threads
    sometimes died there on "terminate called without an active exception": SIGABRT in the
    launcher's summary, about 1 launch in 5 on a 2-core CPU.
    """
    dist = sys.modules.get("torch.distributed")  # never imported (--help, a bad flag): nothing is up
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def stdout_reader_may_leave():
    """Let the reader of stdout leave early (`| head`): no BrokenPipeError traceback, and no exit 1.

    A print inside the block that meets the closed pipe ends the block quietly (the rest of it is
    skipped; after `with`, the script goes on as if the block had finished), and stdout is
    flushed on the way out, so a reader that left shows up here rather than in the interpreter's
    own flush at exit ("Exception ignored ... BrokenPipeError", exit 120). An exit status
    already set (sys.exit inside the block) is kept. Python's recipe (docs.python.org, signal,
    "Note on SIGPIPE"), exit status aside: `head` read what it wanted, which is no error.
    """
    try:
        yield
    except BrokenPipeError:
        _stdout_to_devnull()
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Point stdout at os.devnull: Python flushes it again at exit, and that write must go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)  # stdout's descriptor now points there too
