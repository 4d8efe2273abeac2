"""rvf10k, and any real-vs-fake image folder, as a torch `Dataset`.

Two layouts are understood (`RVF10K` picks one by looking at `root`):

1. Kaggle's: `root/{train,valid}.csv` (columns `"",original_path,id,label,label_str,path`,
   `path` relative to `root/rvf10k/`) and `root/rvf10k/{train,valid}/{real,fake}/*.jpg`.
   The CSV is the source of truth; where it disagrees with the folders we say so.
2. A plain folder: `root/{train,valid[,test]}/{real,fake}/*` with any common image type.
   (Kaggle's `root/rvf10k` subfolder is itself such a folder.)

Labels follow Kaggle and the seed: 0 = fake, 1 = real.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import posixpath
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from rvf import CLASSES
from rvf.data.transforms import IMAGE_EXTENSIONS, BadImageError, open_rgb

__all__ = ["DatasetError", "RVF10K", "holdout_split", "stratified_sample", "find_split_dir", "check_same_train"]

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
CSV_COLUMNS = ("original_path", "id", "label", "label_str", "path")
LAYOUT_HELP = (
    "expected Kaggle's layout (ROOT/train.csv, ROOT/valid.csv, ROOT/rvf10k/{train,valid}/{real,fake}/*.jpg) "
    "or a plain folder (ROOT/{train,valid,test}/{real,fake}/*.jpg|png|...)"
)


class DatasetError(ValueError):
    """The data on disk is not what rvf expects; the message names the path at fault."""


def find_split_dir(root: Path, split: str) -> Path | None:
    """Return `root/<split>` for a plain folder, accepting `val`/`validation` for `valid`."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return None


class RVF10K(Dataset):
    """Real-vs-fake faces, in the spirit of torchvision's `ImageFolder`.

    Args:
        root: dataset root in either layout (see module docstring).
        split: "train", "valid" or "test".
        transform: applied to the decoded RGB `PIL.Image`; None returns the image itself.
        skip_bad: if True, an unreadable image makes `__getitem__` return None (the loader's
            collate drops it and the count is logged) instead of raising `BadImageError`.

    Attributes:
        classes: `["fake", "real"]`.
        class_to_idx: `{"fake": 0, "real": 1}`.
        samples: list of `(path, label)`.
        targets: list of labels.
        layout: "kaggle" or "folder".
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable | None = None, skip_bad: bool = False):
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        self.skip_bad = skip_bad
        self.classes = list(CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder; {LAYOUT_HELP}")
        if (self.root / f"{split}.csv").is_file():
            self.layout = "kaggle"
            self.samples = self._read_kaggle_csv()
        else:
            self.layout = "folder"
            self.samples = self._scan_folder()
        self.targets = [label for _, label in self.samples]
        for c, i in self.class_to_idx.items():
            if i not in self.targets:
                raise DatasetError(f"class {c!r} of split {split!r} under {self.root} has no images; {LAYOUT_HELP}")

    def _read_kaggle_csv(self) -> list[tuple[str, int]]:
        csv_path = self.root / f"{self.split}.csv"
        image_root = self.root / "rvf10k"
        try:
            # utf-8-sig: a BOM (Excel's UTF-8) must not become part of the first column's name.
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                missing_cols = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
                if missing_cols:
                    raise DatasetError(f"{csv_path} lacks column(s) {missing_cols}; Kaggle's has {list(CSV_COLUMNS)}")
                rows = [(reader.line_num, row) for row in reader]  # line_num: the file's own, blank lines included
        except UnicodeDecodeError as e:
            raise DatasetError(f"{csv_path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               f"save it as UTF-8") from None
        samples, missing, mismatched, seen = [], [], [], {}
        for n, row in rows:
            if absent := [c for c in CSV_COLUMNS if row.get(c) is None]:
                raise DatasetError(f"{csv_path} line {n}: the row is cut short (no {', '.join(absent)})")
            # ./train/x.jpg and train/../valid/x.jpg name train/x.jpg and valid/x.jpg: check what is read.
            rel = posixpath.normpath(row["path"])
            try:
                label = int(row["label"])
            except ValueError:
                raise DatasetError(f"{csv_path} line {n}: label {row['label']!r} is not 0 or 1") from None
            if label not in (0, 1) or row["label_str"] != self.classes[label]:
                mismatched.append(f"line {n}: label={row['label']} label_str={row['label_str']!r}")
                continue
            if Path(rel).parts[:1] != (self.split,):
                # Another split's image listed here would be trained on and scored on both sides.
                raise DatasetError(f"{csv_path} line {n}: {rel} is not under {self.split}/; "
                                   f"{self.split}.csv lists only {self.split} images")
            if rel in seen:
                raise DatasetError(f"{csv_path} lines {seen[rel]} and {n} both list {rel}: an image listed twice "
                                   "counts twice and can land on both sides of the holdout slice")
            seen[rel] = n
            folder = Path(rel).parent.name
            if folder in self.class_to_idx and self.class_to_idx[folder] != label:
                mismatched.append(f"line {n}: {rel} is in folder {folder!r} but labelled {self.classes[label]!r}")
                continue
            path = image_root / rel
            if not path.is_file():
                missing.append(str(path))
                continue
            samples.append((str(path), label))
        if mismatched:
            raise DatasetError(
                f"{csv_path}: {len(mismatched)} row(s) where the label disagrees with its folder or label_str, "
                f"e.g. {'; '.join(mismatched[:3])}")
        if missing:
            raise DatasetError(
                f"{csv_path} lists {len(missing)} image(s) that are not on disk, e.g. {missing[:3]}; "
                f"re-download the dataset or fix the CSV")
        if not samples:
            raise DatasetError(f"{csv_path} lists no images; {LAYOUT_HELP}")
        self._warn_unlisted(image_root / self.split, {p for p, _ in samples}, csv_path)
        return samples

    def _warn_unlisted(self, split_dir: Path, listed: set[str], csv_path: Path) -> None:
        if not split_dir.is_dir():
            return
        on_disk = {str(p) for p in split_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
        extra = sorted(on_disk - listed)
        if extra:
            log.warning("%d image(s) under %s are not listed in %s and are ignored, e.g. %s",
                        len(extra), split_dir, csv_path, extra[:3])

    def _scan_folder(self) -> list[tuple[str, int]]:
        split_dir = find_split_dir(self.root, self.split)
        if split_dir is None:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            deeper = _deeper_root(self.root, self.split)
            hint = f"; it is in {deeper}: pass that folder instead" if deeper else f"; {LAYOUT_HELP}"
            raise DatasetError(
                f"split {self.split!r} not found under {self.root} (found folders {found}, "
                f"no {self.split}.csv){hint}")
        samples, class_dirs = [], set()
        for cls, label in self.class_to_idx.items():
            matches = sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.lower() == cls)
            if not matches:
                found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
                raise DatasetError(f"{split_dir} has no {cls!r} folder (found {found}); {LAYOUT_HELP}")
            if len(matches) > 1:  # real/ and Real/: which one is meant cannot be guessed
                raise DatasetError(f"{split_dir} has {len(matches)} folders for class {cls!r}: "
                                   f"{[m.name for m in matches]}; merge them into one")
            class_dir = matches[0]
            class_dirs.add(class_dir)
            # Hidden files and folders (.DS_Store, .ipynb_checkpoints/ copies) are not data.
            every = [p for p in class_dir.rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)]
            files = sorted(p for p in every if p.suffix.lower() in IMAGE_EXTENSIONS)
            if others := sorted(set(every) - set(files)):
                log.warning("%d file(s) under %s are not %s images and are ignored, e.g. %s", len(others),
                            class_dir, "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS), [str(o) for o in others[:3]])
            samples += [(str(p), label) for p in files]
        # An unknown/ folder or images loose in the split are not a class of ours: say they are left out.
        if others := sorted(p.name for p in split_dir.iterdir() if p not in class_dirs and not p.name.startswith(".")):
            log.warning("%d entr(ies) under %s besides its %s folders are ignored, e.g. %s",
                        len(others), split_dir, "/".join(self.classes), others[:3])
        return samples

    def file_list_id(self) -> dict:
        """Which images this split lists, in its order: their count and the sha256 of their paths
        (relative to the split's folder) and labels; not of their bytes, so a copy of the data
        moved elsewhere keeps its id. The holdout slice is drawn on this list: two runs with the
        same id, split seed and holdout held out the same images.
        """
        base = self.root / "rvf10k" / self.split if self.layout == "kaggle" else find_split_dir(self.root, self.split)
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{Path(os.path.relpath(path, base)).as_posix()}\t{label}\n".encode())
        return {"files": len(self.samples), "sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = open_rgb(path)
        except BadImageError:
            if self.skip_bad:
                log.warning("skipping unreadable image %s", path)
                return None
            raise
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        counts = np.bincount(self.targets, minlength=2)
        return (f"RVF10K(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, "
                f"fake={counts[0]}, real={counts[1]})")


def _deeper_root(root: Path, split: str) -> Path | None:
    """The folder one or two levels under `root` that holds `split` in either layout (a zip unpacked
    into a folder of its own, e.g. ROOT/rvf10k/train.csv), Kaggle's first; None if there is none."""
    def holds(d: Path) -> bool:
        if (d / f"{split}.csv").is_file() and (d / "rvf10k").is_dir():
            return True
        split_dir = find_split_dir(d, split)
        return split_dir is not None and {c.name.lower() for c in split_dir.iterdir() if c.is_dir()} >= set(CLASSES)

    hits = sorted((d for depth in ("*/", "*/*/") for d in root.glob(depth) if holds(d)),
                  key=lambda d: (not (d / f"{split}.csv").is_file(), len(d.parts), d))
    return hits[0] if hits else None


def holdout_split(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (fit, holdout), stratified by label and reproducible from `seed`.

    The holdout slice of *train* is the model-selection set, so the valid split is only
    ever evaluated, never selected on.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    if fraction <= 0:
        return idx, idx[:0]
    _check_stratifiable(targets, int(np.ceil(fraction * len(idx))), f"holdout {fraction:g}",
                        "raise holdout, or set holdout: 0 to train on all of train")
    fit, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=targets)
    return np.sort(fit), np.sort(held)


def check_same_train(what: str, trained: dict | None, current: dict, root, trained_root=None) -> None:
    """Refuse `what` (a run, teacher or ensemble member) when it trained on another list of
    train images (`RVF10K.file_list_id`, stored as `train_files` in its model.json) than
    `root` holds: the holdout slice drawn here would be other images, and could hold some it
    trained on. Runs saved before rvf recorded the list (`trained` None) are let through.
    """
    if trained is None or trained == current:
        return
    hint = f"; it trained on {trained_root}" if trained_root and str(trained_root) != str(root) else ""
    raise DatasetError(
        f"{what} trained on another list of train images ({trained['files']} files, id {trained['sha256'][:12]}) "
        f"than {root} holds ({current['files']} files, id {current['sha256'][:12]}): the holdout slice drawn here "
        f"would be other images, and could hold some it trained on. Pass the data it trained on{hint}")


def _check_stratifiable(targets, n_part: int, what: str, fix: str) -> None:
    """Raise `DatasetError` where a stratified draw cannot be made (sklearn's words name no setting)."""
    counts = np.bincount(np.asarray(targets), minlength=len(CLASSES))
    n_rest = len(targets) - n_part
    if counts.min() < 2 or min(n_part, n_rest) < len(CLASSES):
        raise DatasetError(f"{what}: a stratified draw needs at least one image of each class on both sides "
                           f"(train has {dict(zip(CLASSES, counts.tolist()))}, the part drawn {n_part}); {fix}")


def stratified_sample(targets, n: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly `n` items (all of them when `n` covers them), stratified by
    label and reproducible from `seed`. A count, not a fraction: 1 - 1000/3000 of 3,000
    rounds to 999."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    if n >= len(idx):
        return idx
    _check_stratifiable(targets, n, f"{n} of {len(idx)} images", "ask for more")
    keep, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=targets)
    return np.sort(keep)
