"""Tests for the near-duplicate check: thumbnails, nearest neighbours and the script."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from rvf.data import RVF10K, holdout_split
from rvf.data.near_duplicates import Matches, nearest_neighbours, thumbnails

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import near_duplicates  # noqa: E402


def blobs(seed: int, size: int = 64) -> Image.Image:
    """A distinct smooth image per seed: random 4x4 colours blown up, plus a little noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    img = np.asarray(small.resize((size, size), Image.BICUBIC)).astype(np.float32)
    return Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))


def make_dataset(root: Path, n_train: int = 12, n_valid: int = 6) -> Path:
    for split, n, offset in (("train", n_train, 0), ("valid", n_valid, 1000)):
        for label, cls in enumerate(("fake", "real")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                blobs(offset + 100 * label + i).save(root / split / cls / f"{i:05d}.jpg", quality=95)
    # The planted near-copy: a training fake, a shade brighter and re-compressed harder.
    with Image.open(root / "train" / "fake" / "00003.jpg") as src:
        ImageEnhance.Brightness(src).enhance(1.1).save(root / "valid" / "fake" / "twin.jpg", quality=70)
    return root


def test_thumbnails_ignore_brightness_and_find_the_copy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (5, 3, 64, 64), dtype=np.uint8)
    brighter = images[[2]] + np.uint8(40)  # the same image, shifted: correlation 1
    t, q = thumbnails(images, size=16), thumbnails(brighter, size=16)
    assert t.shape == (5, 3 * 16 * 16) and torch.allclose(t.norm(dim=1), torch.ones(5))
    m = nearest_neighbours(q, t)
    assert m.index.tolist() == [2] and m.similarity[0] == pytest.approx(1.0, abs=1e-5)
    # Against themselves, each image's own match is skipped when asked.
    own = nearest_neighbours(t, t, chunk=2)
    assert own.index.tolist() == [0, 1, 2, 3, 4]
    others = nearest_neighbours(t, t, exclude_self=True, chunk=2)
    assert (others.index != np.arange(5)).all() and (others.similarity < 0.5).all()


def test_matches_above_sorts_most_similar_first():
    m = Matches(np.array([0.5, 0.99, 0.97, 0.999]), np.array([0, 1, 2, 3]))
    assert m.above(0.96).tolist() == [3, 1, 2]
    assert m.above(0.9999).tolist() == []


def test_script_finds_the_planted_copy(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "nd"
    train = RVF10K(data, "train")
    fit, _ = holdout_split(train.targets, 0.25, 1)
    assert str(data / "train" / "fake" / "00003.jpg") in {train.samples[i][0] for i in fit}  # the copy's source
    args = near_duplicates.get_args_parser().parse_args(
        ["--data-dir", str(data), "--output-dir", str(out), "--holdout", "0.25", "--split-seed", "1",
         "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--thumbnail", "16"])
    assert near_duplicates.main(args) == 0
    report = json.loads((out / "near_duplicates.json").read_text())
    held, valid = report["comparisons"]
    assert held["comparison"].startswith("holdout (6 of train)") and held["images"] == 6
    assert valid["images"] == 13 and valid["above_threshold"] == 1
    assert valid["above_threshold_by_label"] == {"fake": 1, "real": 0} and valid["above_threshold_same_label"] == 1
    with open(out / "near_duplicates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    valid_rows = [r for r in rows if r["comparison"] == "valid -> fit"]
    assert len(valid_rows) == 1 and valid_rows[0]["query"].endswith("twin.jpg")
    assert valid_rows[0]["match"].endswith("train/fake/00003.jpg") and float(valid_rows[0]["cosine"]) > 0.95
    with Image.open(out / "near_duplicates.png") as png:
        assert png.size == (256, 128 * len(rows))
    assert "1 of 13 above 0.95 (1 fake, 0 real" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--threshold", "1.5"), ("--holdout", "1"), ("--thumbnail", "0")])
def test_script_rejects_bad_values(flag, value, capsys):
    with pytest.raises(SystemExit):
        near_duplicates.get_args_parser().parse_args(["--data-dir", "x", flag, value])
    assert flag in capsys.readouterr().err


def test_script_names_a_missing_dataset(tmp_path, capsys):
    args = near_duplicates.get_args_parser().parse_args(["--data-dir", str(tmp_path / "nowhere")])
    assert near_duplicates.main(args) == 2
    assert "nowhere" in capsys.readouterr().err


def test_script_names_an_output_dir_it_cannot_write_before_any_work(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n_train=4, n_valid=2)
    (tmp_path / "a_file").write_text("")
    args = near_duplicates.get_args_parser().parse_args(
        ["--data-dir", str(data), "--output-dir", str(tmp_path / "a_file" / "nd"), "--cache-dir",
         str(tmp_path / "cache"), "--num-workers", "0"])
    assert near_duplicates.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write there: ") and str(tmp_path / "a_file") in err
    assert not (tmp_path / "cache").exists()  # refused before decoding a single image


def test_script_names_a_decode_cache_it_cannot_write_in_one_line(tmp_path, capsys, monkeypatch):
    # build_cache's OSError (here a full disk, found when it reserves the file) was a traceback.
    import errno
    import os

    data = make_dataset(tmp_path / "data", n_train=4, n_valid=2)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    args = near_duplicates.get_args_parser().parse_args(
        ["--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"])
    assert near_duplicates.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: No space left on device: the decode cache needs"), err
