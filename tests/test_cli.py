"""The scripts' command lines: what every one of them promises, whatever it does."""

import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
# Its --format choices and --atol default are rvf.export's, a module that is torch through.
IMPORT_TORCH_FOR_HELP = {"export.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_does_not_import_torch(script):
    """--help is read before anything runs: torch's import (train.py's --help took 3 s) is for the work."""
    if script in IMPORT_TORCH_FOR_HELP:
        pytest.skip("its options come from a module that imports torch")
    run = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = [sys.argv[1], '--help']; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", run, str(ROOT / "scripts" / script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:")
