"""benchmarks/alignment.py: each face's offset from the template, and the script on a tiny dataset."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from synth import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("alignment", ROOT / "benchmarks" / "alignment.py")
alignment = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = alignment
_spec.loader.exec_module(alignment)


def _smooth_face(size: int, seed: int = 0) -> torch.Tensor:
    """A random blurry image: structure at every place, so every shift gives a different window."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size // 4, size // 4, generator=g)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0] * 255


def test_offsets_recover_known_shifts_whatever_the_brightness():
    template = _smooth_face(64)
    shifts = [(0, 0), (2, -1), (-3, 3), (1, 0), (0, -2)]
    # torch.roll moves content down/right for positive shifts; a gain and an offset must not matter.
    faces = torch.stack([0.5 * torch.roll(template, s, dims=(0, 1)) + 20 * k for k, s in enumerate(shifts)])
    offsets, corr = alignment.face_offsets(faces, template, max_shift=3)
    assert offsets.tolist() == [list(s) for s in shifts]
    assert torch.allclose(corr, torch.ones(len(shifts)), atol=1e-4)


def test_a_shift_that_leaves_the_image_is_refused():
    with pytest.raises(ValueError, match="max_shift 30"):
        alignment.face_offsets(torch.zeros(1, 64, 64), torch.zeros(64, 64), max_shift=30)


def test_script_reports_both_classes_and_an_auc(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RVF_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder_dataset(tmp_path / "data", n=6)
    args = alignment.get_args_parser().parse_args(["--data-dir", str(root), "--image-size", "32", "--max-shift", "2"])
    result = alignment.main(args)
    out = capsys.readouterr().out
    assert set(result) == {"fake", "real", "auc"} and 0 <= result["auc"] <= 1
    assert "fake: offset std" in out and "real: offset std" in out and "ROC AUC" in out
