"""Knowledge distillation (rvf.distill): the blended target, the teachers' checks, train() end to end."""

import json
import re

import numpy as np
import pytest
import torch
from synth import make_folder_dataset

from rvf.checkpoint import CheckpointError, load_pretrained
from rvf.config import ConfigError, TrainConfig, load_config
from rvf.data import DataConfig, DatasetError
from rvf.distill import Teachers, _renormalise, distill_targets
from rvf.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data"), n=12, size=32)


def _cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(model="lenet", data_dir=str(data_dir), output_dir=str(out), image_size=32, epochs=1,
                batch_size=8, lr=1e-3, holdout=0.25, tracker="none", cache_dir=str(out.parent / "cache"),
                log_every=1, mixed_precision="no")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    """A trained LeNet run folder (32 px, seed 42's holdout slice)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(_cfg(data_dir, out, epochs=2))
    return out


def test_targets_blend_the_smoothed_label_with_the_teachers():
    labels = torch.tensor([0, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
    t = distill_targets(labels, probs, 0.5, 2, smoothing=0.1)  # smoothed one-hot: 0.95 / 0.05
    want = 0.5 * torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.05, 0.95]]) + 0.5 * probs
    assert torch.allclose(t, want) and torch.allclose(t.sum(1), torch.ones(3))
    mixed = torch.tensor([[0.6, 0.4], [0.25, 0.75], [0.5, 0.5]])  # MixUp's targets pass through unsmoothed
    assert torch.allclose(distill_targets(mixed, probs, 0.25, 2, smoothing=0.1), 0.75 * mixed + 0.25 * probs)
    assert torch.equal(distill_targets(labels, probs, 1.0, 2), probs)


def test_a_teacher_normalised_otherwise_gets_its_own_normalisation():
    student = DataConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    other = DataConfig(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert _renormalise(student, student, "cpu") is None
    pixels = torch.rand(2, 3, 4, 4)  # in [0, 1]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (other.mean, other.std))
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    teachers = Teachers([model], [_renormalise(student, other, "cpu")])
    probs = teachers((pixels - 0.5) / 0.5)
    assert torch.allclose(seen[0], (pixels - mean) / std, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(2)) and not probs.requires_grad
    teachers.train()  # a caller's train() leaves BatchNorm and dropout as trained
    assert not any(m.training for m in teachers.modules())


def test_train_distils_the_teachers_probabilities_of_the_batch_it_trains_on(data_dir, teacher, tmp_path,
                                                                           monkeypatch):
    import rvf.train as rt

    seen, original = [], rt.build_train_step

    def spy(*args, **kwargs):
        step = original(*args, **kwargs)

        def record(x, targets):
            seen.append((x.clone(), targets.clone()))
            return step(x, targets)
        return record

    monkeypatch.setattr(rt, "build_train_step", spy)
    labels_seen = []
    real_targets = rt.distill_targets

    def spy_targets(targets, *args, **kwargs):
        labels_seen.append(targets.clone())
        return real_targets(targets, *args, **kwargs)

    monkeypatch.setattr(rt, "distill_targets", spy_targets)
    out = tmp_path / "student"
    m = train(_cfg(data_dir, out, teachers=[str(teacher), str(teacher)], distill_weight=0.3, label_smoothing=0.1,
                   hflip=0.5, seed=7, split_seed=42))
    assert np.isfinite(m["history"][0]["train_loss"]) and len(seen) == m["counts"]["fit"] // 8
    model, _, _ = load_pretrained(teacher)
    for (x, targets), labels in zip(seen, labels_seen):
        with torch.no_grad():
            p = model(x).softmax(1)  # two copies of one teacher average to it
        smooth = torch.nn.functional.one_hot(labels, 2).float() * 0.9 + 0.05
        assert torch.allclose(targets, 0.7 * smooth + 0.3 * p, atol=1e-5)
    assert json.loads((out / "model.json").read_text())["config"]["teachers"] == [str(teacher)] * 2


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 48}, "reads 32 px images and the student 48 px"),
    ({"split_seed": 3}, r"held out another slice of train \(split_seed 42, holdout 0.25.*Set split_seed: 42"),
    ({"holdout": 0.5}, "held out another slice of train"),
    ({"distill_weight": 0.0}, "distill_weight is 0: nothing would be distilled"),
])
def test_a_teacher_that_does_not_fit_the_run_is_refused_before_any_decoding(data_dir, teacher, tmp_path,
                                                                           overrides, message):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=message):
        train(_cfg(data_dir, tmp_path / "run", teachers=[str(teacher)], **overrides))
    assert not cache.exists() or not any(cache.iterdir())  # nothing was decoded


def test_a_folder_that_is_not_a_run_is_named(data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="^teacher .*empty \\(the teachers key\\): .*empty is not an rvf"):
        train(_cfg(data_dir, tmp_path / "run", teachers=[str(tmp_path / "empty")]))
    # Named as a teacher, not as just some checkpoint folder.
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=f"^teacher {re.escape(str(missing))} \\(the teachers key\\): "
                                              f"checkpoint folder {re.escape(str(missing))} does not exist$"):
        train(_cfg(data_dir, tmp_path / "run", teachers=[str(missing)]))


@pytest.mark.parametrize("override, message", [
    ("teachers=[1]", "teachers must be a list of run folders"),
    ("teachers=runs/x", "teachers must be a list"),
    ("distill_weight=1.5", "distill_weight must be between 0 and 1"),
])
def test_config_keys_are_checked(override, message):
    from rvf.config import parse_override

    key, value = parse_override(override)
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={key: value})


def test_a_teacher_trained_on_other_data_is_refused_before_any_decoding(data_dir, teacher, tmp_path):
    other = make_folder_dataset(tmp_path / "other", n=10, size=32)  # the same split settings draw other images
    with pytest.raises(DatasetError, match=rf"teacher {re.escape(str(teacher))} trained on another list of train"):
        train(_cfg(other, tmp_path / "run", teachers=[str(teacher)]))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
