"""benchmarks/flagship_sweep.py: variants, the holdout pick, the time budget, and a toy sweep end to end."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synth import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("flagship_sweep", ROOT / "benchmarks" / "flagship_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep  # its dataclass looks its module up there
_spec.loader.exec_module(sweep)


def test_a_variant_is_a_config_and_its_overrides_with_a_file_safe_name():
    v = sweep.Variant.parse('configs/flagship_alexnet_bn.yaml epochs=80 \'model_args={"stem_stride":2}\'')
    assert v.config == Path("configs/flagship_alexnet_bn.yaml")
    assert v.overrides == ["epochs=80", 'model_args={"stem_stride":2}']
    assert v.name == "flagship_alexnet_bn.epochs-80.model_args-stem_stride-2"
    assert sweep.Variant.parse("configs/lenet.yaml").name == "lenet"
    for bad in ("", "configs/lenet.yaml 'lr=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="not 'CONFIG"):
            sweep.Variant.parse(bad)


def test_every_bad_variant_is_named_before_anything_trains():
    variants = [sweep.Variant.parse(s) for s in
                ["configs/lenet.yaml epochs=1", "configs/lenet.yaml epohcs=1", "configs/nope.yaml",
                 "configs/lenet.yaml epochs=1"]]
    problems = sweep.check_variants(variants, common=[])
    assert len(problems) == 3, problems
    assert "lenet.epohcs-1" in problems[0] and "epohcs" in problems[0]
    assert "nope" in problems[1]
    assert problems[2] == "variant 'lenet.epochs-1' is given twice"
    assert sweep.check_variants(variants[:1], common=["colour=1"])  # the common overrides are checked too


def test_the_budget_expects_the_slowest_run_of_a_variant():
    now = [0.0]
    budget = sweep.Budget(100, clock=lambda: now[0])
    assert budget.expected("a") == 0 and budget.allows(100) and not budget.allows(100.5)
    budget.record("a", 30)
    budget.record("a", 20)
    budget.record("b", 50)
    assert budget.expected("a") == 30 and budget.expected("b") == 50 and budget.expected("c") == 50
    now[0] = 60.0
    assert budget.allows(budget.expected("a")) is True and budget.allows(budget.expected("b")) is False
    assert sweep.Budget(None, clock=lambda: now[0]).allows(1e9)


def _run(seed, hold_acc, hold_loss, valid_acc):
    metrics = {"accuracy": valid_acc, "roc_auc": valid_acc, "average_precision": valid_acc}
    return {"run": f"r{seed}", "seed": seed, "train_seconds": 10.0, "device": "cpu",
            "holdout": {"accuracy": hold_acc, "loss": hold_loss}, "valid": metrics}


def test_the_pick_is_holdout_accuracy_then_loss_never_valid():
    results = {"a": [_run(0, 0.90, 0.30, 0.99)], "b": [_run(0, 0.91, 0.40, 0.50)], "c": [_run(0, 0.91, 0.35, 0.60)],
               "d": []}
    assert sweep.pick_best(results) == "c"
    with pytest.raises(ValueError):
        sweep.pick_best({"d": []})


def test_the_summary_has_mean_std_and_the_ensemble():
    results = {"a": [_run(0, 0.9, 0.3, 0.80), _run(1, 0.9, 0.3, 0.90)], "b": [_run(0, 0.8, 0.3, 0.70)], "c": []}
    ens = {"a": {"valid": {"accuracy": 0.95, "roc_auc": 0.97}}}
    summary, table = sweep.summarize(results, ens)
    assert set(summary) == {"a", "b"}
    mean, std = summary["a"]["valid_accuracy_mean_std"]
    assert mean == pytest.approx(85.0) and std == pytest.approx(7.0711, abs=1e-4)
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| a | 0, 1 | 90.00 | 85.00 ± 7.07 |") and "95.00 / 0.9700" in rows[2]
    assert rows[3].startswith("| b | 0 | 80.00 | 70.00 ± 0.00 |") and "| - |" in rows[3]


@pytest.mark.slow
def test_a_toy_sweep_picks_on_the_holdout_then_trains_the_other_seeds(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=12, size=32)
    out, runs = tmp_path / "out", tmp_path / "runs"
    common = ["model=lenet", "image_size=32", "batch_size=8", "holdout=0.25", "lr=1e-3"]
    args = [sys.executable, "benchmarks/flagship_sweep.py", "--data-dir", str(data), "--out", str(out),
            "--runs-root", str(runs), "--seeds", "3", "4", "--select",
            "--variants", "configs/lenet.yaml epochs=3", "configs/lenet.yaml epochs=1 lr=1e-9"]
    for o in common:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(RVF_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path))
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "flagship.json").read_text())
    # A learning rate of 1e-9 cannot learn the synthetic task, so the pick is the other variant.
    picked, other = summary["variants"]["lenet.epochs-3"], summary["variants"]["lenet.epochs-1.lr-1e-9"]
    assert [r["seed"] for r in picked["runs"]] == [3, 4] and [r["seed"] for r in other["runs"]] == [3]
    assert picked["ensemble"]["members"] == ["lenet.epochs-3_seed3", "lenet.epochs-3_seed4"]
    assert other["ensemble"] is None and summary["skipped"] == [] and summary["failed"] == []
    assert "picked on the holdout slice: lenet.epochs-3" in r.stdout
    assert sorted(summary["ensemble_all"]["members"]) == sorted(
        ["lenet.epochs-3_seed3", "lenet.epochs-3_seed4", "lenet.epochs-1.lr-1e-9_seed3"])
    assert "All 3 runs as one ensemble: valid " in (out / "flagship.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["flagship.json", "flagship.md", "lenet.epochs-3_seed3.log", "lenet.epochs-3_seed4.log",
         "lenet.epochs-1.lr-1e-9_seed3.log", "lenet.epochs-3_ensemble.log", "all_ensemble.log"])  # no checkpoint


def test_a_typo_stops_the_sweep_before_any_run(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/flagship_sweep.py", "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "out"), "--variants", "configs/lenet.yaml lr=1e-3 epoch=3"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "epoch" in r.stderr and "lenet.lr-1e-3.epoch-3" in r.stderr
    assert not (tmp_path / "out").exists()
