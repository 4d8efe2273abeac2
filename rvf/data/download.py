"""Fetch rvf10k from Kaggle with kagglehub."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

__all__ = ["KAGGLE_DATASET", "DownloadError", "download_rvf10k", "find_dataset_root"]

KAGGLE_DATASET = "sachchitkunichetty/rvf10k"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"


class DownloadError(RuntimeError):
    """Kaggle could not be reached or refused us; the message says what to do instead."""


def find_dataset_root(path: str | os.PathLike) -> Path | None:
    """Return the folder under `path` that holds Kaggle's `train.csv`, if any."""
    path = Path(path)
    if (path / "train.csv").is_file():
        return path
    hits = sorted(p.parent for p in path.glob("**/train.csv") if (p.parent / "rvf10k").is_dir())
    return hits[0] if hits else None


def _network_error(e: Exception) -> str:
    """One readable line for a requests/urllib3 error, whose text runs to 400 characters of reprs."""
    text = (str(e).splitlines() or [""])[0]
    host, cause = re.search(r"host='([^']+)'", text), re.search(r"Caused by (\w+)", text)
    if host:
        return f"{type(e).__name__}: {host.group(1)} unreachable" + (f", {cause.group(1)}" if cause else "")
    return f"{type(e).__name__}: {textwrap.shorten(text, 200, placeholder=' ...')}" if text else type(e).__name__


def download_rvf10k(dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download rvf10k (about 380 MB) and return the root to pass as `--data-dir`.

    Args:
        dest: folder to put the dataset in; default kagglehub's cache (~/.cache/kagglehub).
        force: download again even if a copy exists.

    Raises:
        DownloadError: with instructions for a manual download, when Kaggle is unreachable
            or the credentials are missing or refused.
    """
    if dest is not None and not force and (root := find_dataset_root(dest)) is not None:
        return root
    try:
        import kagglehub
    except ImportError as e:
        raise DownloadError("kagglehub is not installed: pip install kagglehub") from e
    manual = (f"Download it by hand from {KAGGLE_URL} (Download -> zip), unzip it, and pass "
              f"the folder that holds train.csv as --data-dir.")
    try:
        kwargs = {"output_dir": str(dest)} if dest is not None else {}
        path = kagglehub.dataset_download(KAGGLE_DATASET, force_download=force, **kwargs)
    except Exception as e:  # kagglehub raises requests, HTTP and its own errors alike
        text = str(e)
        if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "credentials")):
            why = ("Kaggle refused the request: set KAGGLE_USERNAME and KAGGLE_KEY (or "
                   "~/.kaggle/kaggle.json; see https://www.kaggle.com/docs/api) and accept the dataset's terms.")
        else:
            why = f"could not reach Kaggle ({_network_error(e)})."
        raise DownloadError(f"rvf10k download failed: {why} {manual}") from e
    root = find_dataset_root(path)
    if root is None:
        raise DownloadError(f"kagglehub downloaded to {path}, but no train.csv with an rvf10k/ folder is there. "
                            f"{manual}")
    return root
