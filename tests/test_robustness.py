"""scripts/robustness.py: every condition runs, and "clean" equals evaluate.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rvf.robustness import PERTURBATIONS, Perturbation
from synth import face, make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_perturbations_degrade_as_named():
    img = face(0, 64, seed=1)
    for p in PERTURBATIONS:
        out = p(img, seed=3)
        assert out.size == img.size and out.mode == "RGB", p.name
    assert np.array_equal(np.asarray(Perturbation("clean")(img)), np.asarray(img))
    change = lambda p: np.abs(np.asarray(p(img), float) - np.asarray(img, float)).mean()  # noqa: E731
    diff = {q: change(Perturbation("jpeg", q)) for q in (95, 50)}
    assert diff[50] > diff[95] > 0  # lower quality, larger change
    noisy = [np.asarray(Perturbation("noise", 8)(img, seed=s)) for s in (1, 1, 2)]
    assert np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], noisy[2])  # seeded per image
    with pytest.raises(ValueError, match="unknown perturbation"):
        Perturbation("rotate", 10)


@pytest.mark.parametrize("tta_hflip", [False, True], ids=["plain", "tta_hflip"])
def test_robustness_script_clean_row_matches_evaluate(tmp_path, tta_hflip):
    from conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", tta_hflip=tta_hflip)
    data = make_folder_dataset(tmp_path / "data", n=6, size=48, splits=("valid",))
    env_cmd = [sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", str(checkpoint),
               "--data-dir", str(data), "--output-dir", str(tmp_path / "rob"), "--num-workers", "0"]
    r = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert [row["perturbation"] for row in result["rows"]] == [p.name for p in PERTURBATIONS]
    assert (tmp_path / "rob" / "robustness.png").stat().st_size > 0
    assert "jpeg 75" in (tmp_path / "rob" / "robustness.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), "--checkpoint", str(checkpoint),
                        "--data-dir", str(data), "--output-dir", str(tmp_path / "ev")],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "RVF_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    ev_all = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev_all["tta_hflip"] is tta_hflip  # evaluate follows the model's own setting
    ev = ev_all["valid"]
    assert result["rows"][0]["accuracy"] == pytest.approx(ev["accuracy"])
    assert result["rows"][0]["roc_auc"] == pytest.approx(ev["roc_auc"])


def test_a_shift_moves_the_picture_and_repeats_its_edges():
    img = face(0, 32, seed=2)
    a, out = np.asarray(img), np.asarray(Perturbation.parse("shift:3")(img))
    assert out.shape == a.shape
    assert np.array_equal(out[3:, 3:], a[:-3, :-3])  # moved down and right
    assert np.array_equal(out[:3, 3:], np.broadcast_to(a[:1, :-3], (3, 29, 3)))  # top row repeated
    assert np.array_equal(out[3:, :3], np.broadcast_to(a[:-3, :1], (29, 3, 3)))  # left column repeated
    assert Perturbation.parse("shift:2").name == "shift 2" and Perturbation.parse("clean").name == "clean"
    for bad in ("shift:1.5", "shift:-1", "jpeg:high", "rotate:10"):
        with pytest.raises(ValueError, match=f"perturbation '{bad}'"):
            Perturbation.parse(bad)


def test_robustness_script_runs_the_perturbations_asked_for(tmp_path):
    from conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    data = make_folder_dataset(tmp_path / "data", n=4, size=48, splits=("valid",))
    cmd = [sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", str(checkpoint),
           "--data-dir", str(data), "--output-dir", str(tmp_path / "rob"), "--num-workers", "0",
           "--perturbations", "clean", "shift:2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "rob" / "robustness.json").read_text())["rows"]
    assert [row["perturbation"] for row in rows] == ["clean", "shift 2"]
    r = subprocess.run(cmd[:-2] + ["shift:0.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "whole number of pixels" in r.stderr
