"""rvf.framing: where a face sits against the training faces, saved with a run and checked per image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synth import aligned_faces, blurry_face, png_bytes

from rvf.framing import FILE_NAME, FramingReference, dataset_images, face_offsets

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def _face(seed: int = 0) -> torch.Tensor:
    return blurry_face(seed, SIZE)


def _faces(n: int, jitter: int = 1, seed: int = 0) -> torch.Tensor:
    return aligned_faces(n, SIZE, jitter, seed)


@pytest.fixture(scope="module")
def ref() -> FramingReference:
    return FramingReference.fit(_faces(300))


def test_offsets_recover_known_shifts_whatever_the_brightness():
    template = _face()
    shifts = [(0, 0), (2, -1), (-3, 3), (1, 0), (0, -2)]
    # torch.roll moves content down/right for positive shifts; a gain and an offset must not matter.
    faces = torch.stack([0.5 * torch.roll(template, s, dims=(0, 1)) + 20 * k for k, s in enumerate(shifts)])
    offsets, corr = face_offsets(faces, template, max_shift=3)
    assert offsets.tolist() == [list(s) for s in shifts]
    assert torch.allclose(corr, torch.ones(len(shifts)), atol=1e-4)


def test_a_shift_that_leaves_the_image_is_refused():
    with pytest.raises(ValueError, match="max_shift 30"):
        face_offsets(torch.zeros(1, 64, 64), torch.zeros(64, 64), max_shift=30)


def test_fit_sets_limits_that_most_training_faces_meet(ref):
    assert ref.size == SIZE and ref.n == 300 and ref.max_shift == 5  # 10/128 of the side
    assert 0 < ref.max_offset <= 2 ** 0.5 + 1e-6  # the faces were moved by at most 1 px each way
    checks = ref.check(_faces(200, seed=1))  # fresh faces from the same distribution
    assert np.mean([c.ok for c in checks]) >= 0.9
    assert all(c.note is None for c in checks if c.ok)


def test_a_reframed_face_is_off_and_says_which_way(ref):
    moved = torch.roll(_faces(1, jitter=0), (4, 0), dims=(2, 3))  # 4 px down, beyond any training face
    (c,) = ref.check(moved)
    assert not c.ok and "eyes sit" in c.note and "framed as the training faces were" in c.note
    assert c.offset == (round(100 * 4 / SIZE, 2), 0.0)  # hundredths of the side, + = down


def test_the_offset_note_never_contradicts_its_limit(ref):
    # A reference whose own faces reach past the search's edge (jitter 6 > max_shift 5): a face at
    # the edge is then within what training faces do, and must not be called off for it.
    loose = FramingReference.fit(_faces(300, jitter=6))
    assert loose.max_offset > loose.max_shift
    moved = torch.roll(_faces(1, jitter=0), (loose.max_shift, 0), dims=(2, 3))
    (c,) = loose.check(moved)
    assert c.note is None or "eyes sit" not in c.note
    # Past the limit the note gives the offset found, "or more" when the search hit its edge.
    (far,) = ref.check(torch.roll(_faces(1, jitter=0), (7, 7), dims=(2, 3)))
    assert f"eyes sit {100 * 50 ** 0.5 / SIZE:.1f} % or more" in far.note


def test_a_different_picture_is_off_by_its_correlation(ref):
    other = _face(seed=7).to(torch.uint8).expand(1, 3, SIZE, SIZE)
    (c,) = ref.check(other)
    assert not c.ok and c.correlation < ref.min_correlation and "matches the training faces' poorly" in c.note


def test_the_check_runs_at_the_reference_size_whatever_the_model_size(ref):
    big = F.interpolate(_faces(4).float(), size=(2 * SIZE, 2 * SIZE), mode="bilinear").round().to(torch.uint8)
    assert all(c.ok for c in ref.check(big))


def test_fit_draws_at_most_max_images_and_caps_the_size():
    ref = FramingReference.fit(_faces(50), max_images=20, size=32)
    assert ref.n == 20 and ref.size == 32
    big = F.interpolate(_faces(10).float(), size=(256, 256)).to(torch.uint8)
    assert FramingReference.fit(big).size == 128  # a 256 px model's faces are compared at 128 px


@pytest.mark.parametrize("kw, match", [({"quantile": 0.0}, "quantile"), ({"quantile": 0.5}, "quantile")])
def test_fit_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        FramingReference.fit(_faces(10), **kw)


def test_fit_needs_two_faces():
    with pytest.raises(ValueError, match="at least 2"):
        FramingReference.fit(_faces(1))


def test_save_and_load_round_trip(ref, tmp_path):
    assert FramingReference.load(tmp_path) is None  # a run trained before the check: no check, no error
    path = ref.save(tmp_path)
    assert path == tmp_path / FILE_NAME and not list(tmp_path.glob("*.tmp"))
    back = FramingReference.load(tmp_path)
    assert torch.equal(back.template, ref.template)
    assert (back.max_shift, back.max_offset, back.min_correlation, back.quantile, back.n) == \
        (ref.max_shift, ref.max_offset, ref.min_correlation, ref.quantile, ref.n)


def test_a_corrupt_reference_is_named(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=FILE_NAME):
        FramingReference.load(tmp_path)


def test_dataset_images_reads_a_cache_or_any_dataset_of_pairs():
    faces = _faces(6)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(faces)

        def __getitem__(self, i):
            return faces[i], 0

    class Cache:  # DecodedImages' shape: a whole array and the rows of this subset
        images, indices = faces.numpy(), np.array([5, 1, 3])

    assert torch.equal(torch.as_tensor(dataset_images(Pairs())[1:3]), faces[1:3])
    view = dataset_images(Cache())
    assert len(view) == 3 and np.array_equal(view[0:2], faces.numpy()[[5, 1]])


# --- in a run, the CLI, the app and robustness ---

def test_predictions_carry_the_framing_check(tmp_path, ref):
    from conftest import make_checkpoint

    from rvf.inference import load_predictor

    run = make_checkpoint(tmp_path / "run", image_size=SIZE)
    plain = load_predictor(run)
    assert plain.framing is None and not plain.describe()["framing_check"]
    faces = _faces(2)
    assert plain.predict_sources([png_bytes(f) for f in faces])[0].framing is None

    ref.save(run)
    framed = load_predictor(run)
    assert framed.describe()["framing_check"]
    aligned, moved = framed.predict_sources([png_bytes(faces[0]), png_bytes(torch.roll(faces[1], (5, 5), dims=(1, 2)))])
    assert aligned.to_dict()["framing"]["ok"] is True and "note" not in aligned.framing
    assert moved.framing["ok"] is False and moved.p_fake is not None  # warned about, still answered


def test_an_ensemble_checks_framing_with_a_member_that_can(tmp_path, ref):
    from conftest import make_checkpoint

    from rvf.inference import EnsemblePredictor, Predictor

    plain = Predictor.from_checkpoint(make_checkpoint(tmp_path / "a", image_size=SIZE))
    framed_run = make_checkpoint(tmp_path / "b", "alexnet", image_size=SIZE)
    ref.save(framed_run)
    ens = EnsemblePredictor([plain, Predictor.from_checkpoint(framed_run)], threshold=0.5)
    assert ens.describe()["framing_check"]
    faces = _faces(2)
    aligned, moved = ens.predict_sources([png_bytes(faces[0]), png_bytes(torch.roll(faces[1], (5, 5), dims=(1, 2)))])
    assert aligned.framing["ok"] and not moved.framing["ok"]
    assert not EnsemblePredictor([plain, plain], threshold=0.5).describe()["framing_check"]


def test_a_corrupt_reference_fails_the_checkpoint_load(tmp_path):
    from conftest import make_checkpoint

    from rvf.checkpoint import CheckpointError
    from rvf.inference import load_predictor

    run = make_checkpoint(tmp_path / "run", image_size=SIZE)
    (run / FILE_NAME).write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=FILE_NAME):
        load_predictor(run)


def test_script_adds_a_check_to_a_run_and_refuses_to_replace_it(tmp_path):
    from conftest import make_checkpoint
    from synth import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", n=6, size=32)
    run = make_checkpoint(tmp_path / "run", image_size=32)
    cmd = [sys.executable, "scripts/framing.py", "--checkpoint", str(run), "--data-dir", str(data)]
    env = {**os.environ, "RVF_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "12 faces" in r.stdout and FramingReference.load(run).size == 32
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = subprocess.run(cmd + ["--overwrite", "--quantile", "0.7"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 2 and "--quantile" in r.stderr


def test_predict_cli_adds_a_framing_column(tmp_path, ref, capsys):
    import csv
    import importlib.util

    from conftest import make_checkpoint

    run = make_checkpoint(tmp_path / "run", image_size=SIZE)
    ref.save(run)
    faces = _faces(2)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_aligned.png").write_bytes(png_bytes(faces[0]))
    (tmp_path / "in" / "b_moved.png").write_bytes(png_bytes(torch.roll(faces[1], (5, 5), dims=(1, 2))))
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "scripts" / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "preds.csv"
    args = script.get_args_parser().parse_args(["--checkpoint", str(run), str(tmp_path / "in"), "--output", str(out),
                                                "--device", "cpu"])
    assert script.main(args) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["framing"][:3] for r in rows] == ["ok", "off"] and "eyes sit" in rows[1]["framing"]
    assert "1 framed unlike the training faces" in capsys.readouterr().err
