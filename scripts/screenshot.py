r"""Take a screenshot of the web app with results shown, in headless Chromium (docs/screenshot.png).

Usage:
    python scripts/screenshot.py [--checkpoint runs/lenet] [--images a.jpg b.jpg ...] \
        [--output docs/screenshot.png] [--width 1000] [--height 900]

Without --checkpoint it serves a random-weight LeNet (its verdicts mean nothing; the page
looks the same). Without --images it uploads four drawn cartoon faces, so the screenshot
committed to docs/ holds no dataset image (--dataset-faces uses rvf10k-mini faces instead,
for a look on your own machine). It serves the app on a
free port of 127.0.0.1 from a thread, uploads the images, waits for the verdicts, turns on
the Grad-CAM overlay of the first card that has one (an image that failed has none) and
saves the page (PNG, re-encoded with a palette when over 300 KB).

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`). The
helpers here (`serve`, `chrome`, `upload`) are also what tests/test_browser.py drives.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

from rvf.cli import output_file, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINI_VALID = ROOT.parent / "shared" / "data" / "rvf10k-mini" / "rvf10k" / "valid"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What headless Chromium needs in a container: no sandbox (root), no GPU, no /dev/shm, and
# nothing that phones home or downloads components.
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars"]
MAX_PNG_BYTES = 300_000


def find_browser() -> tuple[str, str] | None:
    """Return (chromium, chromedriver) paths, or None when either is missing."""
    browser = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def serve(app):
    """Serve `app` on a free port of 127.0.0.1 from a thread; yield its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="rvf-web", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def chrome(user_data_dir: str | Path, width: int = 1000, height: int = 760):
    """Start headless Chromium through chromedriver (never Selenium Manager, which downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise RuntimeError(f"Chromium or chromedriver not found ({CHROMIUM}, {CHROMEDRIVER}): "
                           "apt-get install chromium chromium-driver")
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROME_FLAGS + [f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def upload(driver, url: str, paths, timeout: float = 60) -> list[dict]:
    """Open the page, choose `paths` in its file input and wait until every card has a result.

    Returns:
        One dict per card, in page order: filename, verdict text, P(fake) text, error text,
        framing warning text ("" when hidden) and whether the Grad-CAM toggle is shown.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(Path(p).resolve()) for p in paths))

    def done(d):
        cards = d.find_elements(By.CSS_SELECTOR, ".card")
        finished = [c for c in cards if c.get_attribute("data-label") or "failed" in c.get_attribute("class")]
        return len(cards) == len(paths) and len(finished) == len(paths)

    WebDriverWait(driver, timeout).until(done)
    return [{
        "filename": card.find_element(By.CSS_SELECTOR, ".filename").text,
        "verdict": card.find_element(By.CSS_SELECTOR, ".verdict").text,
        "p_fake": card.find_element(By.CSS_SELECTOR, ".pfake").text,
        "error": card.find_element(By.CSS_SELECTOR, ".error").text,
        "framing": card.find_element(By.CSS_SELECTOR, ".framing").text,
        "gradcam_toggle": card.find_element(By.CSS_SELECTOR, ".toggle").is_displayed(),
    } for card in driver.find_elements(By.CSS_SELECTOR, ".card")]


def show_gradcam(driver, index: int | None = None, timeout: float = 60) -> str:
    """Tick the Grad-CAM toggle of card `index` (default: the first card that has one); wait
    for the overlay; return its src.

    Raises:
        ValueError: no card has a Grad-CAM toggle (every image failed).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cards = driver.find_elements(By.CSS_SELECTOR, ".card")
    if index is None:  # an error card hides its toggle, and clicking a hidden one raises
        index = next((i for i, c in enumerate(cards) if c.find_element(By.CSS_SELECTOR, ".toggle").is_displayed()),
                     None)
        if index is None:
            raise ValueError("no card has a Grad-CAM toggle: every image failed")
    card = cards[index]
    card.find_element(By.CSS_SELECTOR, ".cam-toggle").click()
    cam = card.find_element(By.CSS_SELECTOR, ".cam")
    WebDriverWait(driver, timeout).until(
        lambda d: cam.is_displayed() and (cam.get_attribute("src") or "").startswith("data:image/png"))
    return cam.get_attribute("src")


def save_png(png: bytes, output: Path, max_bytes: int = MAX_PNG_BYTES) -> Path:
    """Write a screenshot, re-encoded with a 256-colour palette when it is too large."""
    from PIL import Image

    if len(png) > max_bytes:
        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png)
    return output


def drawn_faces(workdir: Path, n: int = 4) -> list[Path]:
    """Draw `n` simple cartoon faces (so the committed screenshot holds no dataset image)."""
    from PIL import Image, ImageDraw, ImageFilter

    skins = [(224, 172, 140), (150, 105, 80), (240, 200, 170), (190, 140, 100)]
    paths = []
    for i in range(n):
        img = Image.new("RGB", (256, 256), (90 + 40 * i, 130, 170 - 30 * i))
        d = ImageDraw.Draw(img)
        d.ellipse((58, 40, 198, 220), fill=skins[i % 4])  # face
        d.pieslice((50, 24, 206, 130), 180, 360, fill=(60 - 10 * i, 40, 30))  # hair
        for x in (95, 161):
            d.ellipse((x - 13, 112, x + 13, 130), fill="white")
            d.ellipse((x - 6, 115, x + 6, 127), fill=(60, 40 + 30 * i, 30))
        d.line((128, 130, 122, 165, 134, 165), fill=(150, 90, 70), width=3)  # nose
        d.arc((98, 160, 158, 198), 15, 165, fill=(170, 60, 60), width=4)  # mouth
        p = workdir / f"drawn_face_{i}.jpg"
        img.filter(ImageFilter.GaussianBlur(1.2)).save(p, quality=92)
        paths.append(p)
    return paths


def dataset_faces(folder: Path) -> list[Path]:
    """Two real and two fake faces from `folder`/{real,fake} (local use only), or ValueError."""
    paths = sorted((folder / "real").glob("*.jpg"))[:2] + sorted((folder / "fake").glob("*.jpg"))[:2]
    if len(paths) != 4:
        raise ValueError(f"--dataset-faces {folder}: needs two .jpg faces in each of real/ and fake/ there")
    return paths


def random_checkpoint(directory: Path) -> Path:
    """Save a random-weight LeNet checkpoint (for a screenshot when no trained one is given)."""
    import torch

    from rvf.checkpoint import save_pretrained
    from rvf.data.transforms import resolve_data_config
    from rvf.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet")
    meta = {"model_name": "lenet", "model_args": {"num_classes": 2}, "classes": ["fake", "real"],
            "data_config": resolve_data_config(model).to_dict(), "threshold": 0.5}
    return save_pretrained(directory, model, meta)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a random-weight LeNet)")
    parser.add_argument("--images", nargs="+", default=None, help="images to upload (default: 4 drawn faces)")
    parser.add_argument("--dataset-faces", nargs="?", const=MINI_VALID, type=Path, metavar="DIR",
                        help="upload two real and two fake faces from DIR/{real,fake} instead of drawn ones "
                             "(DIR default: ../shared/data/rvf10k-mini/rvf10k/valid; never commit the result)")
    parser.add_argument("--output", type=output_file, default=ROOT / "docs" / "screenshot.png",
                        help="PNG to write (default: docs/screenshot.png in this repository, the README's)")
    parser.add_argument("--width", type=positive_int, default=1000, help="browser window, pixels (default: 1000)")
    parser.add_argument("--height", type=positive_int, default=900, help="browser window, pixels (default: 900)")
    return parser


def main(args) -> int:
    from rvf.checkpoint import CheckpointError
    from rvf.web import create_app

    if find_browser() is None:
        print(f"error: Chromium or chromedriver not found ({CHROMIUM}, {CHROMEDRIVER}); "
              "install them with: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    missing = [p for p in args.images or [] if not Path(p).is_file()]
    if missing:  # before Chromium starts, which would answer with a WebDriver traceback
        print(f"error: --images: no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    try:
        faces = dataset_faces(args.dataset_faces) if args.dataset_faces and not args.images else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log on the console
    with tempfile.TemporaryDirectory(prefix="rvf-screenshot-") as tmp:
        tmp = Path(tmp)
        try:
            checkpoint = args.checkpoint or random_checkpoint(tmp / "checkpoint")
            app = create_app({"MODEL_CHECKPOINT": str(checkpoint)})
        except (CheckpointError, RuntimeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        images = [Path(p) for p in args.images] if args.images else faces or drawn_faces(tmp)
        with serve(app) as url, chrome(tmp / "profile", args.width, args.height) as driver:
            results = upload(driver, url, images)
            if any(r["gradcam_toggle"] for r in results):  # none when every image failed: the page as it is
                show_gradcam(driver)
                driver.execute_script("window.scrollTo(0, 0)")  # ticking the toggle scrolled the page
            out = save_png(driver.get_screenshot_as_png(), Path(args.output))
    for r in results:
        # An error card's verdict reads "Could not classify": say why instead.
        print(f"{r['filename']}: " + (r["error"] or f"{r['verdict']} (P(fake) {r['p_fake']})"))
    print(f"wrote {out} ({out.stat().st_size / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
