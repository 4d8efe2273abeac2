"""The Predictor: one preprocessing, one p_fake/threshold rule, Grad-CAM for every model."""

import io
import json
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BAD_IMAGES, VALID_IMAGES, good_jpeg, image_bytes, make_checkpoint
from PIL import Image

from rvf.checkpoint import load_pretrained
from rvf.data.transforms import BadImageError, build_eval_transform, load_image, resolve_data_config
from rvf.inference import Predictor, find_images, refuse_decompression_bombs, resolve_device
from rvf.models import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint)


def test_from_checkpoint(predictor):
    assert predictor.model_name == "lenet"
    assert predictor.image_size == 64
    assert predictor.threshold == 0.5
    assert not predictor.model.training


def test_missing_threshold_defaults_to_half(tmp_path):
    assert Predictor.from_checkpoint(make_checkpoint(tmp_path, threshold=None)).threshold == 0.5


def test_weights_with_nan_are_refused_when_loaded(tmp_path):
    # Such a model scores every image NaN, which a threshold would call "real" without a word.
    from safetensors.torch import load_file, safe_open, save_file

    from rvf.checkpoint import CheckpointError

    ckpt = make_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name][0] = float("nan")
    save_file(state, str(weights), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: 1 tensor\(s\) hold NaN or inf \({name}\)"):
        Predictor.from_checkpoint(ckpt)


def test_weights_and_json_of_two_saves_are_refused(tmp_path):
    # A save interrupted between its two renames leaves the new weights beside the old model.json.
    from rvf.checkpoint import CheckpointError

    first = make_checkpoint(tmp_path, seed=0)
    old_json = (first / "model.json").read_text()
    make_checkpoint(tmp_path, seed=1)  # the next save into the same folder
    assert load_pretrained(tmp_path)[1]["weights_id"] != json.loads(old_json)["weights_id"]
    (first / "model.json").write_text(old_json)
    with pytest.raises(CheckpointError, match=r"model\.safetensors and model\.json are from different saves"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["data_config"].pop("std"), r"bad \"data_config\".*KeyError"),
    (lambda m: m.update(data_config=None), r"bad \"data_config\""),
    (lambda m: m["data_config"].update(interpolation="bogus"), r"bad \"data_config\".*bogus"),
    (lambda m: m.update(threshold="abc"), r"\"threshold\" must be a probability in \[0, 1\], got 'abc'"),
    (lambda m: m.update(threshold=2.0), r"\"threshold\" must be a probability"),
    (lambda m: m.update(classes=["a"]), r"\"classes\" must be \[\"fake\", \"real\"\]"),
])
def test_a_malformed_model_json_is_named(tmp_path, edit, message):
    import json

    from rvf.checkpoint import CheckpointError

    ckpt = make_checkpoint(tmp_path)
    meta = json.loads((ckpt / "model.json").read_text())
    edit(meta)
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.json: " + message):
        load_pretrained(ckpt)


def test_predict_batch_is_softmax_of_logit_zero(checkpoint, predictor, face_paths):
    """The Predictor gives a file exactly what a direct call of the checkpoint's model gives."""
    model, _, data_cfg = load_pretrained(checkpoint)
    batch = torch.stack([load_image(p, data_cfg.image_size, data_cfg.interpolation) for p in face_paths])
    with torch.no_grad():
        expected = model(build_eval_transform(data_cfg)(batch)).softmax(dim=1)[:, 0]  # (B,)
    torch.testing.assert_close(predictor.predict_batch(batch), expected)
    results = predictor.predict_sources([str(p) for p in face_paths], batch_size=3)
    np.testing.assert_allclose([r.p_fake for r in results], expected.numpy(), rtol=0, atol=1e-6)


def test_tta_hflip_scores_image_and_mirror(tmp_path, face_paths):
    ckpt = make_checkpoint(tmp_path, tta_hflip=True)
    tta, plain = Predictor.from_checkpoint(ckpt), Predictor(*load_pretrained(ckpt), device="cpu")
    plain.tta_hflip = False
    batch = torch.stack([tta.load(p) for p in face_paths])
    x = build_eval_transform(tta.data_cfg)(batch)
    with torch.no_grad():
        expected = ((tta.model(x) + tta.model(x.flip(-1))) / 2).softmax(dim=1)[:, 0]
    assert tta.describe()["tta_hflip"] and not plain.describe()["tta_hflip"]
    torch.testing.assert_close(tta.predict_batch(batch), expected)
    assert not torch.allclose(plain.predict_batch(batch), expected)  # a random LeNet is not mirror-symmetric


def test_batching_does_not_change_probabilities(predictor, face_paths):
    srcs = [str(p) for p in face_paths]
    one = [r.p_fake for r in predictor.predict_sources(srcs, batch_size=1)]
    all_ = [r.p_fake for r in predictor.predict_sources(srcs, batch_size=64)]
    np.testing.assert_allclose(one, all_, rtol=0, atol=1e-6)


def test_verdict_at_threshold(predictor):
    t = predictor.threshold
    assert predictor.verdict(t) == "fake"
    assert predictor.verdict(np.nextafter(t, 0)) == "real"


def test_sources_of_every_kind(predictor, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(good_jpeg())
    stream = io.BytesIO(good_jpeg())
    results = predictor.predict_sources([str(path), path, good_jpeg(), stream], ["p", "pp", "bytes", "stream"])
    assert [r.name for r in results] == ["p", "pp", "bytes", "stream"]
    assert len({round(r.p_fake, 6) for r in results}) == 1


def test_bad_items_become_errors_in_place(predictor):
    srcs = [good_jpeg()] + [f() for f in BAD_IMAGES.values()] + [VALID_IMAGES["cmyk.jpg"]()]
    names = ["good"] + list(BAD_IMAGES) + ["cmyk"]
    results = predictor.predict_sources(srcs, names)
    assert [r.ok for r in results] == [True] + [False] * len(BAD_IMAGES) + [True]
    for r, name in zip(results[1:-1], BAD_IMAGES):
        assert r.error.startswith(name + ":") and r.label is None and r.p_fake is None
    assert set(results[1].to_dict()) == {"name", "threshold", "error"}


def test_decompression_bomb_warning_becomes_bad_image(predictor):
    # Outside pytest's "error" filter Pillow would only warn and decode 100 MP; the app's
    # filter turns that into a refusal.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        refuse_decompression_bombs()
        with pytest.raises(BadImageError, match="too large"):
            predictor.load(BAD_IMAGES["warnbomb.png"]())


def test_find_images(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in ["a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "notes.txt", "sub/d.tiff"]:
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    found = find_images([tmp_path, explicit, tmp_path / "a.jpg"])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.jpg", "sub/b.PNG", "sub/d.tiff", "sub/deeper/c.webp", "notes.txt"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images([tmp_path / "nope"])


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


# --- Grad-CAM ---

CAM_MODELS = list_models() + ["timm:resnet18", "timm:test_vit"]


@pytest.mark.parametrize("name", CAM_MODELS)
def test_gradcam_every_model(name):
    torch.manual_seed(0)
    model = create_model(name)
    data_cfg = resolve_data_config(model)
    if data_cfg.image_size > 160:  # keep timm's 224 px models fast: any size works for Grad-CAM
        data_cfg = resolve_data_config(model, image_size=64)
    p = Predictor(model, {"model_name": name, "classes": ["fake", "real"]}, data_cfg)
    s = data_cfg.image_size
    images = torch.randint(0, 256, (1, 3, s, s), dtype=torch.uint8)
    cams = p.gradcam(images)
    assert cams.shape == (1, s, s) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert all(param.grad is None for param in model.parameters())  # no grads left behind


@pytest.mark.parametrize("name", ["timm:test_convnext", "timm:test_mambaout"])  # NCHW, NHWC stages
def test_gradcam_weighs_the_channels_of_any_layout(name):
    # Grad-CAM by hand: weights = mean gradient per channel, map = ReLU(sum of weighted channels).
    torch.manual_seed(0)
    model = create_model(name)
    data_cfg = resolve_data_config(model, image_size=64)
    p = Predictor(model, {"model_name": name, "classes": ["fake", "real"]}, data_cfg)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    seen = {}
    hook = p.cam_layer.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    logit = model(p.transform(images))[0, 0]  # the fake logit
    hook.remove()
    out = seen["out"]
    (grad,) = torch.autograd.grad(logit, out)
    channel_dim = 3 if getattr(model, "output_fmt", None) == "NHWC" else 1
    weights = grad.mean(dim=tuple(d for d in (1, 2, 3) if d != channel_dim), keepdim=True)
    expected = torch.relu((weights * out).sum(channel_dim)).detach()[0]  # (h, w)
    cam = torch.from_numpy(p.gradcam(images, targets=[0])[0])  # (64, 64)
    coarse = F.adaptive_avg_pool2d(cam[None, None], expected.shape)[0, 0]
    corr = np.corrcoef(coarse.flatten().numpy(), expected.flatten().numpy())[0, 1]
    assert corr > 0.9, f"{name}: Grad-CAM map uncorrelated with the hand-computed one ({corr:.2f})"


@pytest.mark.parametrize("name, layer", [("timm:test_vit", "blocks.5.norm1"), ("timm:test_vit2", "blocks.7")])
def test_gradcam_of_a_vision_transformer_is_not_blank(name, layer):
    # test_vit's head reads the class token alone (global_pool "token"), so its last block's patch
    # tokens never reach the logits: a map read there was all zeros for every image and class.
    # test_vit2 averages the patch tokens, so its last block is the right layer.
    torch.manual_seed(0)
    model = create_model(name)
    p = Predictor(model, {"model_name": name, "classes": ["fake", "real"]}, resolve_data_config(model, image_size=64))
    assert p.cam_layer is model.get_submodule(layer)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cams = p.gradcam(images, targets=[0, 1])  # (2, 64, 64)
    assert all(cam.std() > 0.05 for cam in cams), [float(cam.std()) for cam in cams]


def test_a_score_that_is_not_a_number_is_that_images_error(predictor, face_paths, monkeypatch):
    real = predictor.predict_batch
    monkeypatch.setattr(predictor, "predict_batch", lambda b: torch.cat([torch.tensor([float("nan")]), real(b[1:])]))
    bad, good = predictor.predict_sources([str(p) for p in face_paths[:2]], gradcam=True)
    assert not bad.ok and "score is nan" in bad.error and bad.label is None and bad.gradcam_png is None
    assert good.ok and good.gradcam_png is not None
    json.dumps([bad.to_dict(), good.to_dict()], allow_nan=False)  # a bare NaN is not JSON


def test_gradcam_explains_verdict_by_default(predictor, face_paths):
    batch = torch.stack([predictor.load(p) for p in face_paths])
    labels = [predictor.verdict(p) for p in predictor.predict_batch(batch).tolist()]
    targets = [predictor.classes.index(label) for label in labels]
    np.testing.assert_allclose(predictor.gradcam(batch), predictor.gradcam(batch, targets), atol=1e-6)


def test_the_served_heat_map_explains_the_verdicts_class(tmp_path, face_paths):
    # One set of weights, two thresholds: 0 calls every face fake, 1 + 1e-9 (calibrate_threshold's
    # "never fake") every face real, so the overlay must show class 0's Grad-CAM, then class 1's.
    src = str(face_paths[0])
    pngs = {}
    for label, threshold in (("fake", 0.0), ("real", 1.0 + 1e-9)):
        p = Predictor.from_checkpoint(make_checkpoint(tmp_path / label, threshold=threshold))
        (served,) = p.predict_sources([src], gradcam=True)
        assert served.label == label
        cam = p.gradcam(p.load(src)[None], [p.classes.index(label)])[0]  # (S, S)
        assert served.gradcam_png == p.overlay_png(p.load(src, p.overlay_view[0]), cam)
        pngs[label] = served.gradcam_png
    assert pngs["fake"] != pngs["real"]


def test_overlay_png(predictor, face_paths):
    results = predictor.predict_sources([str(p) for p in face_paths[:2]] + [b"bad"], gradcam=True)
    for r in results[:2]:
        img = Image.open(io.BytesIO(r.gradcam_png))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (256, 256)
    assert results[2].gradcam_png is None


def test_concurrent_use_matches_sequential(predictor):
    """The web app serves requests on threads: Grad-CAM hooks must not mix them up."""
    inputs = [image_bytes("JPEG", seed=i) for i in range(4)]
    expected = [predictor.predict_sources([b], gradcam=True)[0] for b in inputs]
    got, errors = [None] * 8, []

    def work(i):
        try:
            got[i] = predictor.predict_sources([inputs[i % 4]], gradcam=bool(i % 2))[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, r in enumerate(got):
        assert r.p_fake == pytest.approx(expected[i % 4].p_fake, abs=1e-6)
        if i % 2:
            assert r.gradcam_png == expected[i % 4].gradcam_png


def test_a_null_threshold_means_the_default_everywhere(tmp_path):
    # model.json may say "threshold": null (read_meta accepts it): every reader decides at 0.5.
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from synth import make_folder_dataset

    ckpt = make_checkpoint(tmp_path / "ckpt")
    meta = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**meta, "threshold": None}))
    assert Predictor.from_checkpoint(ckpt).threshold == 0.5
    data = make_folder_dataset(tmp_path / "data", n=3, size=48, splits=("valid",))
    r = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(ckpt), "--data-dir", str(data),
                        "--output-dir", str(tmp_path / "ev"), "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["valid"]["threshold"] == 0.5
    assert "not calibrated" in (tmp_path / "ev" / "classification_report.txt").read_text()


def test_evaluate_with_every_image_unreadable_says_so(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from synth import make_folder_dataset

    ckpt = make_checkpoint(tmp_path / "ckpt")
    data = make_folder_dataset(tmp_path / "data", n=2, size=48, splits=("valid",))
    for f in (data / "valid").rglob("*.jpg"):
        f.write_bytes(b"not a jpeg")
    r = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(ckpt), "--data-dir", str(data),
                        "--skip-bad", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "valid: no readable images left to score" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_failed_evaluation_leaves_no_empty_report_folder(tmp_path):
    # The folder is made before the evaluation (a bad path fails first) and removed again when
    # the evaluation fails: an empty RUN/eval-valid would pass for a result.
    import subprocess
    import sys

    from conftest import ROOT
    from synth import make_folder_dataset

    from rvf.data import DatasetError
    from rvf.evaluate import evaluate_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = sorted(ckpt.iterdir())
    data = make_folder_dataset(tmp_path / "data", n=2, size=48, splits=("valid",))
    for args in (["--data-dir", str(tmp_path / "nope")], ["--data-dir", str(data), "--split", "test"]):
        r = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(ckpt), *args, "--cache-dir",
                            str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
        assert sorted(ckpt.iterdir()) == before, args
    # Every folder it made goes, up to the first that was there; one that was there stays.
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "made" / "eval", tmp_path / "kept"):
        with pytest.raises(DatasetError):
            evaluate_checkpoint(ckpt, data, "test", output_dir=out, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "made").exists() and (tmp_path / "kept").is_dir()


def test_evaluate_is_not_written_into_a_training_run(tmp_path):
    # --output-dir RUN replaced the run's metrics.json with the evaluation's, which the
    # leaderboard then left out (no best epoch) and publish_results.py refused.
    from synth import make_folder_dataset

    from rvf.checkpoint import CheckpointError
    from rvf.evaluate import evaluate_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    data = make_folder_dataset(tmp_path / "data", n=2, size=48, splits=("valid",))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: lenet\n")  # a run, finished or not
    for out in (ckpt, tmp_path / "run"):
        before = sorted(out.iterdir())
        with pytest.raises(CheckpointError, match=f"output dir {re.escape(str(out))} holds a training run"):
            evaluate_checkpoint(ckpt, data, output_dir=out, cache_dir=str(tmp_path / "cache"))
        assert sorted(out.iterdir()) == before


def test_serving_imports_neither_timm_nor_sklearn(checkpoint, tmp_path):
    # predict.py and the app start in a third of the time without them (one file: 5.3 -> 1.7 s
    # on a 2-core EPYC): a from-scratch model needs neither, a timm one imports timm on demand.
    import subprocess
    import sys
    from pathlib import Path

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "face.png")
    code = ("import sys; from rvf.inference import load_predictor; import rvf.web; "
            f"load_predictor({str(checkpoint)!r}).predict_sources([{str(tmp_path / 'face.png')!r}]); "
            "print(sorted(m for m in ('timm', 'sklearn') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
