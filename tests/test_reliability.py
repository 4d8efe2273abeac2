"""Faults, load and hostile input: SIGKILL mid-run and mid-write, pickles, fuzzed uploads, gunicorn load.

docs/reliability.md lists every property with the test that proves it (some live in
test_train.py, test_data.py and test_web.py) and the figures measured.
"""

import contextlib
import faulthandler
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, image_bytes, make_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from synth import make_folder_dataset

from rvf.checkpoint import CheckpointError, load_pretrained
from rvf.data import RVF10K, build_cache
from rvf.data.transforms import load_image
from rvf.inference import refuse_decompression_bombs
from rvf.train import latest_state
from rvf.web import create_app

FUZZ_EXAMPLES = int(os.environ.get("RVF_FUZZ_EXAMPLES", "300"))  # per fuzz test; docs/reliability.md ran more
FUZZ_DEADLINE = timedelta(seconds=2)  # one request, decode to JSON; typically ~10 ms here
HANG_SECONDS = 60  # a request still running after this is a hang: dump the stacks and stop the run


def _env(tmp_path, **extra) -> dict:
    # One OpenMP thread: identical float results run to run, and no stalls on shared cores.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", **extra)
    return env


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll until `path` exists; fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.005)


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture
def children():
    """The processes a test starts (see `_start`); any still running at its end are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(children: list, argv: list, log: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """Start Python with `argv` in the repo root (so `rvf` imports), its output going to `log`."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    children.append(proc)
    return proc, log


def _load_script(name: str):
    """Import `scripts/<name>.py` as a module, to call its `main` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- training faults

TRAIN_ARGS = ["--epochs", "6", "--image-size", "32", "--batch-size", "8", "--tracker", "none",
              "--set", "holdout=0.25", "--set", "log_every=1", "--set", "hflip=0.5", "--set", "scheduler=cosine"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, children):
    """A real `kill -9` after the first saved state, then `--resume`: the same numbers, bit for bit."""
    data = make_folder_dataset(tmp_path / "data", n=16, size=32)
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = _env(tmp_path, RVF_CACHE_DIR=str(tmp_path / "cache"))

    def train(out, log_name):
        argv = ["scripts/train.py", "--data-dir", data, "--output-dir", out, *TRAIN_ARGS]
        return _start(children, argv, tmp_path / log_name, env)

    # The uninterrupted reference runs beside the other two; it builds the shared decode cache
    # before the second run starts (two first builds of one cache file would only race).
    reference, ref_log = train(ref, "reference.log")
    _wait_for(ref / "checkpoints" / "epoch_0" / "rvf_state.json", reference, ref_log)
    victim, log = train(run, "killed.log")
    _wait_for(run / "checkpoints" / "epoch_0" / "rvf_state.json", victim, log)
    _sigkill(victim)
    assert not (run / "metrics.json").exists(), "the run finished before the kill: nothing was interrupted"
    state = latest_state(run)
    killed_after = json.loads((state / "rvf_state.json").read_text())["epoch"] + 1  # epochs done

    resumed, log = _start(children, ["scripts/train.py", "--resume", run], tmp_path / "resumed.log", env)
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resumed from {state} " in log.read_text()
    assert reference.wait(timeout=600) == 0, ref_log.read_text()[-3000:]

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    keys = ["train_loss", "train_accuracy", "holdout_loss", "holdout_accuracy", "holdout_roc_auc", "lr"]
    assert [[h[k] for k in ["epoch", *keys]] for h in a["history"]] == [[h[k] for k in ["epoch", *keys]]
                                                                      for h in b["history"]]
    assert a["best_epoch"] == b["best_epoch"]
    for k in ("accuracy", "roc_auc", "average_precision", "loss", "confusion_matrix", "n"):
        assert a["valid"][k] == b["valid"][k], k
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (ref, run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"killed after epoch {killed_after} of 6; resumed run equal to the reference: "
          f"{len(a['history'])} epochs x {len(keys)} history values, valid metrics and "
          f"{sum(t.numel() for t in wa.values())} weights bit-identical")


@pytest.mark.slow
def test_ctrl_c_mid_run_says_how_to_resume(tmp_path, children):
    """A real SIGINT after the first saved state: exit 130 and one line naming --resume, no traceback."""
    data = make_folder_dataset(tmp_path / "data", n=8, size=32)
    run = tmp_path / "run"
    argv = ["scripts/train.py", "--data-dir", data, "--output-dir", run, "--epochs", "50", "--image-size", "32",
            "--batch-size", "8", "--tracker", "none"]  # LeNet: far more epochs than the signal leaves it
    proc, log = _start(children, argv, tmp_path / "train.log", _env(tmp_path, RVF_CACHE_DIR=str(tmp_path / "cache")))
    _wait_for(run / "checkpoints" / "epoch_0" / "rvf_state.json", proc, log)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    epochs = int(latest_state(run).name.removeprefix("epoch_")) + 1
    assert text.splitlines()[-1] == (f"interrupted: {run} has {epochs} epoch{'s' * (epochs > 1)} saved; to continue: "
                                     f"scripts/train.py --resume {run}"), text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


# A child that saves model B over checkpoint A and stalls mid-save, to be SIGKILLed there.
SAVE_AND_STALL = """
import json, os, sys, time
from pathlib import Path
import torch
import rvf.checkpoint as ck
from rvf.models import create_model
stage, directory, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def stall():
    ready.touch()
    time.sleep(120)
real_save_file = ck.save_file
def half_written(state, path, metadata=None):  # the weights' temp file, half on disk
    real_save_file(state, path, metadata=metadata)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    stall()
if stage == "weights":
    ck.save_file = half_written
else:  # "json": the new weights are renamed into place, the JSON is not written yet
    ck.atomic_write_text = lambda path, text: stall()
meta = json.loads((directory / "model.json").read_text())
torch.manual_seed(1)
ck.save_pretrained(directory, create_model("lenet", num_classes=2), {**meta, "epoch": 4})
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["weights", "json"])
def test_sigkill_while_writing_the_best_model(tmp_path, children, stage):
    """Killed mid-save: the previous model still loads (weights) or the mixed pair is refused (json)."""
    ckpt = make_checkpoint(tmp_path / "run", image_size=32)  # model A, epoch 3
    a = load_file(str(ckpt / "model.safetensors"))
    ready = tmp_path / "ready"
    proc, log = _start(children, ["-c", SAVE_AND_STALL, stage, ckpt, ready], tmp_path / "child.log", _env(tmp_path))
    _wait_for(ready, proc, log, timeout=120)
    _sigkill(proc)
    if stage == "weights":
        assert list(ckpt.glob(".model.safetensors.*.tmp"))  # the half-written file, left by the kill
        model, meta, _ = load_pretrained(ckpt)  # A, whole: the partial file was never renamed in
        assert meta["epoch"] == 3
        assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())
        assert create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)}).extensions["rvf"].meta["epoch"] == 3
    else:
        # New weights beside the old JSON (its threshold, epoch, metrics): refused, never served.
        with pytest.raises(CheckpointError, match="from different saves"):
            load_pretrained(ckpt)
        with pytest.raises(CheckpointError, match="from different saves"):
            create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)})
        make_checkpoint(ckpt, image_size=32, seed=2)  # the next complete save (a resumed run) repairs it
        assert load_pretrained(ckpt)[1]["epoch"] == 3


# A child that builds the decode cache and stalls part-way, to be SIGKILLed there.
BUILD_AND_STALL = """
import sys, time
from pathlib import Path
import rvf.data.cache as cache
from rvf.data import RVF10K
stage, root, cache_dir, ready = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
def stall(*args):
    ready.touch()
    time.sleep(120)
real_load, n = cache.load_image, [0]
def load_then_stall(*args):
    n[0] += 1
    if n[0] == 5:  # a third of the split decoded into the temp file
        stall()
    return real_load(*args)
if stage == "decode":
    cache.load_image = load_then_stall
else:  # "json": the .npy is renamed into place, the JSON that marks it complete is not written
    cache.atomic_write_text = stall
cache.build_cache(RVF10K(root, "train").samples, 16, cache_dir=cache_dir, num_workers=1, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["decode", "json"])
def test_sigkill_while_building_the_cache(tmp_path, children, stage):
    """Killed mid-build: the next build decodes again instead of trusting what is on disk."""
    root = make_folder_dataset(tmp_path / "data", n=6, size=24)
    samples = RVF10K(root, "train").samples
    expected = np.stack([load_image(p, 16).numpy() for p, _ in samples])  # (12, 3, 16, 16)
    cache_dir, ready = tmp_path / "cache", tmp_path / "ready"
    proc, log = _start(children, ["-c", BUILD_AND_STALL, stage, root, cache_dir, ready], tmp_path / "child.log",
                       _env(tmp_path))
    _wait_for(ready, proc, log, timeout=120)
    _sigkill(proc)
    assert not list(cache_dir.glob("*.json"))
    if stage == "decode":
        assert list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob("*.npy"))
    else:
        [npy] = cache_dir.glob("*.npy")  # complete pixels, but unmarked: overwrite them to prove they are not used
        np.lib.format.open_memmap(npy, mode="r+")[:] = 7
    built = build_cache(samples, 16, cache_dir=cache_dir, num_workers=1, progress=False)
    assert np.array_equal(np.asarray(built.images), expected)
    assert len(list(cache_dir.glob("*.json"))) == 1


# ----------------------------------------------------------------------------- pickles and bad JSON

class Payload:
    """Unpickling this creates the folder `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_checkpoint_files_get_the_usual_mode(tmp_path):
    # safetensors' save_file makes its file anew with mode 0600: model.safetensors was unreadable
    # to a web app run as another user, while model.json beside it was 0644.
    old = os.umask(0o022)
    try:
        ckpt = make_checkpoint(tmp_path / "ckpt", image_size=32)
    finally:
        os.umask(old)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in ckpt.iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def _pickle_checkpoint(directory: Path) -> dict:
    """A checkpoint folder with model.json + model.pt (a state dict) and no safetensors."""
    ckpt = make_checkpoint(directory, image_size=32)
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "model.pt")
    return state


def test_pickle_weights_are_refused_without_the_flag(tmp_path):
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    torch.save({"w": torch.zeros(1)}, only_pt / "model.pt")
    with pytest.raises(CheckpointError, match=r"'model\.pt'.*--allow-pickle"):
        load_pretrained(only_pt)
    with pytest.raises(CheckpointError, match=r"\['model\.pt'\] but no model\.json"):
        load_pretrained(only_pt, allow_pickle=True)  # nothing says which model the weights are for
    _pickle_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"unpickling can run arbitrary code"):
        load_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        create_app({"TESTING": True, "MODEL_CHECKPOINT": str(tmp_path / "ckpt")})


def test_allow_pickle_loads_a_state_dict(tmp_path, monkeypatch):
    state = _pickle_checkpoint(tmp_path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    model, meta, _ = load_pretrained(tmp_path, allow_pickle=True)
    assert loads == [{"map_location": "cpu", "weights_only": True}]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    app = create_app({"TESTING": True, "MODEL_CHECKPOINT": str(tmp_path), "ALLOW_PICKLE": True})
    assert app.test_client().get("/api/health").json["model"] == "lenet"


def test_predict_cli_allow_pickle_flag(tmp_path, capsys):
    script = _load_script("predict")
    _pickle_checkpoint(tmp_path / "ckpt")
    face = tmp_path / "face.jpg"
    face.write_bytes(image_bytes("JPEG"))
    argv = ["--checkpoint", str(tmp_path / "ckpt"), str(face), "--device", "cpu"]
    assert script.main(script.get_args_parser().parse_args(argv)) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert script.main(script.get_args_parser().parse_args([*argv, "--allow-pickle"])) == 0
    assert "face.jpg" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_is_not_executed_even_with_the_flag(tmp_path, fmt):
    ckpt = make_checkpoint(tmp_path / "ckpt", image_size=32)
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    weights = {"fc.bias": Payload(marker), "fc.weight": torch.zeros(2, 84)}
    if fmt == "torch.save":
        torch.save(weights, ckpt / "model.pt")
    else:
        (ckpt / "model.pkl").write_bytes(pickle.dumps(weights, protocol=2))
    for allow_pickle in (False, True):
        with pytest.raises(CheckpointError, match="allow-pickle" if not allow_pickle else r"weights_only=True\): "
                           r"it refers to \S*mkdir"):
            load_pretrained(ckpt, allow_pickle=allow_pickle)
        assert not marker.exists()
    # The control: the same bytes really run their payload when unpickled without weights_only.
    if fmt == "torch.save":
        torch.load(ckpt / "model.pt", weights_only=False)
    else:
        pickle.loads((ckpt / "model.pkl").read_bytes())
    assert marker.is_dir()


@pytest.mark.parametrize("edit, message", [
    ({"model_name": "lenet9"}, r"cannot build model 'lenet9': Unknown model 'lenet9'\. rvf models: alexnet"),
    ({"model_name": "timm:no_such_net"}, r"cannot build model 'timm:no_such_net'"),
    ({"model_args": {"num_classes": 3}}, r"does not match model 'lenet'.*size mismatch for fc\.weight"),
    ({"model_args": {"num_classes": 2, "widths": [8, 16]}}, r"size mismatch for features\.0\.weight"),
    ({"model_name": "resnet50"}, r"does not match model 'resnet50'.*Missing key"),
    ({"model_args": {"num_classes": 2, "no_such_arg": 1}}, r"cannot build model 'lenet'.*no_such_arg"),
], ids=["unknown-model", "unknown-timm-model", "num-classes", "widths", "other-model", "unknown-arg"])
def test_json_that_does_not_fit_the_weights_is_a_clear_error(tmp_path, edit, message):
    ckpt = make_checkpoint(tmp_path, image_size=32)
    meta = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_pretrained(ckpt)
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fuzzing the upload path

def _seed_images() -> list[bytes]:
    """Small valid files in every format the app reads: what the mutations start from."""
    size = (40, 32)
    return [image_bytes("JPEG", size=size), image_bytes("JPEG", size=size, progressive=True),
            image_bytes("PNG", size=size), image_bytes("PNG", mode="P", size=size),
            image_bytes("PNG", mode="RGBA", size=size), image_bytes("PNG", mode="I;16", size=size),
            image_bytes("GIF", mode="P", size=size), image_bytes("WEBP", size=size),
            image_bytes("BMP", size=size), image_bytes("TIFF", size=size),
            image_bytes("JPEG", mode="CMYK", size=size)]


SEEDS = _seed_images()
MAGICS = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM",
          b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00", b"%PDF-1.4", b"\x1f\x8b\x08"]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image with a few bytes flipped, set, inserted, deleted, or cut off (headers favoured)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        n = len(data)
        at = draw(st.one_of(st.integers(0, min(n, 64) - 1), st.integers(0, n - 1))) if n else 0
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip" and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01])) if draw(st.booleans()) \
                else draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


random_bytes = st.one_of(st.binary(max_size=4096),
                         st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGICS), st.binary(max_size=4096)))


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    """One app for every example (hypothesis reuses it), on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("fuzz"), image_size=32)
    yield create_app({"TESTING": True, "MODEL_CHECKPOINT": str(ckpt)}).test_client()
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _hang_guard(seconds: int = HANG_SECONDS):
    """Dump every stack and exit if the block runs for `seconds`: a hang fails CI, it never stalls it."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@contextlib.contextmanager
def _production_warnings():
    """Python's default warning filters plus the app's own, instead of the suite's "error".

    Under "error", a Pillow warning such as "Corrupt EXIF data" would become an exception that
    a served app never raises; the fuzz tests check what a client of the real server sees.
    """
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        refuse_decompression_bombs()
        yield seen


def _post_and_check(client, files: list[tuple[str, bytes]], gradcam: bool = False) -> None:
    data = {"image": [(io.BytesIO(b), name) for name, b in files]}
    with _hang_guard(), _production_warnings():
        r = client.post("/api/predict" + ("?gradcam=1" if gradcam else ""), data=data,
                        content_type="multipart/form-data")
    event(f"HTTP {r.status_code}")  # tallied by --hypothesis-show-statistics
    assert r.status_code < 500 and r.status_code in (200, 400, 413, 422), r.status_code
    assert r.is_json
    if r.status_code == 200:
        assert all(("label" in x) != ("error" in x) for x in r.json["results"])
    else:
        assert isinstance(r.json["error"], str) and r.json["error"]


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=FUZZ_DEADLINE, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=random_bytes, name=st.text(max_size=40))
def test_fuzz_random_bytes_never_5xx(fuzz_client, data, name):
    _post_and_check(fuzz_client, [(name, data)])


@FUZZ
@given(data=mutated_images(), gradcam=st.booleans())
def test_fuzz_mutated_images_never_5xx(fuzz_client, data, gradcam):
    _post_and_check(fuzz_client, [("face.img", data)], gradcam)


@FUZZ
@given(files=st.lists(st.one_of(mutated_images(), st.sampled_from(SEEDS), random_bytes), min_size=1, max_size=4))
def test_fuzz_several_files_never_5xx(fuzz_client, files):
    _post_and_check(fuzz_client, [(f"{i}.jpg", b) for i, b in enumerate(files)])


def test_seeds_are_valid_images():
    """The mutations start from files that decode: otherwise the fuzzer only ever tests garbage."""
    for data in SEEDS:
        Image.open(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------- safe defaults

def test_app_script_binds_loopback_without_debug(checkpoint, monkeypatch):
    import flask

    runs = []
    monkeypatch.setattr(flask.Flask, "run", lambda app, **kw: runs.append((app, kw)))
    script = _load_script("app")
    assert script.main(script.get_args_parser().parse_args(["--checkpoint", str(checkpoint)])) == 0
    [(app, kw)] = runs
    assert kw["host"] == "127.0.0.1" and kw["debug"] is False and not app.debug
    assert app.config["MAX_CONTENT_LENGTH"] == 10 * 2**20 and app.config["ALLOW_PICKLE"] is False


_OPENED: list | None = None  # paths opened while a check runs (see _record_opens)


def _audit(event, args):
    if _OPENED is not None and event == "open" and args[0] is not None:
        _OPENED.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else str(args[0]))


@pytest.mark.parametrize("raw", ["../../evil-name.jpg", "/tmp/evil-name.jpg", "evil-name.jpg"])
def test_upload_filename_never_touches_the_filesystem(fuzz_client, raw):
    """Every file the process opens during a request is recorded (audit hook): none is named by the client.

    The upload is over Werkzeug's 500 KB in-memory limit, so it is spooled to a temp file.
    """
    global _OPENED
    if not getattr(_audit, "installed", False):  # audit hooks cannot be removed: install once
        sys.addaudithook(_audit)
        _audit.installed = True
    big = image_bytes("PNG", size=(700, 700))
    assert len(big) > 500 * 1024
    _OPENED = []
    try:
        r = fuzz_client.post("/api/predict", data={"image": (io.BytesIO(big), raw)},
                             content_type="multipart/form-data")
        opened = _OPENED
    finally:
        _OPENED = None
    r.request.environ["wsgi.input"].close()  # the test client's own spooled copy of the body
    assert r.status_code == 200 and r.json["results"][0]["filename"] == "evil-name.jpg"
    assert opened, "the spooled upload should have opened a temp file"
    assert not [p for p in opened if "evil-name" in p]


# ----------------------------------------------------------------------------- load

@pytest.mark.slow
def test_gunicorn_under_load(tmp_path):
    """The load script against gunicorn on loopback, CI-sized (the 1,000-request run is in the docs)."""
    ckpt = make_checkpoint(tmp_path / "ckpt")  # 64 px LeNet, random weights
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "scripts/load_test.py", "--checkpoint", str(ckpt), "--requests", "200",
                        "--concurrency", "8", "--timeout", "300", "--out", str(out)],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["served_ok"] == 200 and report["errors"] == 0 and report["not_sent"] == 0
    assert report["rss_mb"]["growth"] < 50
    assert report["server"]["bind"].startswith("127.0.0.1:")
    print(r.stdout)


def test_load_script_refuses_a_non_loopback_host(tmp_path):
    r = subprocess.run([sys.executable, "scripts/load_test.py", "--checkpoint", str(tmp_path), "--host", "8.8.8.8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a loopback address" in r.stderr


def test_load_script_checks_the_checkpoint_before_starting_a_server(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.json").unlink()  # the weights without the file that names their model
    r = subprocess.run([sys.executable, "scripts/load_test.py", "--checkpoint", str(ckpt)],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "has model.safetensors but no model.json" in r.stderr
    assert "Traceback" not in r.stderr and "gunicorn" not in r.stderr
