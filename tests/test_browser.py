"""The page in a real browser: headless Chromium uploads a face and sees the verdict.

The app runs on a real server thread on 127.0.0.1 (a free port); Selenium drives Chromium
through /usr/bin/chromedriver. Skipped when Chromium or its driver is not installed.
"""

import importlib.util

import pytest
from conftest import ROOT
from PIL import Image
from selenium.webdriver.common.by import By


def load_screenshot_script():
    spec = importlib.util.spec_from_file_location("screenshot_script", ROOT / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shot = load_screenshot_script()
pytestmark = [
    pytest.mark.skipif(shot.find_browser() is None,
                       reason=f"needs Chromium and chromedriver ({shot.CHROMIUM}, {shot.CHROMEDRIVER}): "
                              "apt-get install chromium chromium-driver"),
    pytest.mark.usefixtures("one_torch_thread"),  # see conftest
]


def test_upload_shows_verdict_probability_and_gradcam(app, client, face_paths, tmp_path):
    paths = face_paths[:2]
    expected = []
    for p in paths:  # what the API says for the same files
        with open(p, "rb") as f:
            expected.append(client.post("/api/predict", data={"image": (f, p.name)}).json["results"][0])

    with shot.serve(app) as url, shot.chrome(tmp_path / "profile") as driver:
        assert url.startswith("http://127.0.0.1:")
        cards = shot.upload(driver, url, paths)
        assert "lenet" in driver.find_element(By.ID, "model-info").text
        assert not any(c["error"] for c in cards), cards
        assert all(c["gradcam_toggle"] for c in cards)
        by_name = {c["filename"]: c for c in cards}
        for p, res in zip(paths, expected):
            card = by_name[p.name]
            assert card["verdict"] == res["label"].capitalize()
            # one decimal, two within 0.05 % of the threshold (app.js pctBeside), as the header shows it
            digits = 2 if abs(res["p_fake"] - res["threshold"]) < 0.0005 else 1
            assert card["p_fake"] == f"{100 * res['p_fake']:.{digits}f} %"
        src = shot.show_gradcam(driver, 0)
        assert src.startswith("data:image/png;base64,")
        png = shot.save_png(driver.get_screenshot_as_png(), tmp_path / "page.png")

    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 300


def test_cards_keep_each_uploads_order_with_the_latest_upload_on_top(app, face_paths, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for name, src in zip(names, face_paths + face_paths[:1]):
        (tmp_path / name).write_bytes(src.read_bytes())
    with shot.serve(app) as url, shot.chrome(tmp_path / "profile") as driver:
        cards = shot.upload(driver, url, [tmp_path / n for n in names[:4]])
        assert [c["filename"] for c in cards] == names[:4]  # was d, c, b, a
        driver.find_element(By.ID, "file-input").send_keys(str(tmp_path / "e.jpg"))  # a second upload
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-label]")[4:])
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card .filename")]
    assert shown == ["e.jpg"] + names[:4]


def test_screenshot_shows_the_gradcam_of_the_first_card_that_has_one(tmp_path, capsys):
    # The first card is an unreadable image's, with no Grad-CAM toggle to click (clicking
    # card 0's raised ElementNotInteractableException).
    paths = shot.drawn_faces(tmp_path, n=2)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    args = shot.get_args_parser().parse_args(["--images", str(tmp_path / "bad.jpg"), *map(str, paths),
                                              "--output", str(tmp_path / "page.png")])
    assert shot.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["bad.jpg", "drawn_face_0.jpg", "drawn_face_1.jpg"]
    assert "not a readable image" in out[0] and "P(fake)" in out[1] and (tmp_path / "page.png").stat().st_size > 0


def test_bad_file_shows_error(app, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all")
    with shot.serve(app) as url, shot.chrome(tmp_path / "profile") as driver:
        [card] = shot.upload(driver, url, [bad])
    assert card["verdict"] == "Could not classify"
    assert "notes.jpg" in card["error"] and "not a readable image" in card["error"]
    assert not card["gradcam_toggle"]  # nothing to overlay on a card without a result


def test_a_face_framed_unlike_the_training_faces_is_flagged(tmp_path):
    from conftest import make_checkpoint
    from synth import aligned_faces, png_bytes

    from rvf.framing import FramingReference
    from rvf.web import create_app

    run = make_checkpoint(tmp_path / "run", image_size=64)
    faces = aligned_faces(200)
    FramingReference.fit(faces).save(run)
    (tmp_path / "aligned.png").write_bytes(png_bytes(faces[0]))
    (tmp_path / "moved.png").write_bytes(png_bytes(faces[1].roll((6, 6), dims=(1, 2))))
    app = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(run)})
    with shot.serve(app) as url, shot.chrome(tmp_path / "profile") as driver:
        cards = {c["filename"]: c for c in shot.upload(driver, url, [tmp_path / "aligned.png", tmp_path / "moved.png"])}
        footer = driver.find_element(By.TAG_NAME, "footer").text
    assert cards["aligned.png"]["framing"] == "" and cards["aligned.png"]["verdict"] in ("Fake", "Real")
    assert cards["moved.png"]["framing"].startswith("Framed unlike the training faces: the eyes sit")
    assert cards["moved.png"]["verdict"] in ("Fake", "Real")  # a warning beside the verdict, not instead of it
    assert "such faces get a warning" in footer
