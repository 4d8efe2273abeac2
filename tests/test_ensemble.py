"""Ensembles of trained runs: the mean of the members' probabilities, calibrated on a shared holdout."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synth import make_folder_dataset

from rvf.checkpoint import CheckpointError, load_pretrained, save_pretrained, weights_sha256
from rvf.config import TrainConfig
from rvf.data import RVF10K, DatasetError, holdout_split
from rvf.ensemble import EnsembleError, evaluate_ensemble, member_names, sub_ensembles
from rvf.inference import EnsemblePredictor, Predictor, load_predictor
from rvf.metrics import calibrate_threshold, classification_metrics
from rvf.train import train

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
    # Two trained on all of train (holdout 0), with split seeds that draw nothing.
    all_train = base | {"holdout": 0.0}
    f = train(TrainConfig(model="lenet", image_size=32, output_dir=str(tmp / "lenet_all"), **all_train))
    g = train(TrainConfig(model="alexnet", image_size=40, seed=7, output_dir=str(tmp / "alexnet_all_seed7"),
                          **all_train))
    return tmp, data, {"lenet": a, "alexnet": b, "lenet_seed7": c, "lenet_s7_split42": d, "lenet_subset16": e,
                       "lenet_all": f, "alexnet_all_seed7": g}


def test_ensemble_averages_members_and_calibrates_on_holdout(runs):
    tmp, data, metrics = runs
    m = evaluate_ensemble([tmp / "lenet", tmp / "alexnet"], data, tmp / "out", cache_dir=str(tmp / "cache"))
    # Each member is scored as its own run scored itself (its size, its flips, its threshold).
    for member, name in zip(m["members"], ("lenet", "alexnet")):
        assert member["model"] == name
        assert member["valid"]["roc_auc"] == pytest.approx(metrics[name]["valid"]["roc_auc"])
        assert member["valid"]["accuracy"] == pytest.approx(metrics[name]["valid"]["accuracy"])
    assert [r["image_size"] for r in m["members"]] == [32, 40] and m["members"][1]["tta_hflip"] is True
    # evaluate.py's columns (label, p_fake, path), then one per member named after its run.
    with open(tmp / "out" / "probabilities.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["label", "p_fake", "path", "p_fake:lenet", "p_fake:alexnet"] and len(rows) == 25
    assert [r[2] for r in rows[1:]] == [path for path, _ in RVF10K(data, "valid").samples]
    assert all(int(r[0]) == ("fake", "real").index(Path(r[2]).parent.name) for r in rows[1:])
    table = np.array([[float(v) for v in r[:2] + r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(table[:, 1], table[:, 2:].mean(1), atol=2e-6)  # mean P(fake)
    assert m["valid"]["n"] == 24 and m["holdout"]["n"] == 6 and 0 <= m["threshold"] <= 1
    assert m["valid"]["threshold"] == m["threshold"]
    saved = json.loads((tmp / "out" / "metrics.json").read_text())
    assert saved["valid"]["accuracy"] == m["valid"]["accuracy"]
    assert saved["sub_ensembles"]["sizes"][-1]["accuracy"] == m["valid"]["accuracy"]
    assert saved["sub_ensembles"]["sizes"][0]["accuracy"] == pytest.approx(
        np.mean([member["valid"]["accuracy"] for member in m["members"]]))
    for name in ("classification_report.txt", "confusion_matrix.png", "roc.png"):
        assert (tmp / "out" / name).stat().st_size > 0
    report = (tmp / "out" / "classification_report.txt").read_text()
    assert f"Accuracy at calibrated threshold {m['threshold']:.4f}:" in report
    # The threshold, recomputed: the holdout slice the runs drew (holdout 0.25, seed 42), each member's
    # P(fake) for it as it serves one, their mean, calibrated on P(fake) (column 0, not P(real)).
    train_set = RVF10K(data, "train")
    _, held = holdout_split(train_set.targets, 0.25, 42)
    assert len(held) == m["holdout"]["n"]
    paths, labels = [train_set.samples[i][0] for i in held], [train_set.targets[i] for i in held]
    p_fake = np.mean([[r.p_fake for r in Predictor.from_checkpoint(tmp / name).predict_sources(paths)]
                      for name in ("lenet", "alexnet")], axis=0)
    assert m["threshold"] == pytest.approx(calibrate_threshold(labels, p_fake), abs=1e-6)


def _members(m: int, n: int = 60, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and `m` noisy members' (N, 2) probabilities, each right about 70 % of the time."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    is_fake = labels == 0
    members = []
    for _ in range(m):
        p_fake = 1 / (1 + np.exp(-(np.where(is_fake, 0.6, -0.6) + rng.normal(0, 1.2, n))))
        members.append(np.stack([p_fake, 1 - p_fake], 1).astype(np.float32))
    return labels, members


def test_sub_ensembles_score_every_size_and_fit_many_more_members():
    labels, members = _members(4)
    r = sub_ensembles(labels, members)
    assert [s["members"] for s in r["sizes"]] == [1, 2, 3, 4] and [s["subsets"] for s in r["sizes"]] == [4, 6, 4, 1]
    single = [classification_metrics(labels, p) for p in members]
    whole = classification_metrics(labels, np.mean(members, axis=0))
    # Size 1 is the members' own scores, the full size the whole ensemble's, both as classification_metrics has them.
    assert r["sizes"][0]["accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in single]))
    assert (r["sizes"][0]["accuracy_min"], r["sizes"][0]["accuracy_max"]) == (
        min(m["accuracy"] for m in single), max(m["accuracy"] for m in single))
    assert r["sizes"][0]["roc_auc"] == pytest.approx(np.mean([m["roc_auc"] for m in single]))
    assert r["sizes"][-1]["accuracy"] == whole["accuracy"]
    assert r["sizes"][-1]["roc_auc"] == pytest.approx(whole["roc_auc"])
    for s in r["sizes"]:
        assert s["accuracy_min"] <= s["accuracy"] <= s["accuracy_max"]
    # Averaging noisy members helps, and the limit is the intercept of score = a - b/k over the sizes.
    assert r["sizes"][-1]["roc_auc"] > r["sizes"][0]["roc_auc"]
    design = np.column_stack([np.ones(4), -1 / np.arange(1, 5)])
    for key in ("accuracy", "roc_auc"):
        (a, b), *_ = np.linalg.lstsq(design, [s[key] for s in r["sizes"]], rcond=None)
        assert r["limit"][key] == pytest.approx(a) and b > 0


def test_sub_ensembles_sample_large_sizes_and_skip_the_fit_for_two():
    labels, members = _members(6)
    r = sub_ensembles(labels, members, max_subsets=5, seed=3)
    assert [s["subsets"] for s in r["sizes"]] == [5, 5, 5, 5, 5, 1]  # C(6, k) > 5 except k = 6
    assert r == sub_ensembles(labels, members, max_subsets=5, seed=3)  # seeded
    two = sub_ensembles(*_members(2))
    assert [s["subsets"] for s in two["sizes"]] == [2, 1] and two["limit"] is None
    one_class = sub_ensembles(labels[:30], [p[:30] for p in members[:3]])
    assert np.isnan(one_class["sizes"][0]["roc_auc"]) and 0 <= one_class["sizes"][0]["accuracy"] <= 1
    assert np.isnan(one_class["limit"]["roc_auc"]) and np.isfinite(one_class["limit"]["accuracy"])


def test_members_sharing_a_folder_name_get_columns_told_apart(tmp_path):
    # Run folders named alike (runs/a/best, runs/b/best) take as many parents as tell them apart.
    runs = [tmp_path / name for name in ("zoo/a/best", "zoo/b/best", "lenet", "x/a/best")]
    assert member_names(runs) == ["zoo/a/best", "b/best", "lenet", "x/a/best"]


def test_members_must_share_the_holdout_slice(runs):
    tmp, data, metrics = runs
    with pytest.raises(EnsembleError, match=r"lenet_seed7 held out another slice of train \(split seed 7"):
        evaluate_ensemble([tmp / "lenet", tmp / "lenet_seed7"], data, cache_dir=str(tmp / "cache"))
    # The same seed holding out a larger share is another slice too (the run's model.json says which).
    other_share = tmp / "lenet_holdout20"
    if not other_share.exists():
        shutil.copytree(tmp / "lenet", other_share)
        meta = json.loads((other_share / "model.json").read_text())
        meta["config"]["holdout"] = 0.2
        (other_share / "model.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match=r"lenet_holdout20 held out another slice of train \(split seed 42, "
                                            r"holdout 0.2, subset None\) than .*lenet \(split seed 42, holdout 0.25,"):
        evaluate_ensemble([tmp / "lenet", other_share], data, cache_dir=str(tmp / "cache"))
    # Another training seed on the same slice (split_seed) is a valid member.
    m = evaluate_ensemble([tmp / "lenet", tmp / "lenet_s7_split42"], data, cache_dir=str(tmp / "cache"))
    assert m["holdout"]["n"] == 6 and len(m["members"]) == 2
    # A run on a `subset` held out a slice of that subset: the ensemble rebuilds exactly it.
    with pytest.raises(EnsembleError, match="subset 16"):
        evaluate_ensemble([tmp / "lenet", tmp / "lenet_subset16"], data, cache_dir=str(tmp / "cache"))
    twin = tmp / "lenet_subset16_copy"
    if not twin.exists():
        shutil.copytree(tmp / "lenet_subset16", twin)
    m = evaluate_ensemble([tmp / "lenet_subset16", twin], data, cache_dir=str(tmp / "cache"))
    counts = metrics["lenet_subset16"]["counts"]
    assert (m["holdout"]["n"], m["valid"]["n"]) == (counts["holdout"], counts["valid"]) == (4, 16)
    with pytest.raises(EnsembleError, match="at least two checkpoints"):
        evaluate_ensemble([tmp / "lenet"], data)
    with pytest.raises(EnsembleError, match="listed twice"):
        evaluate_ensemble([tmp / "lenet", tmp / "alexnet", tmp / "lenet"], data)


def test_runs_trained_on_all_of_train_average_at_their_threshold(runs):
    tmp, data, metrics = runs
    members = [tmp / "lenet_all", tmp / "alexnet_all_seed7"]
    m = evaluate_ensemble(members, data, tmp / "out_all", cache_dir=str(tmp / "cache"))
    # Nothing held out: no holdout figures, and the 0.5 each member kept, not a calibrated one.
    assert m["holdout"] is None and [r["holdout"] for r in m["members"]] == [None, None]
    assert m["threshold"] == 0.5 and json.loads((tmp / "out_all" / "ensemble.json").read_text())["threshold"] == 0.5
    report = (tmp / "out_all" / "classification_report.txt").read_text()
    assert "at threshold 0.5000 (not calibrated: no holdout slice)" in report
    for member, name in zip(m["members"], ("lenet_all", "alexnet_all_seed7")):
        assert metrics[name]["counts"]["holdout"] == 0
        assert member["valid"]["accuracy"] == pytest.approx(metrics[name]["valid"]["accuracy"])
    labels, p_fake = np.loadtxt(tmp / "out_all" / "probabilities.csv", delimiter=",", skiprows=1,
                                usecols=(0, 1)).T
    assert m["valid"]["accuracy_at_threshold"] == pytest.approx(np.mean((p_fake >= 0.5) == (labels == 0)))
    # With a run that held a slice out, nothing is shared to calibrate on.
    with pytest.raises(EnsembleError, match=r"lenet_all held out another slice of train \(no holdout slice"):
        evaluate_ensemble([tmp / "lenet", tmp / "lenet_all"], data, cache_dir=str(tmp / "cache"))
    r = subprocess.run([sys.executable, "scripts/ensemble.py", "--data-dir", str(data), "--cache-dir",
                        str(tmp / "cache"), "--checkpoints", *map(str, members)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ensemble_row = r.stdout.splitlines()[4].split()
    assert ensemble_row[:5] == ["ensemble", "(mean", "P(fake))", "-", f"{m['valid']['accuracy']:.2%}"]


def test_without_a_holdout_slice_the_split_seed_matters_only_for_a_subset():
    from rvf.ensemble import _slice

    def same(**kw):
        return _slice(TrainConfig(holdout=0.0, seed=1, **kw)) == _slice(TrainConfig(holdout=0.0, seed=7, **kw))

    assert same()  # all of train, whatever the seed
    assert not same(subset=16)  # the seed drew which 16 images each trained and is scored on


def test_every_member_is_checked_before_any_is_scored(runs, monkeypatch):
    import rvf.ensemble
    import rvf.train

    tmp, data, _ = runs
    monkeypatch.setattr(rvf.train, "evaluate", lambda *a, **k: pytest.fail("scored a member before checking all"))
    with pytest.raises(CheckpointError, match="missing does not exist"):
        evaluate_ensemble([tmp / "lenet", tmp / "alexnet", tmp / "missing"], data, cache_dir=str(tmp / "cache"))
    with pytest.raises(EnsembleError, match="lenet_seed7 held out another slice"):
        evaluate_ensemble([tmp / "lenet", tmp / "alexnet", tmp / "lenet_seed7"], data, cache_dir=str(tmp / "cache"))


def test_an_ensemble_is_not_written_into_a_training_run(runs, monkeypatch):
    """--output-dir a member's folder replaced its metrics.json and made predict.py serve the ensemble."""
    import rvf.train

    tmp, data, _ = runs
    before = (tmp / "lenet" / "metrics.json").read_bytes()
    monkeypatch.setattr(rvf.train, "evaluate", lambda *a, **k: pytest.fail("scored a member before refusing"))
    for out in (tmp / "lenet", tmp / "lenet_seed7"):  # a member, or any other run
        with pytest.raises(EnsembleError, match=f"output dir {re.escape(str(out))} holds a training run"):
            evaluate_ensemble([tmp / "lenet", tmp / "alexnet"], data, out, cache_dir=str(tmp / "cache"))
    assert (tmp / "lenet" / "metrics.json").read_bytes() == before
    assert not (tmp / "lenet" / "ensemble.json").exists() and not (tmp / "lenet_seed7" / "ensemble.json").exists()


def test_cli_prints_members_and_ensemble(runs):
    tmp, data, _ = runs
    cmd = [sys.executable, "scripts/ensemble.py", "--data-dir", str(data), "--cache-dir", str(tmp / "cache")]
    r = subprocess.run([*cmd, "--checkpoints", str(tmp / "lenet"), str(tmp / "alexnet")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert "valid split" in lines[0] and lines[4].startswith("ensemble (mean P(fake))")
    # Then the ensembles of one and two members; two sizes are too few for a fit.
    assert lines[5:8] == ["", "smaller ensembles of these members (valid split, mean over the subsets of each size):",
                          "members  subsets  accuracy  (lowest - highest)  ROC AUC"]
    assert [line.split()[:2] for line in lines[8:]] == [["1", "2"], ["2", "1"]]
    r = subprocess.run([*cmd, "--checkpoints", str(tmp / "lenet"), str(tmp / "missing")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_cli_prints_the_table_once_under_several_processes(monkeypatch, capsys):
    # Every process gets the ensemble's figures back; under torchrun each printed the whole table.
    import importlib.util

    import accelerate

    import rvf.ensemble

    spec = importlib.util.spec_from_file_location("ensemble_script", ROOT / "scripts" / "ensemble.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    valid = {"accuracy": 0.75, "roc_auc": 0.8, "accuracy_at_threshold": 0.7}
    metrics = {"members": [], "valid": valid, "holdout": None, "sub_ensembles": {"sizes": [], "limit": None}}
    monkeypatch.setattr(rvf.ensemble, "evaluate_ensemble", lambda *args: metrics)
    args = script.get_args_parser().parse_args(["--checkpoints", "a", "b", "--data-dir", "d"])
    for main, printed in ((True, True), (False, False)):
        monkeypatch.setattr(accelerate.PartialState, "is_main_process", property(lambda self: main))
        assert script.main(args) == 0
        assert ("ensemble (mean P(fake))" in capsys.readouterr().out) == printed


@pytest.fixture(scope="module")
def served(runs):
    """An ensemble folder (ensemble.json) of the LeNet and AlexNet runs, as scripts/ensemble.py writes it."""
    tmp, data, _ = runs
    m = evaluate_ensemble([tmp / "lenet", tmp / "alexnet"], data, tmp / "serve", cache_dir=str(tmp / "cache"))
    return tmp / "serve", m


def test_an_ensemble_folder_serves_like_one_checkpoint(runs, served):
    """load_predictor gives the mean of the members' P(fake) at the ensemble's holdout threshold."""
    tmp, data, _ = runs
    folder, m = served
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert manifest["members"] == ["../lenet", "../alexnet"]  # relative: the tree can move
    assert manifest["weights_sha256"] == {"../lenet": weights_sha256(tmp / "lenet"),
                                          "../alexnet": weights_sha256(tmp / "alexnet")}
    ens = load_predictor(folder)
    assert isinstance(ens, EnsemblePredictor) and ens.threshold == m["threshold"]
    assert ens.model_name == "ensemble(lenet + alexnet)" and ens.image_size == 40
    info = ens.describe()
    assert info["valid_accuracy"] == m["valid"]["accuracy"]
    assert [d["model"] for d in info["members"]] == ["lenet", "alexnet"]

    files = sorted((data / "valid").rglob("*.jpg"))
    results = ens.predict_sources([str(f) for f in files], batch_size=7)  # chunks that split the classes
    members = [Predictor.from_checkpoint(tmp / name) for name in ("lenet", "alexnet")]
    each = np.array([[r.p_fake for r in p.predict_sources([str(f) for f in files])] for p in members])  # (2, N)
    np.testing.assert_allclose([r.p_fake for r in results], each.mean(0), atol=1e-6)
    assert all(r.label == ("fake" if r.p_fake >= m["threshold"] else "real") for r in results)
    # Served files score as the evaluation scored the valid split: the same accuracy at its threshold.
    correct = [r.label == f.parent.name for r, f in zip(results, files)]
    assert np.mean(correct) == pytest.approx(m["valid"]["accuracy_at_threshold"])


def test_an_upload_is_decoded_once_for_every_member_and_the_overlay(served, monkeypatch):
    import rvf.inference

    folder, _ = served
    ens = load_predictor(folder)
    calls = []
    real_open = rvf.inference.open_rgb
    monkeypatch.setattr(rvf.inference, "open_rgb", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(buf, "JPEG")
    results = ens.predict_sources([buf.getvalue(), buf.getvalue()], ["a.jpg", "b.jpg"], gradcam=True)
    assert all(r.ok and r.gradcam_png for r in results) and len(calls) == 2  # two members + overlay, one decode each


def test_a_threshold_of_never_fake_is_served(runs, tmp_path):
    # calibrate_threshold's "never fake" candidate is 1 + 1e-9: what ensemble.py writes, the app must read.
    from rvf.ensemble import write_manifest

    tmp, _, _ = runs
    write_manifest(tmp_path, [tmp / "lenet", tmp / "alexnet"], 1.0 + 1e-9, {"accuracy": 0.5})
    assert load_predictor(tmp_path).threshold == pytest.approx(1.0)


def test_an_ensemble_reports_bad_files_and_draws_one_heat_map(served):
    folder, _ = served
    ens = load_predictor(folder)
    good = (folder.parent / "data" / "valid" / "fake" / "00000.jpg").read_bytes()
    out = ens.predict_sources([good, b"not an image", good], ["a.jpg", "b.jpg", "c.jpg"], gradcam=True)
    assert [r.ok for r in out] == [True, False, True] and "b.jpg" in out[1].error
    assert out[0].p_fake == pytest.approx(out[2].p_fake)  # each member re-read the same upload
    png = Image.open(io.BytesIO(out[0].gradcam_png))
    assert png.format == "PNG" and png.size == (256, 256)


def test_web_app_and_predict_cli_take_an_ensemble_folder(runs, served):
    tmp, data, _ = runs
    folder, m = served
    from rvf.web import create_app

    client = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(folder)}).test_client()
    health = client.get("/api/health").get_json()
    assert health["model"] == "ensemble(lenet + alexnet)" and health["threshold"] == m["threshold"]
    image = data / "valid" / "real" / "00001.jpg"
    r = client.post("/api/predict", data={"image": (io.BytesIO(image.read_bytes()), "face.jpg")})
    assert r.status_code == 200 and r.get_json()["results"][0]["threshold"] == m["threshold"]
    assert b"ensemble(lenet + alexnet)" in client.get("/").data

    r = subprocess.run([sys.executable, "scripts/predict.py", "--checkpoint", str(folder), str(data / "valid")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.strip().splitlines()) == 1 + 24 and "predicted 24 of 24" in r.stderr
    # Tools that need one network say what the folder is instead of "no model.safetensors".
    r = subprocess.run([sys.executable, "scripts/export.py", "--checkpoint", str(folder), "--format", "torchscript"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "is an ensemble folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "not valid JSON"),
    ('{"kind": "something else"}', "not an rvf ensemble manifest"),
    ('{"kind": "rvf-ensemble", "members": ["../lenet"], "threshold": 0.5}', "at least two run folders"),
    ('{"kind": "rvf-ensemble", "members": ["../lenet", "../alexnet"], "threshold": 1.5}', "probability in"),
    ('{"kind": "rvf-ensemble", "members": ["../lenet", "../gone"], "threshold": 0.5}',
     "ensemble.json lists member .*gone"),
    ('{"kind": "rvf-ensemble", "members": ["../lenet", "../alexnet"], "weights_sha256": {"../lenet": "ab"}, '
     '"threshold": 0.5}', "weights_sha256"),
])
def test_a_bad_ensemble_manifest_is_named(runs, manifest, message):
    tmp, _, _ = runs
    folder = tmp / "bad_manifest"
    folder.mkdir(exist_ok=True)
    (folder / "ensemble.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=message):
        load_predictor(folder)
    r = subprocess.run([sys.executable, "scripts/app.py", "--checkpoint", str(folder)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and re.search(message, r.stderr) and "Traceback" not in r.stderr


def test_an_ensemble_refuses_a_member_changed_after_it_was_built(runs, tmp_path):
    """A member resumed since (a new best epoch) would be served at the ensemble's old threshold."""
    import torch

    from rvf.ensemble import write_manifest

    tmp, data, _ = runs
    for name in ("lenet", "alexnet"):  # copies: the module's runs stay as the other tests expect
        shutil.copytree(tmp / name, tmp_path / name)
    folder = tmp_path / "ens"
    folder.mkdir()
    write_manifest(folder, [tmp_path / "lenet", tmp_path / "alexnet"], 0.25, {"accuracy": 0.5})
    assert load_predictor(folder).threshold == 0.25  # unchanged members load

    # As `train.py --resume` replaces the best model: other weights, saved (with their own save id) by save_pretrained.
    model, meta, _ = load_pretrained(tmp_path / "lenet")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_pretrained(tmp_path / "lenet", model, meta)
    message = (r"ensemble.json lists member \S*lenet, whose model.safetensors has changed since the ensemble was "
               r"built .*re-run scripts/ensemble.py with the same --checkpoints")
    with pytest.raises(CheckpointError, match=message):
        load_predictor(folder)
    r = subprocess.run([sys.executable, "scripts/predict.py", "--checkpoint", str(folder), str(data / "valid")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0])

    # A manifest written before ensembles recorded their members' weights loads as it always did.
    manifest = json.loads((folder / "ensemble.json").read_text())
    del manifest["weights_sha256"]
    (folder / "ensemble.json").write_text(json.dumps(manifest))
    assert load_predictor(folder).threshold == 0.25


def test_members_must_have_trained_on_the_data_given(runs, tmp_path):
    tmp, data, _ = runs
    members = [tmp / "lenet", tmp / "lenet_s7_split42"]
    other = make_folder_dataset(tmp_path / "other", n=10, size=48)  # same settings draw other images here
    said = (r"lenet trained on another list of train images \(24 files, id \w+\) "
            rf"than {re.escape(str(other))} holds \(20 files.*it trained on {re.escape(str(data))}")
    with pytest.raises(DatasetError, match=said):
        evaluate_ensemble(members, other, cache_dir=str(tmp / "cache"))
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # the same images elsewhere: the same list
    assert evaluate_ensemble(members, moved, cache_dir=str(tmp / "cache"))["holdout"]["n"] == 6
    # Runs with no holdout slice have none to leak into: any data may score them.
    m = evaluate_ensemble([tmp / "lenet_all", tmp / "alexnet_all_seed7"], other, cache_dir=str(tmp / "cache"))
    assert m["holdout"] is None and m["valid"]["n"] == 20


def test_several_processes_score_a_member_that_decoded_per_file_from_the_cache(runs, tmp_path, monkeypatch):
    # Per-file decoding with skip_bad drops each process's unreadable files on its own, and the
    # batches the processes gather stop lining up; the ensemble decodes such a member up front.
    import accelerate

    import rvf.train

    tmp, data, _ = runs
    members = []
    for name in ("lenet", "lenet_s7_split42"):
        member = tmp_path / name
        shutil.copytree(tmp / name, member)
        meta = json.loads((member / "model.json").read_text())
        meta["config"].update(cache=False, skip_bad=True)
        (member / "model.json").write_text(json.dumps(meta))
        members.append(member)
    seen = []

    def load_splits(cfg, *args, **kwargs):
        seen.append((cfg.cache, cfg.skip_bad))
        raise RuntimeError("seen")

    monkeypatch.setattr(rvf.train, "load_splits", load_splits)
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(RuntimeError, match="seen"):
        evaluate_ensemble(members, data, cache_dir=str(tmp / "cache"))
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 1))
    with pytest.raises(RuntimeError, match="seen"):
        evaluate_ensemble(members, data, cache_dir=str(tmp / "cache"))
    assert seen == [(True, True), (False, True)]  # one process: as the member trained
