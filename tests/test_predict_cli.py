"""scripts/predict.py on folders of good and bad files; app == CLI == direct model call."""

import csv
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import BAD_IMAGES, ROOT, VALID_IMAGES, good_jpeg
from PIL import Image

from rvf.checkpoint import load_pretrained
from rvf.data.transforms import build_eval_transform, load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

SCRIPT = ROOT / "scripts" / "predict.py"


def load_script():
    spec = importlib.util.spec_from_file_location("predict_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*argv) -> tuple[int, str, str]:
    """Run the script in-process (fast); returns (exit code, stdout, stderr)."""
    script = load_script()
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = script.main(script.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mixed_folder(tmp_path):
    """A folder tree with every valid format and every bad file, plus a non-image extension."""
    root = tmp_path / "in"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i, (name, make) in enumerate(sorted(VALID_IMAGES.items())):
        sub = ["", "nested", "nested/deeper"][i % 3]
        (root / sub / name).write_bytes(make())
    for name, make in BAD_IMAGES.items():
        if name.endswith((".jpg", ".png")):  # .txt and .pdf are not picked up from folders
            (root / "nested" / name).write_bytes(make())
    (root / "README.txt").write_text("not an image, skipped by extension")
    return root


def test_cli_subprocess_folder_with_good_and_bad_files(checkpoint, mixed_folder, tmp_path):
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), str(mixed_folder),
         "--output", str(out), "--batch-size", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see one_torch_thread in conftest
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out)
    assert {r["path"].rsplit("/", 1)[-1] for r in rows} == set(VALID_IMAGES)
    for r in rows:
        assert r["label"] in ("fake", "real")
        assert float(r["p_fake"]) + float(r["p_real"]) == pytest.approx(1, abs=2e-6)
    bad = [n for n in BAD_IMAGES if n.endswith((".jpg", ".png"))]
    for name in bad:
        assert sum(f"/{name}: " in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert f"predicted {len(VALID_IMAGES)} of {len(VALID_IMAGES) + len(bad)} images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path):
    (tmp_path / "face.jpg").write_bytes(good_jpeg())
    code, out, err = run_cli("--checkpoint", tmp_path, tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("error:") and "not an rvf checkpoint" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag, make, message", [
    ("--output", "dir", "is a folder; give a file path"),
    ("--gradcam-dir", "file", "is a file; give a folder"),
    ("--batch-size", None, "must be at least 1"),
])
def test_cli_bad_output_paths_fail_before_any_work(checkpoint, tmp_path, capsys, flag, make, message):
    target = tmp_path / "target"
    if make == "dir":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    script = load_script()
    with pytest.raises(SystemExit) as e:
        script.get_args_parser().parse_args(["--checkpoint", str(checkpoint), str(tmp_path),
                                             flag, "0" if make is None else str(target)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_checkpoint_given_as_its_weights_file(checkpoint, tmp_path):
    (tmp_path / "face.jpg").write_bytes(good_jpeg())
    code, _, err = run_cli("--checkpoint", checkpoint / "model.safetensors", tmp_path)
    assert code == 2 and "is a file; a checkpoint is the run folder that holds model.safetensors" in err
    assert str(checkpoint) in err


def test_cli_csv_to_stdout_and_explicit_bad_files(checkpoint, tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(good_jpeg())
    txt = tmp_path / "notes.txt"
    txt.write_bytes(BAD_IMAGES["notes.txt"]())
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(BAD_IMAGES["paper.pdf"]())
    code, out, err = run_cli("--checkpoint", checkpoint, good, txt, pdf, "--device", "cpu")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [str(good)]
    assert "notes.txt: not a readable image" in err and "paper.pdf" in err
    assert "2 could not be read" in err


def test_cli_reader_that_stops_early_is_no_error(checkpoint, tmp_path):
    # `predict.py faces/ | head -2` ended in a BrokenPipeError traceback and exit 1.
    (tmp_path / "face.jpg").write_bytes(good_jpeg())
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), str(tmp_path / "face.jpg"),
             "--device", "cpu"], stdout=subprocess.PIPE, stderr=err, cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # see one_torch_thread in conftest
        )
        proc.stdout.close()  # the reader is gone before the first row
        code = proc.wait(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert code == 0, err
    assert "predicted 1 of 1 images" in err and "Traceback" not in err and "BrokenPipe" not in err


def test_cli_names_a_folder_it_cannot_make_before_predicting(checkpoint, tmp_path):
    (tmp_path / "face.jpg").write_bytes(good_jpeg())
    (tmp_path / "a_file").write_text("")
    for flag, path in (("--gradcam-dir", tmp_path / "a_file" / "cams"), ("--output", tmp_path / "a_file" / "p.csv")):
        code, out, err = run_cli("--checkpoint", checkpoint, tmp_path / "face.jpg", flag, path)
        assert code == 2 and out == "" and err.startswith("error: cannot write there: "), err
        assert str(tmp_path / "a_file") in err and len(err.splitlines()) == 1, err


def test_cli_nothing_predicted_exits_1(checkpoint, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good_jpeg()[:700])
    code, out, err = run_cli("--checkpoint", checkpoint, bad, "--output", tmp_path / "p.csv")
    assert code == 1 and out == ""
    assert "bad.jpg" in err and "predicted 0 of 1" in err
    assert not (tmp_path / "p.csv").exists()


def test_cli_empty_folder_exits_1(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("--checkpoint", checkpoint, tmp_path / "empty")
    assert code == 1 and "no image files" in err


def test_cli_missing_path_exits_2(checkpoint, tmp_path):
    code, _, err = run_cli("--checkpoint", checkpoint, tmp_path / "nope.jpg")
    assert code == 2 and "nope.jpg: no such file" in err


def test_cli_gradcam_dir(checkpoint, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):  # same stem twice: both overlays kept
        (tmp_path / d / "face.jpg").write_bytes(good_jpeg())
    code, _, _ = run_cli("--checkpoint", checkpoint, tmp_path / "a", tmp_path / "b",
                         "--gradcam-dir", tmp_path / "cams", "--output", tmp_path / "p.csv")
    assert code == 0
    cams = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert cams == ["face.1.gradcam.png", "face.gradcam.png"]
    with open(tmp_path / "p.csv") as f:  # each row names its overlay
        assert sorted(row["gradcam"] for row in csv.DictReader(f)) == cams
    with Image.open(tmp_path / "cams" / cams[0]) as img:
        assert img.size == (256, 256)


def test_cli_folder_larger_than_one_chunk(checkpoint, mixed_folder, tmp_path):
    # --batch-size 1: predicted and written 8 images at a time, so this folder takes several
    # chunks, with unreadable files among them. Every row, overlay and skip must still be there,
    # with the probabilities of one big batch.
    args = ("--checkpoint", checkpoint, mixed_folder)
    code, _, err = run_cli(*args, "--batch-size", "1", "--gradcam-dir", tmp_path / "cams",
                           "--output", tmp_path / "a.csv")
    assert code == 0
    code, _, err_whole = run_cli(*args, "--batch-size", "256", "--output", tmp_path / "b.csv")
    rows, whole = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert len(rows) > 8 and [r["path"] for r in rows] == [r["path"] for r in whole]
    for r, w in zip(rows, whole):
        assert float(r["p_fake"]) == pytest.approx(float(w["p_fake"]), abs=2e-6)
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(r["gradcam"] for r in rows)
    assert err.count("skipped:") == err_whole.count("skipped:") > 0
    assert f"predicted {len(rows)} of {len(rows) + err.count('skipped:')} images" in err


def test_app_cli_and_direct_model_agree(checkpoint, client, face_paths, tmp_path):
    """The same file gets the same P(fake) from the web app, the CLI and the model itself."""
    model, _, data_cfg = load_pretrained(checkpoint)
    batch = torch.stack([load_image(p, data_cfg.image_size, data_cfg.interpolation) for p in face_paths])
    with torch.no_grad():
        direct = model(build_eval_transform(data_cfg)(batch)).softmax(dim=1)[:, 0].tolist()

    data = {"image": [(open(p, "rb"), p.name) for p in face_paths]}
    try:
        app_res = client.post("/api/predict", data=data).json["results"]
    finally:
        for f, _ in data["image"]:
            f.close()
    code, _, _ = run_cli("--checkpoint", checkpoint, *face_paths, "--output", tmp_path / "p.csv")
    assert code == 0
    cli = {r["path"]: float(r["p_fake"]) for r in read_csv(tmp_path / "p.csv")}

    for p, d, a in zip(face_paths, direct, app_res):
        assert a["p_fake"] == pytest.approx(d, abs=1e-6)
        assert cli[str(p)] == pytest.approx(d, abs=1e-6)  # the CSV keeps 6 decimals
