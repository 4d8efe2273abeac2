"""benchmarks/alignment.py on a tiny dataset (its `face_offsets` is rvf.framing's, tested in test_framing.py)."""

import importlib.util
import sys
from pathlib import Path

from synth import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("alignment", ROOT / "benchmarks" / "alignment.py")
alignment = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = alignment
_spec.loader.exec_module(alignment)


def test_script_reports_both_classes_and_an_auc(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RVF_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder_dataset(tmp_path / "data", n=6)
    args = alignment.get_args_parser().parse_args(["--data-dir", str(root), "--image-size", "32", "--max-shift", "2"])
    result = alignment.main(args)
    out = capsys.readouterr().out
    assert set(result) == {"fake", "real", "auc"} and 0 <= result["auc"] <= 1
    assert "fake: offset std" in out and "real: offset std" in out and "ROC AUC" in out
