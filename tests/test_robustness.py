"""scripts/robustness.py: every condition runs, and "clean" equals evaluate.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synth import face, make_folder_dataset

from rvf.robustness import PERTURBATIONS, Perturbation

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
        Perturbation("sharpen", 1)


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
    table = (tmp_path / "rob" / "robustness.md").read_text()
    assert "jpeg 75" in table and "No framing check" in table and "scripts/framing.py" in table
    assert "framing_off" not in result["rows"][0]
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
    # which way the verdicts went: each class's recall, as evaluate.py's report has it
    assert result["rows"][0]["recall"] == pytest.approx({c: ev["per_class"][c]["recall"] for c in ("fake", "real")})
    assert "| fake / real called right % | accuracy % at threshold 0.5000 |" in table
    clean = result["rows"][0]["accuracy"]
    assert len({row["accuracy"] for row in result["rows"]}) > 1  # these weights' accuracy moves: a sign would show
    for row in result["rows"]:
        assert row["delta_accuracy"] == pytest.approx(row["accuracy"] - clean)  # negative: worse than clean
    assert f"| {100 * ev['accuracy_at_threshold']:.2f} |" in table.splitlines()[4]  # the clean row, as evaluate.py


def test_a_shift_moves_the_picture_and_repeats_its_edges():
    img = face(0, 32, seed=2)
    a, out = np.asarray(img), np.asarray(Perturbation.parse("shift:3")(img))
    assert out.shape == a.shape
    assert np.array_equal(out[3:, 3:], a[:-3, :-3])  # moved down and right
    assert np.array_equal(out[:3, 3:], np.broadcast_to(a[:1, :-3], (3, 29, 3)))  # top row repeated
    assert np.array_equal(out[3:, :3], np.broadcast_to(a[:-3, :1], (29, 3, 3)))  # left column repeated
    assert Perturbation.parse("shift:2").name == "shift 2" and Perturbation.parse("clean").name == "clean"
    for bad in ("shift:1.5", "shift:-1", "jpeg:high", "sharpen:1", "crop:0", "crop:1.5", "jpeg:500", "jpeg:0",
                "jpeg:75.5", "scale:0", "scale:5", "blur:-1", "noise:-1", "jpeg:inf", "shift:inf", "blur:nan",
                "rotate:nan", "noise:inf"):
        with pytest.raises(ValueError, match=f"perturbation '{bad}'"):
            Perturbation.parse(bad)


def test_a_kind_that_needs_a_value_refuses_none():
    # Taken as 0, shift, blur, noise and rotate made a row identical to clean.
    for kind in Perturbation.KINDS[1:]:
        for text in (kind, f"{kind}:", f"{kind}: "):
            with pytest.raises(ValueError, match=f"perturbation '{text}' needs a value: give KIND:VALUE, e.g. {kind}:"):
                Perturbation.parse(text)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", "none", "--data-dir",
                        "none", "--perturbations", "clean", "shift"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "robustness.py: error: argument --perturbations: perturbation 'shift' needs a value: give KIND:VALUE, "
        "e.g. shift:2 (pixels down and right)"), r.stderr[-2000:]


def test_robustness_script_runs_the_perturbations_asked_for(tmp_path):
    from conftest import make_checkpoint
    from synth import aligned_faces

    from rvf.framing import FramingReference

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    FramingReference.fit(aligned_faces(50)).save(checkpoint)  # a run with a framing check
    data = make_folder_dataset(tmp_path / "data", n=4, size=48, splits=("valid",))
    cmd = [sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", str(checkpoint),
           "--data-dir", str(data), "--output-dir", str(tmp_path / "rob"), "--num-workers", "0",
           "--perturbations", "shift:2", "clean"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "rob" / "robustness.json").read_text())["rows"]
    assert [row["perturbation"] for row in rows] == ["shift 2", "clean"]
    # The change is against the clean row wherever it is asked for (was: only when first)
    assert [row["delta_accuracy"] for row in rows] == [rows[0]["accuracy"] - rows[1]["accuracy"], 0.0]
    # synth's flat colour fields are nothing like the reference's faces: every one is called off
    assert [row["framing_off"] for row in rows] == [1.0, 1.0] and rows[0]["accuracy_framing_ok"] is None
    assert "| framing off % |" in r.stdout
    r = subprocess.run(cmd[:-2] + ["shift:0.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "whole number of pixels" in r.stderr


def test_a_failed_robustness_run_leaves_no_empty_report_folder(tmp_path):
    # As evaluate.py: the folder made up front goes again when the evaluation fails.
    from conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    before = sorted(checkpoint.iterdir())
    data = make_folder_dataset(tmp_path / "data", n=2, size=48, splits=("valid",))
    for args in (["--data-dir", str(tmp_path / "nope")], ["--data-dir", str(data), "--split", "test"]):
        r = subprocess.run([sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", str(checkpoint),
                            *args, "--num-workers", "0"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
        assert sorted(checkpoint.iterdir()) == before, args


def test_accuracy_where_framing_is_ok_counts_only_those_faces(tmp_path):
    import torch
    from conftest import make_checkpoint
    from synth import aligned_faces, png_bytes

    from rvf.framing import FramingReference
    from rvf.inference import Predictor
    from rvf.robustness import evaluate_robustness

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    FramingReference.fit(aligned_faces(50)).save(checkpoint)
    # fake/: three aligned faces and one moved; real/: one aligned and three moved. Whatever these
    # weights call them, the faces framed ok and those framed off then score differently.
    faces, moved = aligned_faces(8, seed=1), {3, 5, 6, 7}
    for i, f in enumerate(faces):
        d = tmp_path / "data" / "valid" / ("fake" if i < 4 else "real")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(png_bytes(torch.roll(f, (5, 5), dims=(1, 2)) if i in moved else f))
    result = evaluate_robustness(checkpoint, tmp_path / "data", output_dir=tmp_path / "rob", num_workers=0,
                                 perturbations=[Perturbation("clean")], progress=False)
    paths = sorted((tmp_path / "data" / "valid").rglob("*.png"))
    served = Predictor.from_checkpoint(checkpoint).predict_sources([str(p) for p in paths])
    assert [int(p.stem) for p, r in zip(paths, served) if not r.framing["ok"]] == sorted(moved)
    right = np.array([r.label == p.parent.name for p, r in zip(paths, served)])  # threshold 0.5: the argmax
    ok = np.array([r.framing["ok"] for r in served])
    (row,) = result["rows"]
    assert row["accuracy"] == pytest.approx(right.mean()) and row["framing_off"] == 0.5
    assert row["accuracy_framing_ok"] == pytest.approx(right[ok].mean())
    assert right[ok].mean() != right[~ok].mean()


def test_a_crop_keeps_a_seeded_square_and_a_rotation_keeps_the_size():
    img = face(0, 40, seed=2)
    a = np.asarray(img)
    crop = Perturbation.parse("crop:0.5")
    out = np.asarray(crop(img, seed=5))
    assert out.shape == (20, 20, 3) and np.array_equal(out, np.asarray(crop(img, seed=5)))  # seeded per image
    ys, xs = [(y, x) for y in range(21) for x in range(21) if np.array_equal(a[y:y + 20, x:x + 20], out)][0]
    assert 0 <= ys <= 20 and 0 <= xs <= 20  # a window of the picture, pixels copied
    assert np.array_equal(np.asarray(Perturbation.parse("crop:1")(img)), a)
    turned = np.asarray(Perturbation.parse("rotate:15")(img))
    assert turned.shape == a.shape and not np.array_equal(turned, a)
    assert turned[0, 0].sum() > 0 and turned[-1, -1].sum() > 0  # corners from the edges, not black
    assert np.abs(np.asarray(Perturbation.parse("rotate:0")(img), float) - a).max() <= 1


def test_an_unreadable_image_is_named_or_left_out(tmp_path):
    from conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    data = make_folder_dataset(tmp_path / "data", n=4, size=48, splits=("valid",))
    junk = data / "valid" / "fake" / "zz_junk.jpg"
    junk.write_text("not an image")
    cmd = [sys.executable, str(ROOT / "scripts/robustness.py"), "--checkpoint", str(checkpoint), "--data-dir",
           str(data), "--output-dir", str(tmp_path / "rob"), "--num-workers", "1",
           "--perturbations", "clean", "jpeg:75"]
    # Decoded in a loader worker, yet one line naming the file, not the worker's traceback.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(junk) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert result["skipped"] == 1 and result["n"] == 8 and len(result["rows"]) == 2
    assert "1 unreadable, left out" in r.stdout
    for img in data.rglob("*.jpg"):
        img.write_text("not an image either")
    r = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no readable image in the valid split" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:-3] + ["--device", "tpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown device 'tpu': use cpu, cuda or auto" in r.stderr


def test_one_pass_over_the_faces_scores_each_condition_as_a_pass_of_its_own(tmp_path):
    # Each face is decoded once and degraded every way, and the model sees the conditions of a
    # few faces side by side: each row must still be what that condition alone gives, whatever
    # the batch (1 face a batch; 2 and a short last one; all at once).
    from conftest import make_checkpoint

    from rvf.robustness import evaluate_robustness

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    data = make_folder_dataset(tmp_path / "data", n=5, size=48, splits=("valid",))
    conditions = [Perturbation.parse(t) for t in ("jpeg:50", "clean", "noise:30")]
    alone = [evaluate_robustness(checkpoint, data, output_dir=tmp_path / "alone", num_workers=0,
                                 perturbations=[p], progress=False)["rows"][0] for p in conditions]
    assert len({r["roc_auc"] for r in alone}) > 1  # the conditions score differently: a mix-up would show
    for batch_size in (1, 7, 128):
        rows = evaluate_robustness(checkpoint, data, output_dir=tmp_path / "all", num_workers=0, batch_size=batch_size,
                                   perturbations=conditions, progress=False)["rows"]
        for row, one in zip(rows, alone, strict=True):
            for key in ("perturbation", "accuracy", "roc_auc", "average_precision", "recall"):
                assert row[key] == pytest.approx(one[key]), (batch_size, key)
