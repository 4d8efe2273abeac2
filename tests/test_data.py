"""The data pipeline: layouts, CSV checks, bad data, the decode cache and transforms."""

import csv
import importlib.util
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth import SHARED_MINI, face, make_folder_dataset, make_kaggle_dataset

from rvf.data import (
    RVF10K,
    BadImageError,
    DataConfig,
    DatasetError,
    DeviceLoader,
    build_cache,
    build_eval_transform,
    build_train_transform,
    collate_batch,
    holdout_split,
    load_image,
    open_rgb,
    resolve_data_config,
)
from rvf.data.cache import cache_key
from rvf.data.download import DownloadError, download_rvf10k

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("layout", ["kaggle", "folder"])
def test_both_layouts(tmp_path, layout):
    root = make_kaggle_dataset(tmp_path, n=5) if layout == "kaggle" else make_folder_dataset(tmp_path, n=5)
    ds = RVF10K(root, "train")
    assert ds.layout == layout
    assert ds.classes == ["fake", "real"] and ds.class_to_idx == {"fake": 0, "real": 1}
    assert len(ds) == 10 and sorted(ds.targets) == [0] * 5 + [1] * 5
    for path, label in ds.samples:
        assert Path(path).parent.name == ds.classes[label]
    img, label = ds[0]
    assert img.mode == "RGB" and label in (0, 1)


def test_kaggle_rvf10k_subfolder_is_a_plain_folder(tmp_path):
    make_kaggle_dataset(tmp_path, n=3)
    assert RVF10K(tmp_path / "rvf10k", "valid").layout == "folder"


def test_plain_folder_any_image_type_and_val_alias(tmp_path):
    make_folder_dataset(tmp_path, n=3, splits=("train", "val"), ext="png")
    ds = RVF10K(tmp_path, "valid")
    assert len(ds) == 6 and ds[0][0].size == (32, 32)
    make_folder_dataset(tmp_path, n=2, splits=("test",), ext="webp")
    assert len(RVF10K(tmp_path, "test")) == 4
    make_folder_dataset(tmp_path / "upper", n=2, splits=("train",), ext="JPG")  # cameras and Windows tools write .JPG
    assert [Path(p).suffix for p, _ in RVF10K(tmp_path / "upper", "train").samples] == [".JPG"] * 4


def _rewrite_csv(path: Path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_csv_missing_file_is_named(tmp_path):
    make_kaggle_dataset(tmp_path, n=3)
    (tmp_path / "rvf10k/train/real/00001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) that are not on disk.*00001\.jpg"):
        RVF10K(tmp_path, "train")


def test_csv_label_disagreeing_with_folder(tmp_path):
    make_kaggle_dataset(tmp_path, n=3)

    def flip(rows):  # say a real image is fake, consistently in label and label_str
        rows[1][3], rows[1][4] = "0", "fake"
    _rewrite_csv(tmp_path / "train.csv", flip)
    with pytest.raises(DatasetError, match=r"train\.csv: 1 row\(s\).*line 2.*folder 'real' but labelled 'fake'"):
        RVF10K(tmp_path, "train")


def test_csv_label_disagreeing_with_label_str(tmp_path):
    make_kaggle_dataset(tmp_path, n=3)

    def contradict(rows):  # a real image (under real/, label 1) whose label_str says fake
        rows[1][4] = "fake"
    _rewrite_csv(tmp_path / "train.csv", contradict)
    with pytest.raises(DatasetError, match=r"train\.csv: 1 row\(s\).*label_str.*line 2: label=1 label_str='fake'"):
        RVF10K(tmp_path, "train")


def test_csv_listing_an_image_twice_or_from_another_split_is_named(tmp_path):
    make_kaggle_dataset(tmp_path, n=3)
    _rewrite_csv(tmp_path / "train.csv", lambda rows: rows.append(list(rows[1])))  # line 2 again, as the last
    with pytest.raises(DatasetError, match=r"train\.csv lines 2 and 8 both list train/real/00000\.jpg"):
        RVF10K(tmp_path, "train")
    make_kaggle_dataset(tmp_path, n=3)

    def borrow(rows):  # a valid image listed in train.csv: trained on, then scored
        rows[1][5] = "valid/real/00000.jpg"
    _rewrite_csv(tmp_path / "train.csv", borrow)
    with pytest.raises(DatasetError, match=r"train\.csv line 2: valid/real/00000\.jpg is not under train/"):
        RVF10K(tmp_path, "train")


def test_csv_paths_are_checked_as_they_resolve(tmp_path):
    """`..` or `./` in a path cannot slip another split's image, or one listed twice, past the checks."""
    make_kaggle_dataset(tmp_path, n=3)

    def borrow(rows):  # a valid image, spelt as if under train/
        rows[1][5] = "train/../valid/real/00000.jpg"
    _rewrite_csv(tmp_path / "train.csv", borrow)
    with pytest.raises(DatasetError, match=r"train\.csv line 2: valid/real/00000\.jpg is not under train/"):
        RVF10K(tmp_path, "train")
    make_kaggle_dataset(tmp_path, n=3)

    def twice(rows):
        rows.append(list(rows[1]))
        rows[-1][5] = "./" + rows[-1][5]
    _rewrite_csv(tmp_path / "train.csv", twice)
    with pytest.raises(DatasetError, match=r"train\.csv lines 2 and 8 both list train/real/00000\.jpg"):
        RVF10K(tmp_path, "train")


def test_csv_not_utf8_is_named_and_a_bom_is_read(tmp_path):
    make_kaggle_dataset(tmp_path, n=2)
    csv_path = tmp_path / "train.csv"
    text = csv_path.read_text()
    csv_path.write_bytes(text.replace("/kaggle/input/x/", "/kaggle/input/caf\u00e9/", 1).encode("cp1252"))
    with pytest.raises(DatasetError, match=r"train\.csv is not UTF-8 text .*save it as UTF-8"):
        RVF10K(tmp_path, "train")
    header, rest = text.split("\n", 1)
    csv_path.write_text("\ufeff" + "\n".join(line.split(",", 1)[1] for line in [header, *rest.splitlines()])
                        + "\n")  # a BOM, and no index column
    assert len(RVF10K(tmp_path, "train")) == 4


def test_a_folder_layout_refuses_two_folders_for_a_class_and_skips_hidden_ones(tmp_path):
    root = make_folder_dataset(tmp_path, n=2, splits=("train",))
    (root / "train/real/.ipynb_checkpoints").mkdir()
    face(1).save(root / "train/real/.ipynb_checkpoints/00000-checkpoint.jpg")  # Jupyter's copy, not data
    assert len(RVF10K(root, "train")) == 4
    (root / "train/Real").mkdir()
    face(1).save(root / "train/Real/x.jpg")
    with pytest.raises(DatasetError, match=r"2 folders for class 'real': \['Real', 'real'\]; merge them"):
        RVF10K(root, "train")


def test_a_holdout_or_subset_too_small_to_stratify_names_the_setting():
    from rvf.data import holdout_split, stratified_sample

    targets = [0] * 12 + [1] * 12
    with pytest.raises(DatasetError, match=r"holdout 0\.01: a stratified draw needs at least one image of each"):
        holdout_split(targets, 0.01, seed=0)
    with pytest.raises(DatasetError, match=r"1 of 24 images: a stratified draw .*ask for more"):
        stratified_sample(targets, 1, seed=0)
    with pytest.raises(DatasetError, match=r"'real': 1"):  # a class of one image cannot be split
        holdout_split([0] * 12 + [1], 0.25, seed=0)


def test_csv_missing_column(tmp_path):
    make_kaggle_dataset(tmp_path, n=2)
    _rewrite_csv(tmp_path / "valid.csv", lambda rows: [r.pop() for r in rows])
    with pytest.raises(DatasetError, match=r"valid\.csv lacks column\(s\) \['path'\]"):
        RVF10K(tmp_path, "valid")


def test_csv_short_row_names_its_line_blank_lines_counted(tmp_path):
    make_kaggle_dataset(tmp_path, n=2)
    text = (tmp_path / "train.csv").read_text().splitlines()
    cut = text[2].rsplit(",", 2)[0]  # line 3 loses label_str and path
    (tmp_path / "train.csv").write_text("\n".join([text[0], "", "", text[1], cut, *text[3:]]) + "\n")
    with pytest.raises(DatasetError, match=r"train\.csv line 5: the row is cut short \(no label_str, path\)"):
        RVF10K(tmp_path, "train")


def test_a_folder_layouts_other_files_are_reported(tmp_path, caplog):
    root = make_folder_dataset(tmp_path, n=2, splits=("train",))
    face(1).save(root / "train/real/x.jpg")
    (root / "train/real/x.jfif").write_bytes((root / "train/real/x.jpg").read_bytes())
    with caplog.at_level(logging.WARNING):
        assert len(RVF10K(root, "train")) == 5
    assert "1 file(s) under" in caplog.text and "x.jfif" in caplog.text


def test_a_folder_layouts_other_folders_are_reported(tmp_path, caplog):
    root = make_folder_dataset(tmp_path, n=2, splits=("train",))
    (root / "train/unknown").mkdir()
    face(1).save(root / "train/unknown/u.jpg")
    face(1).save(root / "train/loose.jpg")
    (root / "train/.cache").mkdir()
    with caplog.at_level(logging.WARNING):
        assert len(RVF10K(root, "train")) == 4
    assert "2 entr(ies) under" in caplog.text and "['loose.jpg', 'unknown']" in caplog.text


def test_unlisted_images_are_reported(tmp_path, caplog):
    make_kaggle_dataset(tmp_path, n=2)
    face(1).save(tmp_path / "rvf10k/train/real/extra.jpg")
    with caplog.at_level(logging.WARNING):
        assert len(RVF10K(tmp_path, "train")) == 4
    assert "not listed in" in caplog.text and "extra.jpg" in caplog.text


@pytest.mark.parametrize("case", ["wrong_root", "missing_split", "empty_class", "missing_class"])
def test_layout_errors_name_the_path(tmp_path, case):
    make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    root = tmp_path / "d"
    split = "train"
    if case == "wrong_root":
        root = tmp_path / "nope"
    elif case == "missing_split":
        split = "valid"
    elif case == "empty_class":
        for p in (root / "train/fake").iterdir():
            p.unlink()
    else:
        (root / "train/real").rename(root / "train/genuine")
    with pytest.raises(DatasetError) as e:
        RVF10K(root, split)
    msg = str(e.value)
    assert str(root) in msg and "expected" in msg
    assert "\n" not in msg  # one sentence, not a wall


def test_a_root_unpacked_one_level_deeper_is_named(tmp_path):
    """Kaggle's zip unpacked into a folder of its own: the error names the folder to pass."""
    make_kaggle_dataset(tmp_path / "rvf10k", n=2)
    with pytest.raises(DatasetError, match=re.escape(f"it is in {tmp_path / 'rvf10k'}: pass that folder instead")):
        RVF10K(tmp_path, "train")
    make_folder_dataset(tmp_path / "plain" / "data", n=2, splits=("val",))
    with pytest.raises(DatasetError, match=re.escape(f"it is in {tmp_path / 'plain' / 'data'}: pass that folder")):
        RVF10K(tmp_path / "plain", "valid")


# ------------------------------------------------------------------ bad images

def _bad_files(d: Path) -> dict:
    buf = io.BytesIO()
    face(0, 64).save(buf, "JPEG")
    files = {"zero.jpg": b"", "text.jpg": b"not an image at all",
             "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2]}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_bad_images_raise_naming_the_file(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(BadImageError, match=name):
            load_image(tmp_path / name, 32)


def test_damaged_metadata_or_data_is_the_files_fault_not_a_crash(tmp_path, monkeypatch):
    import struct

    from PIL import ImageFile

    # EXIF that asks for a rotation and stores XResolution (a rational) as text: Pillow's
    # exif_transpose raised TypeError. The pixels are sound: the face is kept as stored.
    entries = (struct.pack("<HHI4s", 0x0112, 3, 1, struct.pack("<HH", 6, 0))
               + struct.pack("<HHI4s", 0x011A, 2, 4, b"abc\0"))
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif)
    img = open_rgb(buf.getvalue())
    assert img.size == (40, 24) and np.array_equal(np.asarray(img), pixels)
    # Damaged data can raise struct.error, TypeError or OverflowError from a decoder (found by
    # fuzzing): a BadImageError naming the file, so skip_bad and the app's per-file errors hold.
    (tmp_path / "face.png").write_bytes(buf.getvalue())

    def damaged(self):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(ImageFile.ImageFile, "load", damaged)
    with pytest.raises(BadImageError, match=r"face\.png: cannot decode image \(error: unpack"):
        open_rgb(tmp_path / "face.png")


@pytest.mark.parametrize("nodata", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_a_nodata_pixel_keeps_its_other_pixels(nodata):
    # One NaN or inf made min..max non-finite: the face decoded all black, and got a verdict.
    pixels = np.random.default_rng(0).uniform(-1, 3, (24, 40)).astype(np.float32)
    clean, holed = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels, mode="F").save(clean, "TIFF")
    pixels[5, 7] = nodata
    Image.fromarray(pixels, mode="F").save(holed, "TIFF")
    want, got = np.asarray(open_rgb(clean.getvalue())), np.asarray(open_rgb(holed.getvalue())).copy()
    got[5, 7] = want[5, 7]
    assert want.std() > 50 and np.array_equal(got, want)


def test_bad_images_fail_the_cache_or_are_skipped(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "d", n=4, splits=("train",))
    _bad_files(root / "train/fake")
    ds = RVF10K(root, "train")
    assert len(ds) == 11
    with pytest.raises(BadImageError, match=r"(zero|text|truncated)\.jpg.*skip_bad"):
        build_cache(ds.samples, 16, cache_dir=tmp_path / "c", num_workers=1, progress=False)
    with caplog.at_level(logging.WARNING):
        cached = build_cache(ds.samples, 16, cache_dir=tmp_path / "c", num_workers=1, progress=False, skip_bad=True)
    assert len(cached) == 8 and "skipped 3 unreadable image(s)" in caplog.text
    # the per-file path: None items are dropped by the collate and counted
    ds_skip = RVF10K(root, "train", skip_bad=True)
    items = [ds_skip[i] for i in range(len(ds_skip))]
    assert sum(x is None for x in items) == 3
    images, labels = collate_batch([None, None])  # a batch with nothing readable: empty, for the loops to skip
    assert len(images) == len(labels) == 0


def test_skip_bad_without_the_cache_trains_through_unreadable_batches(tmp_path):
    from rvf.config import TrainConfig
    from rvf.train import train

    root = make_folder_dataset(tmp_path / "d", n=6)
    for name in ("zz0.jpg", "zz1.jpg"):  # the valid split's last batch of 2 (sorted): nothing readable
        (root / "valid" / "real" / name).write_bytes(b"not a jpeg")
    for name in ("zz0.jpg", "zz1.jpg", "zz2.jpg"):  # and some among the faces the framing check is fitted on
        (root / "train" / "real" / name).write_bytes(b"not a jpeg")
    m = train(TrainConfig(model="lenet", data_dir=str(root), output_dir=str(tmp_path / "run"), image_size=32,
                          epochs=1, batch_size=4, eval_batch_size=2, holdout=0.25, tracker="none", cache=False,
                          num_workers=0, skip_bad=True, cache_dir=str(tmp_path / "c")))
    assert m["valid"]["n"] == 12
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "framing.safetensors").is_file()


def test_image_modes_are_converted(tmp_path):
    rgb = face(1, 40)
    variants = {
        "gray.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"), "pal.gif": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"), "i16.png": Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)),
        "wide.bmp": rgb.resize((80, 40)), "x.tiff": rgb, "x.webp": rgb,
    }
    for name, img in variants.items():
        img.save(tmp_path / name)
        t = load_image(tmp_path / name, 24)
        assert t.shape == (3, 24, 24) and t.dtype == torch.uint8, name
    # 16-bit is scaled, not clipped to white
    assert 20 < load_image(tmp_path / "i16.png", 24).float().mean() < 235


# ------------------------------------------------------------------ cache

def test_cache_reused_and_rebuilt_when_key_changes(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "d", n=6)
    samples = RVF10K(root, "train").samples
    cache = tmp_path / "cache"
    a = build_cache(samples, 16, cache_dir=cache, num_workers=2, progress=False)
    assert a.images.shape == (12, 3, 16, 16) and isinstance(a.images, np.memmap)
    files = sorted(cache.glob("*.npy"))
    with caplog.at_level(logging.INFO):
        b = build_cache(samples, 16, cache_dir=cache, num_workers=2, progress=False)
    assert "using decode cache" in caplog.text and sorted(cache.glob("*.npy")) == files
    assert np.array_equal(a.images, b.images)
    build_cache(samples, 24, cache_dir=cache, progress=False)  # new size -> new file
    build_cache(samples, 16, interpolation="bicubic", cache_dir=cache, progress=False)  # new method
    build_cache(samples[:-1], 16, cache_dir=cache, progress=False)  # new file list
    assert len(list(cache.glob("*.npy"))) == 4
    # pixels are exactly what load_image gives (the app and CLI use it)
    x, y = b.__getitems__([3, 0])
    assert torch.equal(x[0], load_image(samples[3][0], 16)) and y.tolist() == [samples[3][1], samples[0][1]]


def test_cache_key_covers_pillows_decoder(monkeypatch, tmp_path):
    import PIL

    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    samples = RVF10K(root, "train").samples
    key = cache_key(samples, 16, "bilinear")
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    assert cache_key(samples, 16, "bilinear") != key


def test_cache_key_sees_an_image_replaced_with_its_size_and_mtime_kept(tmp_path):
    import os
    import shutil
    import time

    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    samples = RVF10K(root, "train").samples
    key = cache_key(samples, 16, "bilinear")
    assert cache_key(samples, 16, "bilinear") == key  # reading changes nothing
    a, b = (Path(p) for p, _ in samples[:2])
    time.sleep(0.05)  # past a clock tick: kernels before 6.13 stamp ctime at jiffy (1-10 ms) resolution
    st = a.stat()
    data = bytearray(a.read_bytes())
    data[-3] ^= 0xFF  # other pixels, same size
    a.write_bytes(bytes(data))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the mtime put back
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    assert cache_key(samples, 16, "bilinear") != key
    key = cache_key(samples, 16, "bilinear")
    shutil.copy2(b, tmp_path / "b.jpg")  # cp -p of an edited copy back over the original
    os.replace(tmp_path / "b.jpg", b)
    assert cache_key(samples, 16, "bilinear") != key


def test_a_one_worker_build_gives_the_threads_back(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", num_workers=1, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_truncated_or_stale_cache_is_rebuilt(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=4)
    samples = RVF10K(root, "train").samples
    a = build_cache(samples, 16, cache_dir=tmp_path, progress=False)
    expected = np.array(a.images)
    npy = next(tmp_path.glob("*.npy"))
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)
    b = build_cache(samples, 16, cache_dir=tmp_path, progress=False)
    assert np.array_equal(np.asarray(b.images), expected)
    # a JSON from another key (stale) is not trusted either
    meta = npy.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "other"}))
    c = build_cache(samples, 16, cache_dir=tmp_path, progress=False)
    assert np.array_equal(np.asarray(c.images), expected)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_killed_builds_temp_file_is_cleared_by_the_next_build(tmp_path):
    import os
    import time

    root = make_folder_dataset(tmp_path / "d", n=4)
    samples = RVF10K(root, "train").samples
    npy = build_cache(samples, 16, cache_dir=tmp_path, progress=False) and next(tmp_path.glob("*.npy"))
    npy.unlink()  # so that the next call builds again
    old = npy.with_name(f"{npy.name}.4242.deadbeef.tmp")  # SIGKILLed two hours ago
    live = npy.with_name(f"{npy.name}.4343.cafef00d.tmp")  # another build, writing right now
    for p in (old, live):
        p.write_bytes(b"\0" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    build_cache(samples, 16, cache_dir=tmp_path, progress=False)
    assert not old.exists() and live.exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fallocate"), reason="no posix_fallocate here")
def test_a_full_disk_is_one_error_before_decoding(tmp_path, monkeypatch):
    """The cache file is reserved up front: a full disk was a SIGBUS in a decoder (a crash, or a hung pool)."""
    import errno
    import os

    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"No space left on device: the decode cache needs .* MB.*RVF_CACHE_DIR") as e:
        build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", progress=False)
    assert e.value.filename.endswith(".npy") and not list((tmp_path / "c").iterdir())


def test_a_cache_dir_that_is_a_file_is_named_as_such(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    (tmp_path / "c").write_text("")
    with pytest.raises(NotADirectoryError, match=r"the decode cache folder is a file.*RVF_CACHE_DIR"):
        build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", progress=False)


def test_cache_loader_batches(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=6)
    cached = build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", progress=False)
    loader = torch.utils.data.DataLoader(cached, batch_size=5, shuffle=True, collate_fn=collate_batch)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (5, 3, 16, 16)


def test_device_loader_epochs_shards_and_contents(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n=7)  # 14 images
    cached = build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", progress=False)
    part = cached.subset(np.arange(1, 14)[::-1])  # 13 images, out of file order
    rows = {img.numpy().tobytes(): int(y) for img, y in (part[i] for i in range(len(part)))}

    def epoch(loader, e):
        loader.set_epoch(e)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    full = DeviceLoader(part, 4, "cpu", drop_last=False, seed=3)
    assert len(full) == 4 and full.nbytes == part.nbytes == 13 * 3 * 16 * 16
    x, y = epoch(full, 0)
    # every image exactly once per epoch, with its own label
    assert sorted(img.numpy().tobytes() for img in x) == sorted(rows)
    assert all(rows[img.numpy().tobytes()] == int(t) for img, t in zip(x, y))
    # the order is a function of (seed, epoch) only: a resumed run sees the same batches
    again = DeviceLoader(part, 4, "cpu", drop_last=False, seed=3)
    assert torch.equal(epoch(again, 0)[0], x) and not torch.equal(epoch(again, 1)[0], x)
    # DDP: equal, disjoint shards; drop_last drops the ragged batch
    shards = [DeviceLoader(part, 4, "cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1]
    shards = [DeviceLoader(part, 2, "cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    got = [epoch(s, 5)[0] for s in shards]
    assert [len(g) for g in got] == [6, 6]
    keys = [{img.numpy().tobytes() for img in g} for g in got]
    assert not keys[0] & keys[1]
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(part, 0, "cpu")


def test_a_stratified_sample_has_exactly_the_count_asked():
    from rvf.data import stratified_sample

    targets = [0] * 1500 + [1] * 1500
    for n in (1000, 1500, 2000, 7):  # as fractions, 1000 and 2000 of 3,000 rounded to 999 and 1999
        keep = stratified_sample(targets, n, seed=0)
        assert len(keep) == n and np.ptp(np.bincount(np.asarray(targets)[keep], minlength=2)) <= 1
    assert len(stratified_sample(targets, 5000, seed=0)) == 3000


def test_holdout_is_stratified_and_seeded():
    targets = [0] * 50 + [1] * 50
    fit, held = holdout_split(targets, 0.2, seed=3)
    assert len(held) == 20 and np.bincount(np.asarray(targets)[held]).tolist() == [10, 10]
    assert not set(fit) & set(held)
    assert np.array_equal(held, holdout_split(targets, 0.2, seed=3)[1])
    assert not np.array_equal(held, holdout_split(targets, 0.2, seed=4)[1])


# ------------------------------------------------------------------ transforms

def test_transforms_follow_the_model_config():
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 48, 48), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3)}
    cfg = resolve_data_config(model)
    assert cfg.image_size == 48 and cfg.mean == (0.4, 0.5, 0.6)
    assert resolve_data_config(model, image_size=96).image_size == 96
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    y = build_eval_transform(cfg)(x)
    assert torch.allclose(y[:, 0], torch.tensor((1 - 0.4) / 0.2)) and y.dtype == torch.float32
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_train_augment_is_per_sample():
    cfg = DataConfig(16, (0.5,) * 3, (0.5,) * 3)
    x = torch.arange(16, dtype=torch.uint8).repeat(64, 3, 16, 1)  # every image a left-right ramp
    torch.manual_seed(0)
    y = build_train_transform(cfg, hflip=0.5)(x)
    flipped = y[:, 0, 0, 0] > y[:, 0, 0, -1]
    assert 10 < flipped.sum() < 54  # some flipped, some not: per-sample draws
    z = build_train_transform(cfg, scale=(0.5, 1.0), brightness=0.2, contrast=0.2)(x)
    assert z.shape == (64, 3, 16, 16) and torch.isfinite(z).all()


def test_translate_moves_whole_pixels_per_sample():
    cfg = DataConfig(16, (0.0,) * 3, (1 / 255,) * 3)  # normalisation is the identity on 0..255
    torch.manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    y = build_train_transform(cfg, translate=3)(x)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x.float(), (3, 3, 3, 3), mode="reflect")
    shifts = []
    for i in range(len(x)):
        # Each output is exactly one window of the reflect-padded input: no resampling.
        hits = [(dy, dx) for dy in range(7) for dx in range(7)
                if torch.equal(y[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert hits, f"sample {i} is not a whole-pixel shift"
        shifts.append(hits[0])
    assert len(set(shifts)) > 5  # drawn per sample


def test_crop_cuts_native_windows_per_sample():
    cfg = DataConfig(16, (0.0,) * 3, (1 / 255,) * 3)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    y = build_train_transform(cfg, crop_size=6)(x)
    assert y.shape == (32, 3, 6, 6)
    corners = []
    for i in range(len(x)):
        hits = [(r, c) for r in range(11) for c in range(11) if torch.equal(y[i], x[i, :, r:r + 6, c:c + 6].float())]
        assert hits, f"sample {i} is not a pixel-exact window"
        corners.append(hits[0])
    assert len(set(corners)) > 10  # drawn per sample
    with pytest.raises(ValueError, match="crop_size 20 is larger than the 16x16 images"):
        build_train_transform(cfg, crop_size=20)(x)


def test_downscale_matches_the_robustness_tests_degradation_on_some_samples():
    from PIL import Image

    from rvf.robustness import Perturbation

    cfg = DataConfig(32, (0.0,) * 3, (1 / 255,) * 3)  # normalisation is the identity on 0..255
    torch.manual_seed(0)
    # Smooth images: a bilinear resize of noise differs between PIL and torch at the edges only.
    x = torch.nn.functional.interpolate(torch.rand(64, 3, 8, 8) * 255, size=32, mode="bicubic").clamp(0, 255)
    x = x.round().to(torch.uint8)
    y = build_train_transform(cfg, downscale=0.5, downscale_range=(0.25, 0.25))(x)
    assert y.shape == x.shape
    changed = [i for i in range(len(x)) if not torch.equal(y[i], x[i].float())]
    assert 16 <= len(changed) <= 48  # drawn per image, p = 0.5
    for i in changed:
        pil = Perturbation("scale", 0.25)(Image.fromarray(x[i].permute(1, 2, 0).numpy()))
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        assert (y[i] - ref).abs().mean() < 1, f"sample {i} is not the 0.25x round trip"  # 0.5x: 16 of 255
    with pytest.raises(ValueError, match="downscale_range"):
        build_train_transform(cfg, downscale=0.5, downscale_range=(0.0, 1.0))


def test_random_erasing_touches_only_some_samples():
    cfg = DataConfig(16, (0.5,) * 3, (0.5,) * 3)
    x = torch.full((64, 3, 16, 16), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    import random
    random.seed(0)  # timm's RandomErasing draws with Python's random
    y = build_train_transform(cfg, erase=0.5)(x)
    clean = build_eval_transform(cfg)(x)
    erased = (y != clean).flatten(1).any(1)
    assert 10 < erased.sum() < 54
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------ download

@pytest.fixture
def offline(monkeypatch):
    """No network for this test, whatever the machine has: kagglehub's real code meets a dead socket."""
    import socket

    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline in this test)")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)  # not Kaggle's notebook cache either


def test_download_without_network_fails_fast_with_instructions(tmp_path, offline):
    import time

    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match=r"kaggle\.com/datasets/sachchitkunichetty/rvf10k.*--data-dir"):
        download_rvf10k(tmp_path / "dl")
    assert time.perf_counter() - t0 < 30


def _download_script():
    spec = importlib.util.spec_from_file_location("download_script", ROOT / "scripts" / "download_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_exit_status_says_whose_fault(tmp_path, offline, capsys):
    script = _download_script()
    parse = script.get_args_parser().parse_args
    assert script.main(parse(["--dest", str(tmp_path / "dl")])) == 1  # the network's: as train.py's
    assert re.search(r"could not reach Kaggle \(\w+: [\w.]*kaggle\.com unreachable", capsys.readouterr().err)
    make_kaggle_dataset(tmp_path / "half" / "v1", n=2)
    next((tmp_path / "half" / "v1" / "rvf10k" / "valid").rglob("*.jpg")).unlink()  # a half-extracted copy
    assert script.main(parse(["--dest", str(tmp_path / "half")])) == 2
    err = capsys.readouterr().err
    assert "pass --force to download it again" in err and "valid" in err


def test_download_script_reuses_an_existing_copy(tmp_path):
    make_kaggle_dataset(tmp_path / "dl" / "v1", n=2)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/download_data.py"), "--dest", str(tmp_path / "dl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "dl" / "v1")


# ------------------------------------------------------------------ the real data (CI has it)

@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"{SHARED_MINI} not present (rvf10k-mini ships with CI only)")
def test_rvf10k_mini_counts_and_labels(tmp_path):
    for split, n in (("train", 500), ("valid", 200)):
        ds = RVF10K(SHARED_MINI, split)
        assert ds.layout == "kaggle"
        assert np.bincount(ds.targets).tolist() == [n, n]
        assert all(Path(p).parent.name == ds.classes[y] for p, y in ds.samples)
    cached = build_cache(RVF10K(SHARED_MINI, "valid").samples, 64, cache_dir=tmp_path, progress=False)
    assert cached.images.shape == (400, 3, 64, 64)


def test_a_decode_pool_that_cannot_start_says_why(tmp_path, monkeypatch):
    import rvf.data.cache as cache

    class NoPool(cache.ProcessPoolExecutor):
        def submit(self, *args, **kwargs):  # where an executor forks its workers
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(cache, "ProcessPoolExecutor", NoPool)
    root = make_folder_dataset(tmp_path / "d", n=2, splits=("train",))
    with pytest.raises(OSError, match="Too many open files"):  # was: UnboundLocalError for the pool
        build_cache(RVF10K(root, "train").samples, 16, cache_dir=tmp_path / "c", num_workers=2, progress=False)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # no half-written cache left behind



# Run in a subprocess, so that a hang fails the test instead of stopping the suite.
KILL_ONE_DECODER = """
import os, signal, sys
import rvf.data.cache as cache
from rvf.data import RVF10K, build_cache
parent, decode = os.getpid(), cache.load_image
def oom_killed(path, *args):
    if os.getpid() != parent and path.endswith(os.path.join("real", "00001.jpg")):  # one, as the OOM killer picks
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(path, *args)
cache.load_image = oom_killed
build_cache(RVF10K(sys.argv[1], "train").samples, 16, cache_dir=sys.argv[2], num_workers=2, progress=False)
"""


def test_a_decode_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    # multiprocessing.Pool replaced a killed worker and waited forever for its chunk: training hung, silent.
    import time

    root = make_folder_dataset(tmp_path / "d", n=8, splits=("train",))
    assert (root / "train" / "real" / "00001.jpg").is_file()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", KILL_ONE_DECODER, str(root), str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and time.perf_counter() - t0 < 60, r.stderr[-2000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("ChildProcessError: [Errno 10] a decoding process died while building the split "
                            "decode cache"), error
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # no half-written cache left behind


# The building process stalls its workers in their first image, then waits to be killed.
BUILDER_KILLED = """
import os, sys, time
import rvf.data.cache as cache
from rvf.data import RVF10K
root, cache_dir, pids = sys.argv[1:]
def load_and_stall(path, *args):
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(120)
cache.load_image = load_and_stall  # forked decoding processes inherit it
cache.build_cache(RVF10K(root, "train").samples, 16, cache_dir=cache_dir, num_workers=2, progress=False)
"""


def test_decoding_processes_exit_when_the_build_is_killed(tmp_path):
    """The building process SIGKILLed (the OOM killer's likeliest pick): its decoding processes exit
    too, instead of waiting for work forever (as an executor's do, left to themselves)."""
    import contextlib
    import os
    import signal
    import time

    def alive(pid):  # a zombie awaits its reaper only
        stat = Path(f"/proc/{pid}/stat")
        return stat.is_file() and stat.read_text().rpartition(")")[2].split()[0] != "Z"

    root, pids = make_folder_dataset(tmp_path / "d", n=6, splits=("train",)), tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-c", BUILDER_KILLED, str(root), str(tmp_path / "c"), str(pids)],
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(set(pids.read_text().split()) if pids.exists() else ()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = set(pids.read_text().split())
        assert len(workers) == 2, "the decoding processes did not start"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group

def test_a_splits_file_list_id_names_its_images_not_where_they_are(tmp_path):
    import shutil

    root = make_kaggle_dataset(tmp_path / "a", n=4)
    first = RVF10K(root, "train").file_list_id()
    assert first["files"] == 8
    shutil.copytree(root, tmp_path / "b")
    assert RVF10K(tmp_path / "b", "train").file_list_id() == first  # moved: the same list
    csv_path = tmp_path / "b/train.csv"
    csv_path.write_text("".join(csv_path.read_text().splitlines(keepends=True)[:-1]))  # one image fewer
    assert RVF10K(tmp_path / "b", "train").file_list_id()["sha256"] != first["sha256"]
