"""The scripts' command lines: what every one of them promises, whatever it does."""

import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_does_not_import_torch(script):
    """--help is read before anything runs: torch's import (train.py's --help took 3 s) is for the work."""
    run = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = [sys.argv[1], '--help']; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", run, str(ROOT / "scripts" / script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:")


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory):
    """Two tiny 32-px checkpoints, a dataset for them and a zoo folder with one finished run."""
    import shutil

    from conftest import make_checkpoint
    from synth import make_folder_dataset

    tmp = tmp_path_factory.mktemp("reader")
    runs = [make_checkpoint(tmp / name, image_size=32, seed=seed) for seed, name in enumerate("ab")]
    shutil.copytree(ROOT / "results" / "rvf10k" / "lenet", tmp / "zoo" / "lenet")
    return {"A": str(runs[0]), "B": str(runs[1]), "DATA": str(make_folder_dataset(tmp / "data", n=8, size=32)),
            "ZOO": str(tmp / "zoo")}


# Each script that prints its results to stdout, with inputs small enough to run in seconds.
READER_COMMANDS = {
    "evaluate.py": "--checkpoint A --data-dir DATA --output-dir OUT",
    "ensemble.py": "--checkpoints A B --data-dir DATA",
    "robustness.py": "--checkpoint A --data-dir DATA --output-dir OUT --perturbations jpeg:50",
    "near_duplicates.py": "--data-dir DATA --holdout 0.5 --output-dir OUT",
    "train_zoo.py": "--leaderboard-only --output-root ZOO",
    "train.py": "--print-config",
    "framing.py": "--checkpoint A --data-dir DATA --overwrite",
}


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("script", sorted(READER_COMMANDS))
def test_a_reader_that_leaves_early_is_no_error(script, buffered, scoring_inputs, tmp_path):
    """`script.py ... | head -3`: the reader leaves; the script stops quietly, exit 0.

    It ended in a BrokenPipeError traceback and exit 1 (a print that met the closed pipe), or
    "Exception ignored ... BrokenPipeError" and exit 120 (Python's own flush at exit, when
    stdout is buffered), or "error: Broken pipe" (a handler for OSError that caught it).
    """
    import os

    inputs = {**scoring_inputs, "OUT": str(tmp_path / "out")}
    args = [inputs.get(word, word) for word in READER_COMMANDS[script].split()]
    env = {**os.environ, "RVF_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *args], stdout=subprocess.PIPE,
                                stderr=err, cwd=tmp_path, env=env)
        proc.stdout.close()  # the reader is gone before the first line
        code = proc.wait(timeout=300)
    err = (tmp_path / "err.txt").read_text()
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err and "error:" not in err, err[-3000:]
    if script == "near_duplicates.py":  # printed once its files are written, or a reader leaving lost them
        assert (tmp_path / "out" / "near_duplicates.csv").is_file()


def test_a_reader_that_leaves_early_keeps_the_exit_status():
    # A status set in the block (train_zoo.py's 1 for a failed run) stands; the flush at exit is quiet.
    run = ("import sys; sys.path.insert(0, sys.argv[1]); from rvf.cli import stdout_reader_may_leave\n"
           "with stdout_reader_may_leave():\n    print('leaderboard'); sys.exit(3)")
    proc = subprocess.Popen([sys.executable, "-c", run, str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin"})  # buffered: the row meets the closed pipe at the flush
    proc.stdout.close()
    with proc.stderr:
        assert proc.wait(timeout=60) == 3 and proc.stderr.read() == b""
