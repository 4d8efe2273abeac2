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
    diff = {q: np.abs(np.asarray(Perturbation("jpeg", q)(img), float) - np.asarray(img, float)).mean() for q in (95, 50)}
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
