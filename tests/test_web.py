"""The web app through Flask's test client: every route, every bad input."""

import base64
import io

import pytest
from conftest import BAD_IMAGES, METRICS, VALID_IMAGES, good_jpeg, image_bytes, make_checkpoint
from PIL import Image

from rvf.checkpoint import CheckpointError
from rvf.web import create_app
from rvf.web.views import safe_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def post(client, files, query="", **form):
    """POST (name, bytes) pairs as multipart field `image`."""
    data = {"image": [(io.BytesIO(b), name) for name, b in files], **form}
    return client.post("/api/predict" + query, data=data, content_type="multipart/form-data")


# --- factory ---

def test_config_defaults(app, checkpoint):
    assert app.config["MAX_CONTENT_LENGTH"] == 10 * 1024 * 1024
    assert not app.debug
    assert app.config["MODEL_CHECKPOINT"] == str(checkpoint)


def test_checkpoint_from_environment(monkeypatch, checkpoint):
    monkeypatch.setenv("RVF_CHECKPOINT", str(checkpoint))
    assert create_app().extensions["rvf"].model_name == "lenet"


def test_missing_checkpoint_fails_at_startup(monkeypatch):
    monkeypatch.delenv("RVF_CHECKPOINT", raising=False)
    with pytest.raises(RuntimeError, match="RVF_CHECKPOINT"):
        create_app({"TESTING": True})


def test_bad_checkpoint_fails_at_startup(tmp_path):
    with pytest.raises(CheckpointError, match="not an rvf checkpoint"):
        create_app({"TESTING": True, "MODEL_CHECKPOINT": str(tmp_path)})


def test_model_loaded_once_per_app(monkeypatch, checkpoint):
    import rvf.inference

    calls = []
    real = rvf.inference.load_pretrained
    monkeypatch.setattr(rvf.inference, "load_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    app = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint)})
    client = app.test_client()
    for _ in range(3):
        assert post(client, [("a.jpg", good_jpeg())]).status_code == 200
    assert client.get("/").status_code == 200
    assert len(calls) == 1


def test_torch_threads_setting(checkpoint):
    import torch

    before = torch.get_num_threads()
    try:
        create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "TORCH_THREADS": "1"})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_routes(app):
    rules = {r.rule: r.methods for r in app.url_map.iter_rules()}
    assert "POST" in rules["/api/predict"] and "GET" in rules["/api/health"] and "GET" in rules["/"]


# --- page and health ---

def test_index_shows_model_facts(client):
    r = client.get("/")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "lenet" in html and "64×64" in html
    assert "81.2 %" in html and "0.903" in html  # valid accuracy and AUC from the metrics
    assert "P(fake) ≥ 50.00 %" in html
    assert 'name="viewport"' in html
    assert "Content-Security-Policy" in r.headers


def test_index_shows_the_accuracy_of_the_verdicts_it_gives(tmp_path):
    # The page decides at the calibrated threshold, so it quotes the accuracy there.
    valid = {"accuracy": 0.8125, "accuracy_at_threshold": 0.8234, "roc_auc": 0.9031}
    ckpt = make_checkpoint(tmp_path, metrics={"valid": valid}, threshold=0.4321)
    client = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)}).test_client()
    html = client.get("/").get_data(as_text=True)
    assert "82.3 %" in html and "81.2 %" not in html and "P(fake) ≥ 43.21 %" in html
    assert client.get("/api/health").json["valid_accuracy_at_threshold"] == 0.8234


def test_index_without_metrics(tmp_path):
    ckpt = make_checkpoint(tmp_path, metrics=None, threshold=None)
    r = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)}).test_client().get("/")
    assert r.status_code == 200 and "accuracy" not in r.get_data(as_text=True)


@pytest.mark.parametrize("path", ["/static/app.js", "/static/style.css", "/static/noscript.css"])
def test_static_files(client, path):
    with client.get(path) as r:  # closes the file send_file opened
        assert r.status_code == 200 and len(r.data) > 100


def test_health(client, checkpoint):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok"
    assert r.json["model"] == "lenet"
    assert r.json["input_size"] == 64
    assert r.json["threshold"] == 0.5
    assert r.json["valid_accuracy"] == METRICS["valid"]["accuracy"]
    assert r.json["run"] == checkpoint.name  # which run, by folder name: never the server's path


def test_index_names_the_run_and_says_what_the_numbers_mean(client, checkpoint):
    html = client.get("/").get_data(as_text=True)
    assert f"(run <code>{checkpoint.name}</code>)" in html and str(checkpoint.parent) not in html
    assert "P(fake) is the model's probability that a face was generated" in html
    assert '<noscript><link rel="stylesheet" href="/static/noscript.css"></noscript>' in html  # shows the input


# --- predict: good input ---

def test_predict_one(client):
    r = post(client, [("face.jpg", good_jpeg())])
    assert r.status_code == 200
    assert r.json["model"] == "lenet"
    [res] = r.json["results"]
    assert set(res) == {"filename", "label", "p_fake", "p_real", "threshold"}
    assert res["filename"] == "face.jpg"
    assert 0 <= res["p_fake"] <= 1 and res["p_fake"] + res["p_real"] == pytest.approx(1)
    assert res["label"] == ("fake" if res["p_fake"] >= res["threshold"] else "real")


@pytest.mark.parametrize("name", sorted(set(VALID_IMAGES) - {"tiny.png"}))
def test_predict_formats_and_modes(client, name):
    r = post(client, [(name, VALID_IMAGES[name]())])
    assert r.status_code == 200, r.json
    assert r.json["results"][0]["label"] in ("fake", "real")


def test_a_thumbnail_too_small_to_judge_is_refused(client, checkpoint):
    # 9x9 px stretched to the model's 64 px would still get a verdict; the app says why it gives none.
    r = post(client, [("tiny.png", VALID_IMAGES["tiny.png"]())])
    assert r.status_code == 422 and r.json["error"] == "tiny.png: 9x9 px is too small to judge (at least 32 px a side)"
    wide = Image.new("RGB", (300, 20))  # the shorter side counts
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    assert "300x20 px is too small" in post(client, [("w.png", buf.getvalue())]).json["error"]
    lenient = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MIN_IMAGE_SIDE": 8}).test_client()
    assert post(lenient, [("tiny.png", VALID_IMAGES["tiny.png"]())]).status_code == 200


def test_predict_several_files_in_order(client):
    files = [(f"f{i}.png", VALID_IMAGES[n]()) for i, n in enumerate(["rgb.png", "gray.png", "cmyk.jpg"])]
    r = post(client, files)
    assert r.status_code == 200
    assert [x["filename"] for x in r.json["results"]] == ["f0.png", "f1.png", "f2.png"]


@pytest.mark.parametrize("query, form", [("?gradcam=1", {}), ("", {"gradcam": "1"}), ("?gradcam=true", {})])
def test_predict_gradcam(client, query, form):
    r = post(client, [("face.jpg", good_jpeg())], query, **form)
    assert r.status_code == 200
    png = base64.b64decode(r.json["results"][0]["gradcam_png"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (256, 256)  # drawn at >= 256 px for a 64 px model


def test_predict_without_gradcam_has_no_png(client):
    assert "gradcam_png" not in post(client, [("a.jpg", good_jpeg())], "?gradcam=0").json["results"][0]


def test_threshold_decides_label(tmp_path):
    for threshold, label in [(0.0, "fake"), (1.0 + 1e-9, "real")]:
        ckpt = make_checkpoint(tmp_path / str(threshold), threshold=threshold)
        client = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)}).test_client()
        res = post(client, [("a.jpg", good_jpeg())]).json["results"][0]
        assert res["label"] == label and res["threshold"] == threshold


@pytest.mark.parametrize("raw, shown", [
    ("../../etc/passwd.jpg", "passwd.jpg"),
    ("/abs/path/x.jpg", "x.jpg"),
    ("..", "upload"),
    ("<script>alert(1)</script>.jpg", "script>.jpg"),  # after the last '/': text only, shown via textContent
])
def test_filename_is_sanitized_basename(client, raw, shown):
    r = post(client, [(raw, good_jpeg())])
    assert r.status_code == 200 and r.json["results"][0]["filename"] == shown


@pytest.mark.parametrize("raw, shown", [
    # Werkzeug's test client cannot send these raw, so the helper is tested directly.
    ("C:\\Users\\me\\face.png", "face.png"),
    ("a\x00b\n.jpg", "ab.jpg"),
    ("", "upload"),
    (None, "upload"),
    ("x" * 300 + ".jpg", "x" * 200),
])
def test_safe_name(raw, shown):
    assert safe_name(raw) == shown


# --- predict: bad input ---

@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_422_json(client, name):
    r = post(client, [(name, BAD_IMAGES[name]())])
    assert r.status_code == 422
    assert r.is_json and name in r.json["error"]
    assert r.json["results"][0]["filename"] == name and "label" not in r.json["results"][0]


def test_bomb_messages_are_clear(client):
    assert "too large" in post(client, [("b.png", BAD_IMAGES["bomb.png"]())]).json["error"]
    assert "too large" in post(client, [("w.png", BAD_IMAGES["warnbomb.png"]())]).json["error"]
    assert "empty file" in post(client, [("e.jpg", b"")]).json["error"]


def test_one_bad_file_among_good_ones_is_200_with_error_entry(client):
    r = post(client, [("a.jpg", good_jpeg()), ("b.txt", b"nope"), ("c.png", VALID_IMAGES["rgba.png"]())])
    assert r.status_code == 200
    a, b, c = r.json["results"]
    assert a["label"] and c["label"]
    assert "error" in b and "label" not in b and b["filename"] == "b.txt"


def test_all_bad_files_is_422(client):
    r = post(client, [("a.txt", b"x"), ("b.jpg", good_jpeg()[:900])])
    assert r.status_code == 422
    assert "none of the 2 files" in r.json["error"]


def test_upload_over_limit_is_413_json(client):
    big = b"\xff\xd8" + b"\0" * (10 * 1024 * 1024 + 10)
    r = post(client, [("big.jpg", big)])
    # The test client spooled the body to a temp file the app rightly never read: close it.
    r.request.environ["wsgi.input"].close()
    assert r.status_code == 413
    assert r.is_json and "10 MB" in r.json["error"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the part Werkzeug was spooling
def test_chunked_upload_over_limit_says_too_large(checkpoint):
    import gc

    # No Content-Length (Transfer-Encoding: chunked): the size limit trips while reading the body.
    config = {"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_CONTENT_LENGTH": 60_000}
    client = create_app(config).test_client()
    boundary = "rvfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + VALID_IMAGES["rgb.png"]() + b"\0" * 70_000 + \
        f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/api/predict", input_stream=io.BytesIO(body), environ_overrides={"wsgi.input_terminated": True},
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                             "Transfer-Encoding": "chunked"})
    assert r.request.content_length is None
    assert r.status_code == 413 and "upload too large: the limit is" in r.json["error"]
    del r
    gc.collect()  # here, under this test's filter, not in the next test


def test_a_request_past_its_pixel_budget_gets_error_entries(checkpoint):
    # 32 flat 40 MP PNGs are a 4 MB upload; the budget stops the decoding, file by file, in order.
    config = {"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_REQUEST_PIXELS": 150_000,
              "MAX_IMAGE_PIXELS": 100_000}
    client = create_app(config).test_client()
    face = good_jpeg()  # 256 x 256 = 65,536 px
    r = post(client, [("a.jpg", face), ("junk.jpg", b"not an image"), ("b.jpg", face), ("c.jpg", face)])
    assert r.status_code == 200
    a, junk, b, c = r.json["results"]
    assert "label" in a and "label" in b and "not a readable image" in junk["error"]  # junk costs nothing
    assert c["filename"] == "c.jpg" and "used this request's 0.15 megapixels" in c["error"]
    assert post(client, [("d.jpg", face)]).status_code == 200  # the budget is per request


def test_an_image_over_the_per_image_limit_spends_none_of_the_budget(checkpoint):
    # It is refused on its own (per-image limit); the faces after it still fit the request's budget.
    config = {"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_REQUEST_PIXELS": 150_000,
              "MAX_IMAGE_PIXELS": 100_000}
    client = create_app(config).test_client()
    big = image_bytes("JPEG", size=(350, 300))  # 105,000 px: over the image limit, under the budget
    face = good_jpeg()  # 65,536 px: two fit in 150,000, not after the big one
    r = post(client, [("big.jpg", big), ("a.jpg", face), ("b.jpg", face)])
    assert r.status_code == 200
    big, a, b = r.json["results"]
    assert "more than the 0.1 megapixels" in big["error"] and "label" in a and "label" in b


def test_upload_limit_is_configurable(checkpoint):
    config = {"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_CONTENT_LENGTH": 60_000}
    client = create_app(config).test_client()
    assert post(client, [("a.png", VALID_IMAGES["rgb.png"]())]).status_code == 413
    assert post(client, [("a.jpg", good_jpeg())]).status_code == 200


def test_wrong_field_name_is_400(client):
    r = client.post("/api/predict", data={"file": (io.BytesIO(good_jpeg()), "a.jpg")})
    assert r.status_code == 400
    assert "'image'" in r.json["error"] and "file" in r.json["error"]


def test_no_multipart_is_400(client):
    for r in [client.post("/api/predict"), client.post("/api/predict", json={"image": "x"})]:
        assert r.status_code == 400 and "'image'" in r.json["error"]


def test_empty_file_field_is_400(client):
    r = client.post("/api/predict", data={"image": (io.BytesIO(b""), "")})  # a form submitted with no file chosen
    assert r.status_code == 400 and "no file selected" in r.json["error"]


def test_too_many_files_is_400(app, client):
    n = app.config["MAX_FILES"] + 1
    r = post(client, [(f"{i}.jpg", b"x") for i in range(n)])
    assert r.status_code == 400 and "too many files" in r.json["error"]
    # Exactly the maximum is allowed (one face and junk: cheap, and 200 because one was predicted).
    r = post(client, [("0.jpg", good_jpeg())] + [(f"{i}.jpg", b"x") for i in range(1, n - 1)])
    assert r.status_code == 200 and len(r.json["results"]) == n - 1 and "label" in r.json["results"][0]


# Werkzeug leaves the parts it parsed before the limit for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_many_form_parts_are_refused_early_with_the_right_reason(app, client):
    import gc

    # Werkzeug's own part limit (1,000) would answer "too large" for a 150 KB request.
    r = post(client, [(f"{i}.jpg", b"x") for i in range(app.config["MAX_FILES"] + 20)])
    assert r.status_code == 413 and "too many form fields or files" in r.json["error"]
    r.request.environ["wsgi.input"].close()  # the body the test client spooled (see test_upload_over_limit)
    r = post(client, [("a.jpg", good_jpeg())], note="x" * 600_000)  # a text field over Werkzeug's 500 kB
    assert r.status_code == 413 and "10 MB" not in r.json["error"]
    r.request.environ["wsgi.input"].close()
    del r
    gc.collect()  # here, under this test's filter, not in the next test


def test_a_file_sent_as_text_says_how_to_send_it(client):
    r = client.post("/api/predict", data={"image": "face.jpg"}, content_type="multipart/form-data")
    assert r.status_code == 400 and "sent as text" in r.json["error"] and "-F image=@" in r.json["error"]


def test_images_over_the_pixel_budget_are_refused_before_decoding(checkpoint, monkeypatch):
    import numpy as np
    from PIL import ImageFile

    app = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_IMAGE_PIXELS": 100 * 100})
    client = app.test_client()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((101, 100), np.uint16)).save(buf, "PNG")  # 16-bit, just over the budget
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image over the budget"))
    r = post(client, [("deep.png", buf.getvalue())])
    assert r.status_code == 422 and "100x101 px is more than the 0.01 megapixels" in r.json["error"]


def test_only_the_advertised_formats_are_decoded(client):
    # Pillow reads EPS by running Ghostscript on it: an upload must never get that far.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PPM")
    for name, data in (("x.eps", eps), ("x.ppm", buf.getvalue())):
        r = post(client, [(name, data)])
        assert r.status_code == 422 and "not a readable image" in r.json["error"], r.json


@pytest.mark.parametrize("key, value", [("MAX_CONTENT_LENGTH", None), ("MAX_FILES", 0), ("MAX_IMAGE_PIXELS", "big"),
                                        ("MAX_REQUEST_PIXELS", 1.5e8), ("MIN_IMAGE_SIDE", -1)])
def test_limits_must_be_positive_integers(checkpoint, key, value):
    with pytest.raises(ValueError, match=f"{key} must be a positive integer"):
        create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), key: value})


def test_a_request_budget_under_the_image_limit_is_refused(checkpoint):
    # Else an image the per-image limit allows could never pass, even alone.
    with pytest.raises(ValueError, match="MAX_REQUEST_PIXELS .* must be at least MAX_IMAGE_PIXELS"):
        create_app({"TESTING": True, "MODEL_CHECKPOINT": str(checkpoint), "MAX_REQUEST_PIXELS": 1_000_000})


@pytest.mark.parametrize("method, path, code", [
    ("get", "/api/predict", 405), ("post", "/api/health", 405), ("get", "/api/nope", 404)])
def test_api_http_errors_are_json(client, method, path, code):
    r = getattr(client, method)(path)
    assert r.status_code == code and r.is_json and r.json["error"]


def test_api_405_says_which_methods_are_allowed(client):
    # Was dropped with the HTML body: the JSON 405 had no Allow header, which RFC 9110 requires.
    r = client.get("/api/predict")
    assert r.status_code == 405 and r.is_json
    assert "POST" in r.headers["Allow"] and r.headers["Content-Type"] == "application/json"


def test_non_api_404_stays_html(client):
    r = client.get("/nope")
    assert r.status_code == 404 and not r.is_json


def test_unexpected_error_is_json_500(checkpoint, monkeypatch):
    app = create_app({"MODEL_CHECKPOINT": str(checkpoint)})  # not TESTING: errors are handled, not raised
    monkeypatch.setattr(app.extensions["rvf"], "predict_sources", lambda *a, **k: 1 / 0)
    r = post(app.test_client(), [("a.jpg", good_jpeg())])
    assert r.status_code == 500 and r.is_json and "error" in r.json


def test_app_script_takes_the_checkpoint_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "RVF_CHECKPOINT": str(tmp_path)}  # an empty folder: refused, by name
    r = subprocess.run([sys.executable, "scripts/app.py"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 2 and f"{tmp_path} is not an rvf checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_app_script_refuses_infinite_limits(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "scripts/app.py", "--checkpoint", str(tmp_path), "--max-upload-mb", "inf"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--max-upload-mb: must be a finite number above 0, got inf" in r.stderr


def test_app_script_refuses_a_port_out_of_range(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    # The OS would bind 70000 as 4464 (70000 mod 65536) without a word.
    r = subprocess.run([sys.executable, "scripts/app.py", "--checkpoint", str(tmp_path), "--port", "70000"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--port: must be at most 65535, got 70000" in r.stderr
