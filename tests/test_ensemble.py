"""Ensembles of trained runs: the mean of the members' probabilities, calibrated on a shared holdout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rvf.config import TrainConfig
from rvf.ensemble import EnsembleError, evaluate_ensemble
from rvf.train import train
from synth import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small trained runs on the same data and holdout (LeNet at 32 px, AlexNet at 40 px with flips)."""
    tmp = tmp_path_factory.mktemp("ens")
    data = make_folder_dataset(tmp / "data", n=12, size=48)
    base = dict(data_dir=str(data), epochs=2, batch_size=8, lr=1e-3, holdout=0.25, tracker="none",
                cache_dir=str(tmp / "cache"), model_args={"drop_rate": 0.0})
    a = train(TrainConfig(model="lenet", image_size=32, output_dir=str(tmp / "lenet"), **base))
    b = train(TrainConfig(model="alexnet", image_size=40, tta_hflip=True, output_dir=str(tmp / "alexnet"), **base))
    c = train(TrainConfig(model="lenet", image_size=32, seed=7, output_dir=str(tmp / "lenet_seed7"), **base))
    d = train(TrainConfig(model="lenet", image_size=32, seed=7, split_seed=42, output_dir=str(tmp / "lenet_s7_split42"),
                          **base))
    e = train(TrainConfig(model="lenet", image_size=32, subset=16, output_dir=str(tmp / "lenet_subset16"), **base))
    return tmp, data, {"lenet": a, "alexnet": b, "lenet_seed7": c, "lenet_s7_split42": d, "lenet_subset16": e}


def test_ensemble_averages_members_and_calibrates_on_holdout(runs):
    tmp, data, metrics = runs
    m = evaluate_ensemble([tmp / "lenet", tmp / "alexnet"], data, tmp / "out", cache_dir=str(tmp / "cache"))
    # Each member is scored as its own run scored itself (its size, its flips, its threshold).
    for member, name in zip(m["members"], ("lenet", "alexnet")):
        assert member["model"] == name
        assert member["valid"]["roc_auc"] == pytest.approx(metrics[name]["valid"]["roc_auc"])
        assert member["valid"]["accuracy"] == pytest.approx(metrics[name]["valid"]["accuracy"])
    assert [r["image_size"] for r in m["members"]] == [32, 40] and m["members"][1]["tta_hflip"] is True
    table = np.loadtxt(tmp / "out" / "probabilities.csv", delimiter=",", skiprows=1)
    assert table.shape == (24, 4)
    np.testing.assert_allclose(table[:, 1], table[:, 2:].mean(1), atol=2e-6)  # mean P(fake)
    assert m["valid"]["n"] == 24 and m["holdout"]["n"] == 6 and 0 <= m["threshold"] <= 1
    assert m["valid"]["threshold"] == m["threshold"]
    saved = json.loads((tmp / "out" / "metrics.json").read_text())
    assert saved["valid"]["accuracy"] == m["valid"]["accuracy"]
    for name in ("classification_report.txt", "confusion_matrix.png", "roc.png"):
        assert (tmp / "out" / name).stat().st_size > 0


def test_members_must_share_the_holdout_slice(runs):
    tmp, data, metrics = runs
    with pytest.raises(EnsembleError, match=r"lenet_seed7 held out another slice of train \(split seed 7"):
        evaluate_ensemble([tmp / "lenet", tmp / "lenet_seed7"], data, cache_dir=str(tmp / "cache"))
    # Another training seed on the same slice (split_seed) is a valid member.
    m = evaluate_ensemble([tmp / "lenet", tmp / "lenet_s7_split42"], data, cache_dir=str(tmp / "cache"))
    assert m["holdout"]["n"] == 6 and len(m["members"]) == 2
    # A run on a `subset` held out a slice of that subset: the ensemble rebuilds exactly it.
    with pytest.raises(EnsembleError, match="subset 16"):
        evaluate_ensemble([tmp / "lenet", tmp / "lenet_subset16"], data, cache_dir=str(tmp / "cache"))
    m = evaluate_ensemble([tmp / "lenet_subset16", tmp / "lenet_subset16"], data, cache_dir=str(tmp / "cache"))
    counts = metrics["lenet_subset16"]["counts"]
    assert (m["holdout"]["n"], m["valid"]["n"]) == (counts["holdout"], counts["valid"]) == (4, 16)
    with pytest.raises(EnsembleError, match="at least two checkpoints"):
        evaluate_ensemble([tmp / "lenet"], data)


def test_cli_prints_members_and_ensemble(runs):
    tmp, data, _ = runs
    cmd = [sys.executable, "scripts/ensemble.py", "--data-dir", str(data), "--cache-dir", str(tmp / "cache")]
    r = subprocess.run([*cmd, "--checkpoints", str(tmp / "lenet"), str(tmp / "alexnet")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert "valid split" in lines[0] and lines[-1].startswith("ensemble (mean P(fake))") and len(lines) == 5
    r = subprocess.run([*cmd, "--checkpoints", str(tmp / "lenet"), str(tmp / "missing")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
