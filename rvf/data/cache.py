"""Decode once: a uint8 image cache on disk, memory-mapped for training.

Decoding and resizing every JPEG every epoch is what made the seed's loop slow. Here each
image of a split is decoded and resized once (by `load_image`, the same function predict and
the web app use), in parallel over all cores, into one `(N, 3, H, W)` uint8 `.npy` file. The
file is memory-mapped, so DataLoader workers and DDP processes on one machine share the OS
page cache instead of each holding a copy.

A cache file is named by a hash of everything that determines its pixels: the file list
(path, label, size, mtime), the image size, the interpolation and the format version. A
different list, size or resize method gets a new file; a stale one is never reused. The
sidecar JSON is written last, atomically, and a file whose size does not match its JSON is
rebuilt, so a build killed half-way is never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from rvf.data.transforms import BadImageError, load_image
from rvf.utils import atomic_write_text

__all__ = ["DecodedImages", "build_cache", "cache_key", "collate_batch", "default_cache_dir"]

log = logging.getLogger(__name__)
# The cache serves training (a config key) and evaluate.py (a flag): name both ways out.
SKIP_HINT = " (to leave unreadable images out: --set skip_bad=true in training, --skip-bad in evaluate.py)"

CACHE_VERSION = 1  # bump when load_image's pixels change


def default_cache_dir() -> Path:
    """`$RVF_CACHE_DIR`, else `~/.cache/rvf` (the dataset root may be read-only)."""
    return Path(os.environ.get("RVF_CACHE_DIR", Path.home() / ".cache" / "rvf")).expanduser()


def cache_key(samples: Sequence[tuple[str, int]], image_size: int, interpolation: str) -> str:
    """Hash everything that determines the cached pixels and labels: the files, the size and
    filter, rvf's decode (`CACHE_VERSION`) and Pillow's, whose JPEG decoder may round otherwise.

    A file counts as unchanged only with the same size, mtime, inode and ctime: a copy that
    keeps the mtime (`cp -p`, `rsync -t`) gets a new inode, and setting the mtime back
    (`touch -r`) moves the ctime, so neither leaves stale pixels in the cache.
    """
    import PIL

    h = hashlib.sha256(f"v{CACHE_VERSION}|{PIL.__version__}|{image_size}|{interpolation}|".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{label}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}\n"
                 .encode())
    return h.hexdigest()[:20]


class DecodedImages(Dataset):
    """A decoded split: uint8 images `(N, 3, H, W)` and their labels.

    `__getitems__` returns a whole batch with one fancy-index read from the memory map;
    torch's DataLoader calls it instead of N `__getitem__` calls (pair with `collate_batch`).
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], paths: Sequence[str],
                 indices: np.ndarray | None = None):
        self.images = images
        self.all_targets = np.asarray(targets, dtype=np.int64)
        self.all_paths = list(paths)
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

    @property
    def targets(self) -> list[int]:
        return self.all_targets[self.indices].tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(self.all_paths[i], int(self.all_targets[i])) for i in self.indices]

    def subset(self, positions: Sequence[int]) -> "DecodedImages":
        """Return a view on some of this split's images (e.g. the holdout slice)."""
        return DecodedImages(self.images, self.all_targets, self.all_paths, self.indices[np.asarray(positions)])

    def of_samples(self, positions: Sequence[int]) -> "DecodedImages":
        """Return a view on these of the samples the split was decoded from (positions in that
        list, not in this view), less any skipped as unreadable: a slice drawn on the sample
        list picks the same images whether they were decoded up front or per step."""
        positions = np.asarray(positions, dtype=np.int64)
        return DecodedImages(self.images, self.all_targets, self.all_paths,
                             positions[np.isin(positions, self.indices)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return torch.from_numpy(np.array(self.images[j])), int(self.all_targets[j])

    def __getitems__(self, positions: Sequence[int]):
        rows = self.indices[np.asarray(positions)]
        order = np.argsort(rows)  # sorted reads are kinder to the page cache
        batch = np.empty((len(rows),) + self.images.shape[1:], dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        return torch.from_numpy(batch), torch.from_numpy(self.all_targets[rows])  # (B,3,H,W), (B,)

    @property
    def nbytes(self) -> int:
        """Bytes of this split's (or subset's) decoded images."""
        return len(self.indices) * int(np.prod(self.images.shape[1:]))


def collate_batch(batch):
    """Collate for both datasets: pass a pre-batched tuple through, drop skipped (None) items."""
    if isinstance(batch, tuple):
        return batch
    kept = [b for b in batch if b is not None]
    if len(kept) < len(batch):
        log.warning("dropped %d unreadable image(s) from a batch", len(batch) - len(kept))
    if not kept:  # every image of the batch was unreadable: an empty batch, which the loops skip
        return torch.empty((0,), dtype=torch.uint8), torch.empty((0,), dtype=torch.long)
    return default_collate(kept)


# Worker state, set once per process by the pool initializer (fork or spawn alike).
_W: dict = {}


def _init_worker(path, shape, samples, image_size, interpolation, pooled=False):
    torch.set_num_threads(1)  # one decode per core; nested threads only thrash
    if pooled:
        # Ctrl-C is the parent's to handle (it stops the pool); a worker would die with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A builder killed outright (the OOM killer picks the biggest process) would leave the
        # executor's workers waiting for work forever, holding the deleted file's disk blocks.
        threading.Thread(target=_exit_with, args=(mp.parent_process().sentinel,), daemon=True).start()
    _W.update(images=np.lib.format.open_memmap(path, mode="r+"), shape=shape, samples=samples,
              size=image_size, interpolation=interpolation)


def _exit_with(sentinel) -> None:
    mp_wait([sentinel])  # ready once the parent is gone
    os._exit(1)


def _decode_chunk(idx: list[int]):
    bad = []
    for i in idx:
        path = _W["samples"][i][0]
        try:
            _W["images"][i] = load_image(path, _W["size"], _W["interpolation"]).numpy()
        except BadImageError as e:
            bad.append((i, str(e)))
    _W["images"].flush()
    return len(idx), bad


def build_cache(samples: Sequence[tuple[str, int]], image_size: int, *, interpolation: str = "bilinear",
                cache_dir: str | os.PathLike | None = None, name: str = "split", skip_bad: bool = False,
                num_workers: int | None = None, progress: bool = True) -> DecodedImages:
    """Return the decoded images of `samples`, building the cache file if needed.

    Args:
        samples: `(path, label)` pairs, e.g. `RVF10K(...).samples`.
        image_size: side length the images are resized to.
        interpolation: resize filter (see `rvf.data.transforms.INTERPOLATIONS`).
        cache_dir: where cache files live; default `default_cache_dir()`.
        name: human-readable prefix of the file name (e.g. "train").
        skip_bad: drop unreadable images (counted in the log) instead of raising.
        num_workers: decoding processes; default all cores.
        progress: show a tqdm bar while building.

    Raises:
        BadImageError: naming the first unreadable file, unless `skip_bad`.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's own words, "File exists", do not say what is wrong
        raise NotADirectoryError(errno.ENOTDIR, "the decode cache folder is a file: point RVF_CACHE_DIR "
                                                "(or cache_dir) at a folder", str(cache_dir)) from None
    key = cache_key(samples, image_size, interpolation)
    npy = cache_dir / f"{name}-{image_size}px-{interpolation}-{key}.npy"
    meta_path = npy.with_suffix(".json")
    shape = (len(samples), 3, image_size, image_size)

    cached = _open_valid(npy, meta_path, key, shape)
    if cached is not None:
        images, meta = cached
        log.info("using decode cache %s", npy)
        return _wrap(images, samples, meta["bad"], skip_bad)

    t0 = time.perf_counter()
    _remove_abandoned(npy)
    # Unique per build, even across hosts sharing the cache folder; os.replace makes one win.
    tmp = npy.with_name(f"{npy.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        del images  # workers open their own maps; this one only sized the file
        _allocate(tmp, npy)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(samples)))
    chunk = max(1, min(256, len(samples) // (workers * 8) or 1))
    chunks = [list(range(s, min(s + chunk, len(samples)))) for s in range(0, len(samples), chunk)]
    bad: list[tuple[int, str]] = []
    init_args = (str(tmp), shape, list(samples), image_size, interpolation)
    bar = tqdm(total=len(samples), desc=f"decoding {name} at {image_size}px", unit="img",
               disable=not progress, dynamic_ncols=True)
    pool, threads = None, torch.get_num_threads()
    try:
        if workers == 1:
            _init_worker(*init_args)  # sets this process to one thread, restored below
            results = map(_decode_chunk, chunks)
        else:
            # An executor rather than multiprocessing.Pool: a worker that dies (the OOM killer, a
            # crash in a decoder) breaks it with an error, where Pool replaced the worker and
            # waited forever for its chunk.
            pool = ProcessPoolExecutor(workers, mp.get_context("fork" if hasattr(os, "fork") else "spawn"),
                                       initializer=_init_worker, initargs=(*init_args, True))
            results = (f.result() for f in as_completed([pool.submit(_decode_chunk, c) for c in chunks]))
        for n, chunk_bad in results:
            if chunk_bad and not skip_bad:
                raise BadImageError(chunk_bad[0][1] + SKIP_HINT)
            bad += chunk_bad
            bar.update(n)
    except BrokenProcessPool:
        tmp.unlink(missing_ok=True)
        raise OSError(errno.ECHILD, f"a decoding process died while building the {name} decode cache (killed by "
                                    f"the system, e.g. out of memory, or crashed in an image decoder); free some "
                                    f"memory and run again, or train with cache: false", str(npy)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:  # None also when it failed to start: that error, not this one, is raised
            # Waits for the chunks in hand (a second or so), drops the rest: no process outlives this.
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)  # as it was (one decoding process sets it to one)
        _W.clear()
    os.replace(tmp, npy)
    seconds = time.perf_counter() - t0
    meta = {"key": key, "version": CACHE_VERSION, "shape": list(shape), "interpolation": interpolation,
            "bad": sorted(bad), "build_seconds": round(seconds, 2), "num_workers": workers}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))  # written last: marks the cache complete
    log.info("built decode cache %s: %d images, %.1f MB in %.1f s (%d workers)",
             npy, len(samples), npy.stat().st_size / 1e6, seconds, workers)
    images, _ = _open_valid(npy, meta_path, key, shape)
    return _wrap(images, samples, meta["bad"], skip_bad)


def _allocate(tmp: Path, npy: Path) -> None:
    """Reserve the disk blocks of a new cache file. open_memmap leaves it sparse, and a full disk
    then shows as SIGBUS in whichever process writes a page first: a crash with no message, or
    a pool that waits forever for the worker it killed. Reserved, it is one OSError, up front.
    (glibc emulates the call on file systems without it, NFSv3 or FUSE, by writing a byte to
    every block: slower there, once per build, but still a reservation.)"""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    nbytes = tmp.stat().st_size
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return  # the call refused (EOPNOTSUPP, EINVAL): decode unreserved, as before
        why = (f"{e.strerror}: the decode cache needs {nbytes / 1e6:.1f} MB; free some, point RVF_CACHE_DIR "
               f"(or cache_dir) elsewhere, or --set cache=false")
        raise OSError(e.errno, why, str(npy)) from None
    finally:
        os.close(fd)


def _open_valid(npy: Path, meta_path: Path, key: str, shape) -> tuple[np.ndarray, dict] | None:
    """Memory-map a finished cache, or return None if it is absent, partial or stale."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or tuple(meta.get("shape", ())) != shape:
            return None
        images = np.load(npy, mmap_mode="r")
        if images.shape != shape or images.dtype != np.uint8:
            return None
        return images, meta
    except (OSError, ValueError, json.JSONDecodeError) as e:  # truncated or corrupt file
        log.warning("ignoring damaged decode cache %s (%s); rebuilding", npy, e)
        return None


# A build's temp file is written to all along; one untouched this long was left by a killed build
# (SIGKILL, a preempted job): Python's cleanup never ran, and nothing else would remove it.
ABANDONED_AFTER_S = 3600


def _remove_abandoned(npy: Path) -> None:
    """Delete temp files of earlier builds of `npy` that nobody has written to for an hour."""
    for tmp in npy.parent.glob(f"{npy.name}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                tmp.unlink()
                log.info("removed %s, left by a build that was killed", tmp)
        except FileNotFoundError:  # another build got there first
            pass


def _wrap(images, samples, bad, skip_bad) -> DecodedImages:
    if bad and not skip_bad:
        raise BadImageError(bad[0][1] + SKIP_HINT)
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][1])
    bad_idx = {i for i, _ in bad}
    keep = np.array([i for i in range(len(samples)) if i not in bad_idx], dtype=np.int64)
    return DecodedImages(images, [label for _, label in samples], [p for p, _ in samples], keep)
