"""Exports give PyTorch's probabilities (atol 1e-4) on real images, for scratch and timm models."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import ROOT, make_checkpoint
from torch import nn

from rvf.export import DEFAULT_ATOL, ExportError, check_parity, default_output, export_checkpoint, load_exported
from rvf.inference import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

ATOL = 1e-4  # on probabilities
assert DEFAULT_ATOL == ATOL

# (model, input size): resnet50 and the timm model at 64 px keep the exports fast on a CPU. LeNet at 96 px
# max-pools its 21 px S4 map to 13 in windows of 2 and 3 px, which ONNX gets from our own decomposition.
MODELS = [("lenet", None), ("resnet50", 64), ("timm:resnet18", 64), ("lenet", 96)]


@pytest.fixture(scope="module", params=MODELS,
                ids=[f"{m}-{s}px" if m == "lenet" and s else m for m, s in MODELS])
def model_checkpoint(request, tmp_path_factory):
    name, size = request.param
    return make_checkpoint(tmp_path_factory.mktemp(name.replace(":", "_")), name, image_size=size)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_images(model_checkpoint, fmt, face_paths, tmp_path):
    out = export_checkpoint(model_checkpoint, fmt, tmp_path / f"model.{fmt}")
    assert out.is_file()
    predictor = Predictor.from_checkpoint(model_checkpoint)
    images = torch.stack([predictor.load(p) for p in face_paths])  # (4, 3, S, S): a batch size never exported
    run, meta = load_exported(out, fmt)
    probs = run(images.numpy())  # (B, 2)
    assert probs.shape == (len(face_paths), 2)
    np.testing.assert_allclose(probs[:, 0], predictor.predict_batch(images).numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert run(images[:1].numpy()).shape == (1, 2)  # the batch axis is dynamic
    assert meta["model_name"] == predictor.model_name and meta["threshold"] == predictor.threshold
    assert check_parity(out, fmt, model_checkpoint, images, atol=ATOL) <= ATOL


def test_export_keeps_the_models_tta(face_paths, tmp_path):
    ckpt = make_checkpoint(tmp_path / "tta", tta_hflip=True)
    out = export_checkpoint(ckpt, "torchscript", tmp_path / "m.pt")
    predictor = Predictor.from_checkpoint(ckpt)
    images = torch.stack([predictor.load(p) for p in face_paths])
    run, _ = load_exported(out, "torchscript")
    np.testing.assert_allclose(run(images.numpy())[:, 0], predictor.predict_batch(images).numpy(), rtol=0, atol=ATOL)


def test_parity_check_catches_a_wrong_export(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt")
    other = make_checkpoint(tmp_path / "other", seed=1)  # same architecture, other weights
    with pytest.raises(ExportError, match="differ"):
        check_parity(out, "torchscript", other)


def test_parity_check_catches_nan_probabilities(checkpoint, tmp_path, monkeypatch):
    # NaN compares false with everything: "diff > atol" would pass an export that outputs only NaN.
    import rvf.export

    out = export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt")
    monkeypatch.setattr(rvf.export, "load_exported",
                        lambda path, fmt: (lambda images: np.full((len(images), 2), np.nan, np.float32), {}))
    with pytest.raises(ExportError, match="probabilities differ from PyTorch's by nan"):
        check_parity(out, "torchscript", checkpoint)


def load_script():
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(capsys, *argv):
    script = load_script()
    code = script.main(script.get_args_parser().parse_args([str(a) for a in argv]))
    return code, *capsys.readouterr()


def test_export_script_default_output(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    code, out, err = run_script(capsys, "--checkpoint", ckpt, "--format", "onnx")
    assert code == 0, err
    assert default_output(ckpt, "onnx") == ckpt / "model.onnx" and (ckpt / "model.onnx").is_file()
    assert "max |p - p_torch|" in out


def test_export_script_bad_checkpoint(tmp_path, capsys):
    code, out, err = run_script(capsys, "--checkpoint", tmp_path, "--format", "torchscript")
    assert code == 2 and err.startswith("error:") and "not an rvf checkpoint" in err


def test_export_script_removes_a_file_that_fails_its_check(tmp_path, capsys, monkeypatch):
    import rvf.export

    ckpt = make_checkpoint(tmp_path / "ckpt")

    def mismatch(path, *a, **k):
        raise ExportError(f"{path}: onnx probabilities differ from PyTorch's by 0.5 (> atol 0.0001)")

    monkeypatch.setattr(rvf.export, "check_parity", mismatch)
    code, out, err = run_script(capsys, "--checkpoint", ckpt, "--format", "torchscript")
    path = default_output(ckpt, "torchscript")
    assert code == 1 and "differ" in err and f"(removed {path})" in err and not path.exists()
    with pytest.raises(SystemExit):  # argparse: a tolerance below 0 can never pass
        load_script().get_args_parser().parse_args(["--checkpoint", str(ckpt), "--format", "onnx", "--atol", "-1"])
    assert "--atol: must be in [0, inf), got -1" in capsys.readouterr().err


def test_a_file_that_cannot_be_run_fails_the_check_as_an_export_error(checkpoint, tmp_path, monkeypatch):
    import rvf.export

    out = export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt")

    def broken(path, fmt):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(rvf.export, "load_exported", broken)
    with pytest.raises(ExportError, match="cannot run the torchscript file to check it: ImportError"):
        check_parity(out, "torchscript", checkpoint)


class BranchOnPixels(nn.Module):
    """A model torch.export cannot capture: which branch runs depends on the pixels."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        x = x.mean((2, 3))  # (B, 3)
        return self.fc(x if x.mean() > 0 else -x)


def test_a_model_that_cannot_export_fails_in_one_line(tmp_path, capsys, monkeypatch):
    # torch.export's own message for it is 16 lines (a graph dump); torch.onnx's ConversionError,
    # e.g. for timm:test_vit_relpos, 20 lines of colour codes, advice and "Original traceback".
    import rvf.models._registry as registry

    monkeypatch.setitem(registry._model_entrypoints, "branch_on_pixels",
                        lambda pretrained=False, **kwargs: BranchOnPixels(**kwargs))
    ckpt = make_checkpoint(tmp_path / "ckpt", "branch_on_pixels", image_size=16)
    with pytest.raises(ExportError) as e:
        export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx")
    assert str(e.value).startswith("onnx export of 'branch_on_pixels' failed: ") and "\n" not in str(e.value)
    assert "data-dependent" in str(e.value), str(e.value)  # the cause's own line, not the wrapper's advice
    code, out, err = run_script(capsys, "--checkpoint", ckpt, "--format", "onnx")
    assert code == 1 and [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {e.value}"]
