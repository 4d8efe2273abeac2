"""The training loop end to end: reports, resume, W&B offline, DDP, bad input, real data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synth import SHARED_MINI, make_folder_dataset

from rvf.config import TrainConfig
from rvf.train import RunDirError, cpu_threads, latest_state, train

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["model.safetensors", "model.json", "framing.safetensors", "config.yaml", "metrics.json",
           "classification_report.txt", "confusion_matrix.png", "curves.png", "roc.png", "samples.png",
           "architecture.txt"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data"), n=12, size=32)


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(RVF_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path), **extra)
    return env


def _run(args, tmp_path, timeout=300, **env):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(tmp_path, **env))


def _torchrun_one_error(args, tmp_path, timeout=300, **env):
    """Run `args` (a script and its options) in 2 CPU processes; assert that the main one printed
    exactly one `error:` line and the other none and no traceback. Returns (result, that line).

    --monitor-interval 5: the launcher's SIGTERM comes too late to hide the other's traceback.
    """
    import re

    logs = tmp_path / "logs"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "--monitor-interval", "5", "--log-dir", str(logs), "--redirects", "2"]
    r = _run([*launch, *args], tmp_path, timeout=timeout, ACCELERATE_USE_CPU="1", **env)
    stderr = {int(f.parent.name): f.read_text() for f in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(stderr) == [0, 1], r.stderr[-3000:]
    errors = re.findall(r"error: [^\r\n]*", stderr[0])  # after a tqdm bar
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr[1] and "error:" not in stderr[1], stderr
    assert r.returncode == 1, r.stderr[-3000:]
    return r, errors[0]


def _cfg(data_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(model="lenet", data_dir=str(data_dir), output_dir=str(tmp_path / "run"), image_size=32,
                epochs=2, batch_size=8, lr=1e-3, holdout=0.25, tracker="none", cache_dir=str(tmp_path / "cache"),
                log_every=1)
    return TrainConfig(**{**base, **kw})


def _best_epoch(history: list[dict]) -> int:
    """The epoch selection must pick: best holdout accuracy, ties to the lower loss (the first on exact ties)."""
    scores = [(h["holdout_accuracy"], -h["holdout_loss"]) for h in history]
    return 1 + scores.index(max(scores))


def test_train_script_end_to_end_writes_every_report(data_dir, tmp_path):
    out = tmp_path / "run"
    r = _run([sys.executable, "scripts/train.py", "--config", "configs/lenet.yaml", "--data-dir", str(data_dir),
              "--output-dir", str(out), "--epochs", "2", "--image-size", "32", "--batch-size", "8",
              "--tracker", "none", "--set", "holdout=0.25"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in REPORTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    if shutil.which("dot"):
        assert (out / "architecture.png").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["valid"]["n"] == 24 and m["counts"] == {"fit": 18, "holdout": 6, "valid": 24}
    assert len(m["history"]) == 2 and m["best_epoch"] == _best_epoch(m["history"])
    for key in ("accuracy", "roc_auc", "average_precision", "per_class", "confusion_matrix"):
        assert key in m["valid"]
    assert m["params"] > 0 and m["macs"] > 0 and m["device"] and m["train_seconds"] > 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["model_name"] == "lenet" and meta["data_config"]["image_size"] == 32
    assert meta["classes"] == ["fake", "real"] and 0 <= meta["threshold"] <= 1.0 + 1e-6
    assert "Conv2d" in (out / "architecture.txt").read_text()
    assert "precision" in (out / "classification_report.txt").read_text()
    assert latest_state(out) is not None
    assert "Saving current state" not in r.stderr and "saved in" not in r.stderr  # Accelerate's per-file lines
    # a second run into the same folder is refused, nothing lost; --overwrite replaces it
    before = (out / "model.safetensors").read_bytes()
    r = _run([sys.executable, "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(out),
              "--tracker", "none"], tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_learns_the_synthetic_task(data_dir, tmp_path):
    m = train(_cfg(data_dir, tmp_path, epochs=6, model_args={"drop_rate": 0.0}))
    assert m["valid"]["accuracy"] >= 0.9 and m["valid"]["roc_auc"] >= 0.95
    assert m["best_epoch"] == _best_epoch(m["history"])
    assert json.loads((tmp_path / "run" / "model.json").read_text())["epoch"] == m["best_epoch"]


def test_a_holdout_tie_goes_to_the_lower_loss(data_dir, tmp_path, monkeypatch):
    # Every epoch scores the same holdout accuracy; the losses put the best in the middle, so
    # neither "the first" nor "the last" of the tied epochs passes for the rule.
    import rvf.train as rt

    real, holdout = rt.classification_metrics, iter([(0.75, 0.9), (0.75, 0.3), (0.75, 0.5), (0.5, 0.1)])

    def scored(*args, **kwargs):
        m = real(*args, **kwargs)
        if (preset := next(holdout, None)) is not None:  # the 4 holdout passes; the valid split's is real
            m["accuracy"], m["loss"] = preset
        return m

    monkeypatch.setattr(rt, "classification_metrics", scored)
    m = train(_cfg(data_dir, tmp_path, epochs=4))
    assert [h["holdout_loss"] for h in m["history"]] == [0.9, 0.3, 0.5, 0.1]
    assert m["best_epoch"] == 2  # epoch 4's loss is lower, but its accuracy is too
    assert json.loads((tmp_path / "run" / "model.json").read_text())["epoch"] == 2


def test_cpu_threads_take_the_cores_a_launcher_left_idle(monkeypatch):
    import psutil

    import rvf.train as rt

    monkeypatch.setattr(rt, "_cores", lambda: 8)
    monkeypatch.setattr(rt.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    for var in (*rt._LOCAL_SIZE_VARS, *rt._LAUNCHER_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(None, 1) == (torch.get_num_threads(), None)  # no launcher: the user's own 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # under torchrun (or accelerate launch): its default
    threads, note = cpu_threads(None, 1)
    assert threads == 8 and "OMP_NUM_THREADS=1" in note and "cpu_threads" in note
    assert cpu_threads(None, 2)[0] == 4  # two processes share the machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 of the 8 processes are on this machine
    assert cpu_threads(None, 8)[0] == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    assert cpu_threads(None, 1)[0] == 4  # one thread per physical core, not per hyperthread
    assert cpu_threads(3, 1) == (3, None)  # the key wins
    threads, note = cpu_threads(64, 1)  # followed, and said: more threads than cores
    assert threads == 64 and "64 CPU threads" in note and "8 cores" in note
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # asked for: torch read it at start-up
    assert cpu_threads(None, 1) == (torch.get_num_threads(), None)
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")  # libgomp ignores it: not a count to follow
    assert cpu_threads(None, 2) == (2, None)
    monkeypatch.delenv("OMP_NUM_THREADS")  # torch's own default: no note
    assert cpu_threads(None, 1) == (4, None)


def test_training_on_the_cpu_sets_its_threads(data_dir, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # as a launcher leaves them
    try:
        torch.set_num_threads(1)
        m = train(_cfg(data_dir, tmp_path / "auto", epochs=1))
        assert torch.get_num_threads() == m["cpu_threads"] == cpu_threads(None, 1)[0]
        m = train(_cfg(data_dir, tmp_path / "one", epochs=1, cpu_threads=1))
        assert torch.get_num_threads() == m["cpu_threads"] == 1
        # evaluate.py (and ensemble.py) under the same launcher
        from rvf.evaluate import evaluate_checkpoint

        evaluate_checkpoint(tmp_path / "one" / "run", data_dir, cache_dir=str(tmp_path / "cache"),
                            output_dir=tmp_path / "ev")
        assert torch.get_num_threads() == cpu_threads(None, 1)[0]
        # --cpu-threads wins there, as the key does in training
        evaluate_checkpoint(tmp_path / "one" / "run", data_dir, cache_dir=str(tmp_path / "cache"),
                            output_dir=tmp_path / "ev3", cpu_threads=3)
        assert torch.get_num_threads() == 3
        from rvf.ensemble import evaluate_ensemble

        evaluate_ensemble([tmp_path / "auto" / "run", tmp_path / "one" / "run"], data_dir,
                          cache_dir=str(tmp_path / "cache"))
        assert torch.get_num_threads() == cpu_threads(None, 1)[0]
        evaluate_ensemble([tmp_path / "auto" / "run", tmp_path / "one" / "run"], data_dir,
                          cache_dir=str(tmp_path / "cache"), cpu_threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_accelerate_launch_says_it_started_one_process_of_two(data_dir, tmp_path, monkeypatch):
    # `accelerate launch --cpu --num_processes 2` starts one process (CPU processes need MPI)
    # with OMP_NUM_THREADS=1: the run says so, and trains on its share of the cores anyway.
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = _run([*launch, "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1",
              "--image-size", "32", "--batch-size", "8", "--tracker", "none", "--set", "holdout=0.25"],
             tmp_path, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "asked for several processes but started one" in r.stderr and "torchrun" in r.stderr
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # the launcher's 1, as in the child
    threads = cpu_threads(None, 1)[0]
    assert f"x 1, {threads} thread{'s' * (threads > 1)} |" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, two processes are a real DDP run")
def test_processes_accelerate_runs_each_on_its_own_are_refused(data_dir, tmp_path, monkeypatch):
    # torchrun without ACCELERATE_USE_CPU=1 (or `accelerate launch --multi_gpu` with no GPU) starts
    # two processes that each ran the whole job alone, into one folder: refused, said once.
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"),
              "--epochs", "1", "--image-size", "32", "--tracker", "none"], tmp_path, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "WORLD_SIZE=2" in lines[0] and "ACCELERATE_USE_CPU=1 torchrun" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
    # evaluate.py and ensemble.py go through the same check
    from rvf.config import ConfigError
    from rvf.evaluate import evaluate_checkpoint

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2.*scripts/evaluate.py") as e:
        evaluate_checkpoint(tmp_path / "no-run", data_dir)
    assert e.value.reported_elsewhere  # rank 0 says it


def test_trains_with_only_what_the_gpu_image_has(data_dir, tmp_path, monkeypatch):
    """The GPU machines have torch, timm, accelerate, sklearn and matplotlib, but no torchinfo,
    torchview, wandb, Flask or grad-cam: a run must still finish and write its reports."""
    for name in ("torchinfo", "torchview", "wandb", "flask", "pytorch_grad_cam"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    m = train(_cfg(data_dir, tmp_path, epochs=1))
    assert m["macs"] is None and m["params"] > 0
    assert "Conv2d" in (tmp_path / "run" / "architecture.txt").read_text()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_tta_hflip_is_used_for_selection_and_saved(data_dir, tmp_path):
    from rvf.evaluate import evaluate_checkpoint

    m = train(_cfg(data_dir, tmp_path, epochs=1, tta_hflip=True))
    out = tmp_path / "run"
    assert json.loads((out / "model.json").read_text())["tta_hflip"] is True
    ev = evaluate_checkpoint(out, data_dir, cache_dir=str(tmp_path / "cache"), output_dir=tmp_path / "ev")
    assert ev["tta_hflip"] is True
    assert ev["valid"]["roc_auc"] == pytest.approx(m["valid"]["roc_auc"])
    assert ev["valid"]["loss"] == pytest.approx(m["valid"]["loss"], rel=1e-4)
    plain = evaluate_checkpoint(out, data_dir, cache_dir=str(tmp_path / "cache"), output_dir=tmp_path / "ev2",
                                tta_hflip=False)
    assert plain["tta_hflip"] is False and plain["valid"]["loss"] != pytest.approx(m["valid"]["loss"], rel=1e-4)


def test_crop_size_trains_on_crops_and_evaluates_whole_images(data_dir, tmp_path, monkeypatch):
    import rvf.train as rt

    seen = []
    original = rt.build_train_step

    def spy(model, *args, **kwargs):
        model.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].shape[-1])))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(rt, "build_train_step", spy)
    m = train(_cfg(data_dir, tmp_path, model="timm:resnet10t", epochs=1, crop_size=32, image_size=64))
    assert {size for training, size in seen if training} == {32}
    assert {size for training, size in seen if not training} == {64}
    assert m["image_size"] == 64 and 0 <= m["valid"]["accuracy"] <= 1


@pytest.mark.parametrize("overrides, message", [
    ({"crop_size": 32}, "crop_size 32 must be at least 8 and smaller than image_size 32"),
    ({"crop_size": 16, "model": "timm:vit_tiny_patch16_224", "model_args": {"img_size": 32}},
     "cannot take both 16px crops and 32px images"),
])
def test_crop_size_that_cannot_work_fails_before_training(data_dir, tmp_path, overrides, message):
    from rvf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(_cfg(data_dir, tmp_path, epochs=1, image_size=32, **overrides))


@pytest.mark.parametrize("aux_weight", [0.0, 0.3])
def test_auxiliary_heads_train_with_their_weight(data_dir, tmp_path, aux_weight):
    import torch

    from rvf.models import create_model

    args = {"aux_logits": True}
    m = train(_cfg(data_dir, tmp_path, model="inception_v1", epochs=1, model_args=args, aux_weight=aux_weight))
    assert np.isfinite(m["history"][0]["train_loss"]) and m["valid"]["n"] == 24
    torch.manual_seed(42)  # train() seeds with cfg.seed before building the model: the same start
    start = create_model("inception_v1", num_classes=2, **args).state_dict()
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    aux_moved = not torch.equal(trained["aux1.fc.weight"], start["aux1.fc.weight"])
    assert not torch.equal(trained["fc.weight"], start["fc.weight"])
    assert aux_moved == (aux_weight > 0)  # the heads learn exactly when their loss counts


def test_augmentation_keys_reach_the_training_transform(data_dir, tmp_path, monkeypatch):
    import rvf.train

    real_build, built = rvf.train.build_train_transform, []

    def spy_build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rvf.train, "build_train_transform", spy_build)
    m = train(_cfg(data_dir, tmp_path, epochs=1, downscale=0.5, downscale_range=(0.5, 0.75), hflip=0.5))
    assert np.isfinite(m["history"][0]["train_loss"])
    (tf,) = built
    assert (tf.downscale, tf.downscale_range, tf.hflip) == (0.5, (0.5, 0.75), 0.5)


@pytest.mark.parametrize("mix", [{"mixup": 0.2}, {"cutmix": 1.0}], ids=["mixup", "cutmix"])
def test_mixup_and_cutmix_train_on_mixed_soft_targets(data_dir, tmp_path, monkeypatch, mix):
    import torch

    import rvf.train

    real_build, seen = rvf.train.build_mixup, []

    def spy_build(cfg, num_classes):
        mixer = real_build(cfg, num_classes)

        def mix_batch(x, labels):
            before = x.clone()
            x, targets = mixer(x, labels)
            seen.append((before, x.clone(), labels, targets))
            return x, targets
        return mix_batch

    monkeypatch.setattr(rvf.train, "build_mixup", spy_build)
    m = train(_cfg(data_dir, tmp_path, epochs=1, label_smoothing=0.1, **mix))
    assert len(seen) == m["counts"]["fit"] // 8 and np.isfinite(m["history"][0]["train_loss"])
    for before, after, labels, targets in seen:
        assert targets.shape == (len(labels), 2) and torch.allclose(targets.sum(1), torch.ones(len(labels)))
        # Each image is mixed with its partner in the reversed batch, and so are the labels:
        # target = lam * smooth(y) + (1 - lam) * smooth(y_partner), smoothing 0.1 -> 0.95 / 0.05.
        partner = before.flip(0)
        lam = (targets[labels != labels.flip(0)].max(1).values - 0.05) / 0.9
        assert lam.numel() and torch.allclose(lam, lam[0]) and lam[0] < 1  # one lambda per batch
        if "mixup" in mix:
            assert torch.allclose(after, lam[0] * before + (1 - lam[0]) * partner, atol=1e-4)
        else:  # CutMix copies pixels in place, and the kept area is lambda
            assert ((after == before) | (after == partner)).all()
            # (a pasted pixel can equal the one it covers, so "unchanged" may overcount a little)
            unchanged = (after == before).all(1).float().mean()
            assert unchanged == pytest.approx(float(lam[0]), abs=0.01)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_and_its_warmup(data_dir, tmp_path, warmup):
    import torch

    from rvf.train import build_ema

    model = torch.nn.Linear(2, 2)
    ema = build_ema(_cfg(data_dir, tmp_path, ema_decay=0.998, ema_warmup=warmup), model)
    decays = [ema.get_decay(step) for step in (2, 11, 100, 4000, 10**6)]
    if warmup:  # 1 - (1 + k)**-0.75 for the k-th update after the first, capped at ema_decay
        assert decays[:3] == pytest.approx([1 - 2 ** -0.75, 1 - 11 ** -0.75, 1 - 100 ** -0.75])
        assert decays[3] == pytest.approx(0.998, abs=1e-5) and decays[4] == 0.998
    else:
        assert decays == [0.998] * 5
    assert build_ema(_cfg(data_dir, tmp_path), model) is None
    with pytest.raises(ValueError, match="ema_decay must be between 0 and 1"):
        build_ema(_cfg(data_dir, tmp_path, ema_decay=1.5), model)
    m = train(_cfg(data_dir, tmp_path, epochs=1, ema_decay=0.998, ema_warmup=warmup))
    assert np.isfinite(m["history"][0]["holdout_loss"])


def test_split_seed_fixes_the_holdout_slice_across_seeds(data_dir, tmp_path):
    from rvf.data import resolve_data_config
    from rvf.models import create_model
    from rvf.train import load_splits

    data_cfg = resolve_data_config(create_model("lenet"), image_size=32)

    def holdout(**kw):
        return list(load_splits(_cfg(data_dir, tmp_path, **kw), data_cfg, progress=False).holdout.indices)

    assert holdout(seed=1) != holdout(seed=2)  # by default a seed draws its own slice
    assert holdout(seed=1, split_seed=5) == holdout(seed=2, split_seed=5) == holdout(seed=5)


def test_the_holdout_slice_is_the_same_images_with_or_without_the_cache(tmp_path):
    from rvf.data import resolve_data_config
    from rvf.models import create_model
    from rvf.train import load_splits

    root = make_folder_dataset(tmp_path / "d", n=12)
    bad = [root / "train/fake/empty.jpg", root / "train/real/text.jpg", root / "train/real/zzz.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    bad[2].write_bytes(b"\xff\xd8\xff")
    data_cfg = resolve_data_config(create_model("lenet"), image_size=16)

    def splits(cache):
        return load_splits(_cfg(root, tmp_path, cache=cache, skip_bad=True, split_seed=3), data_cfg, progress=False)

    cached, per_file = splits(True), splits(False)
    unreadable = {str(p) for p in bad}
    for part in ("fit", "holdout"):
        decoded = [p for p, _ in getattr(cached, part).samples]
        listed = getattr(per_file, part)
        listed = [listed.dataset.samples[i][0] for i in listed.indices]  # its unreadable ones drop per batch
        assert decoded == [p for p in listed if p not in unreadable], part
    assert set(decoded).isdisjoint(unreadable) and len(cached.fit) + len(cached.holdout) == 27 - 3


@pytest.mark.parametrize("device_data, workers", [(False, 0), (True, 0), (False, 2)],
                         ids=["dataloader", "device_data", "workers"])
def test_resume_is_exact(data_dir, tmp_path, device_data, workers):
    # With workers, a resumed run starts its loaders' workers again where the uninterrupted one kept them
    kw = dict(hflip=0.5, device_data=device_data, num_workers=workers)
    full = train(_cfg(data_dir, tmp_path / "a", epochs=3, **kw))
    cfg = _cfg(data_dir, tmp_path / "b", epochs=2, **kw)
    train(cfg)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg)
    resumed = train(cfg.replace(epochs=3), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["holdout_loss"] == pytest.approx(b["holdout_loss"], abs=1e-6)
    assert full["valid"]["accuracy"] == resumed["valid"]["accuracy"]
    assert full["device_data"] is device_data
    wa = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6) for k in wa)


def test_loader_workers_leave_the_numbers_as_they_are(data_dir, tmp_path):
    # num_workers is speed only (RECIPE_NEUTRAL_KEYS): 0 and 2 must train the same run, epoch 2 on included.
    runs = [train(_cfg(data_dir, tmp_path / str(w), hflip=0.5, device_data=False, num_workers=w)) for w in (0, 2)]
    losses = [[(h["train_loss"], h["holdout_loss"]) for h in m["history"]] for m in runs]
    assert losses[0] == losses[1]


def test_each_epoch_logs_the_lr_its_steps_trained_with(data_dir, tmp_path):
    # Step decay by 10x after every epoch: epoch 1 trains at lr, epoch 2 at lr / 10. (The
    # optimizer's lr after an epoch is the next step's: it logged lr / 10 and lr / 100.)
    m = train(_cfg(data_dir, tmp_path, epochs=2, scheduler="step", step_size=1, gamma=0.1))
    assert [h["lr"] for h in m["history"]] == pytest.approx([1e-3, 1e-4], rel=1e-9)


def test_a_longer_resume_continues_the_schedule_it_now_has(data_dir, tmp_path, capsys):
    # --resume RUN --epochs 3 on a finished 2-epoch cosine run: the rest of a 3-epoch cosine
    # (ending at min_lr), not the 2-epoch cosine's next period climbing back to the peak.
    cfg = _cfg(data_dir, tmp_path, epochs=2, scheduler="cosine", min_lr=1e-5)
    train(cfg)
    resumed = train(cfg.replace(epochs=3), resume=True)
    fresh = train(cfg.replace(epochs=3, output_dir=str(tmp_path / "fresh")))
    assert resumed["history"][-1]["lr"] == pytest.approx(fresh["history"][-1]["lr"], rel=1e-9)
    assert resumed["history"][-1]["lr"] < resumed["history"][-2]["lr"] < cfg.lr
    # A lower --epochs trains nothing, and the run still says it has 3
    capsys.readouterr()
    again = train(cfg.replace(epochs=1), resume=True)
    assert ("nothing to train: the run already has 3 epochs (--epochs 1 asks for fewer); pass --epochs N > 3 to "
            "extend it" in capsys.readouterr().out)  # not "the run has 3 of 1 epochs"
    assert again["epochs"] == 3 and len(again["history"]) == 3
    assert "epochs: 3" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_a_loaded_schedule_takes_the_new_horizon(data_dir, tmp_path, scheduler):
    import torch

    from rvf.train import build_scheduler

    def schedule(epochs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        cfg = _cfg(data_dir, tmp_path, scheduler=scheduler, epochs=epochs, warmup_epochs=0.5, step_size=1, min_lr=1e-5)
        return optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=10)

    def run(optimizer, sched, steps):
        for _ in range(steps):
            optimizer.step()
            sched.step()
        return sched.get_last_lr()

    saved = schedule(2)
    run(*saved, 15)
    extended, fresh = schedule(4), schedule(4)
    extended[1].load_state_dict(saved[1].state_dict())
    assert run(*extended, 10) == pytest.approx(run(*fresh, 25))


def test_a_schedule_saved_by_torch_chained_schedulers_still_loads(data_dir, tmp_path):
    # Runs saved before StepSchedule hold SequentialLR(LinearLR, CosineAnnealingLR) state.
    import torch

    from rvf.train import build_scheduler

    sched = torch.optim.lr_scheduler
    old_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    old = sched.SequentialLR(old_opt, [sched.LinearLR(old_opt, 1e-3, total_iters=5),
                                       sched.CosineAnnealingLR(old_opt, T_max=15)], milestones=[5])
    new_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    new = build_scheduler(_cfg(data_dir, tmp_path, scheduler="cosine", epochs=2, warmup_epochs=0.5), new_opt, 10)
    for _ in range(12):
        old_opt.step()
        old.step()
    new.load_state_dict(old.state_dict())
    new.last_epoch -= 1  # what train() does after loading: re-derive the lr at the loaded step
    new.step()
    assert new.get_last_lr() == pytest.approx(old.get_last_lr())


def test_resume_refuses_settings_that_redraw_the_holdout_slice_or_break_the_schedule(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    for change, message in ((dict(holdout=0.5), "holdout 0.25 -> 0.5"), (dict(seed=7), "split_seed 42 -> 7"),
                            (dict(batch_size=4), "batch_size 8 -> 4; the saved LR schedule counts"),
                            (dict(ema_decay=0.9), "ema_decay None -> 0.9; the saved state has no weight average")):
        with pytest.raises(RunDirError, match=message):
            train(cfg.replace(epochs=2, **change), resume=True)
    train(cfg.replace(epochs=2, seed=7, split_seed=42), resume=True)  # another seed, the same slice


def test_a_run_saved_with_a_bare_true_or_false_tag_resumes(data_dir, tmp_path):
    # Saved before tags refused a bare no/yes (YAML's false/true), its own config.yaml stopped
    # `--resume` in scripts/train.py and in train() alike. It resumes with the tag W&B was sent.
    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    saved = Path(cfg.output_dir) / "config.yaml"
    saved.write_text(saved.read_text().replace("tags: []", "tags:\n- false\n- baseline"))  # as it was written
    r = _run([sys.executable, "scripts/train.py", "--resume", cfg.output_dir, "--print-config"], tmp_path)
    assert r.returncode == 0 and "tags:\n- 'False'\n- baseline\n" in r.stdout, r.stderr[-2000:]
    assert "tags [False, 'baseline'] read as ['False', 'baseline']" in r.stderr
    from rvf.config import load_run_config

    resumed = train(load_run_config(saved).replace(epochs=2), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2] and load_run_config(saved).tags == ["False", "baseline"]


def test_a_failed_overwrite_keeps_the_run_it_would_replace(data_dir, tmp_path):
    # The zoo passes --overwrite every time: a typo in a model name or a data folder must
    # fail before anything of the finished run is removed.
    from rvf.config import ConfigError
    from rvf.data import DatasetError

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for bad, error in ((dict(model="lenett"), ValueError), (dict(data_dir=str(tmp_path / "nope")), DatasetError),
                       (dict(model_args={"foo": 1}), ConfigError)):
        with pytest.raises(error):
            train(cfg.replace(**bad), overwrite=True)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_run_that_fails_to_start_leaves_no_folder_behind(tmp_path):
    from rvf.data import DatasetError

    with pytest.raises(DatasetError):
        train(_cfg(tmp_path / "no-data", tmp_path, output_dir=str(tmp_path / "runs" / "lenet")))
    assert not (tmp_path / "runs").exists()


def test_a_run_that_died_in_its_first_epoch_is_refused_naming_overwrite(tmp_path):
    # A corrupt image mid-epoch leaves config.yaml and nothing to lose. The same command again is
    # still refused (a run still in its first epoch looks just the same), but by a message that
    # names the one flag that starts it again; --resume's names a command that does.
    import io
    import re

    from synth import face

    from rvf.data import BadImageError

    data = make_folder_dataset(tmp_path / "data", n=6, size=32)
    bad = data / "train" / "fake" / "00001.jpg"
    good = bad.read_bytes()
    buf = io.BytesIO()
    face(0, 32).save(buf, "JPEG")
    jpeg = buf.getvalue()
    bad.write_bytes(jpeg[:jpeg.index(b"\xff\xda") + 20])  # fails at decode, mid-epoch without the cache
    cfg = _cfg(data, tmp_path, epochs=1, cache=False, num_workers=0, holdout=0)
    with pytest.raises(BadImageError):
        train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    bad.write_bytes(good)
    with pytest.raises(RunDirError, match=f"^output dir {re.escape(str(run))} holds a run that saved no epoch \\(it "
                                          "stopped in its first epoch, or is still in it\\); pass --overwrite to "
                                          "start it again$"):
        train(cfg)
    r = _run([sys.executable, "scripts/train.py", "--resume", str(run)], tmp_path)
    command = f"--config {run / 'config.yaml'} --output-dir {run} --overwrite"
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: --resume {run}: the run there saved no epoch (it stopped in its first epoch, or is still in it), "
        f"so there is nothing to resume; to start it again, pass {command} instead of --resume"), r.stderr[-2000:]
    r = _run([sys.executable, "scripts/train.py", *command.split()], tmp_path)  # the command it names
    assert r.returncode == 0 and latest_state(run) is not None and (run / "metrics.json").is_file(), r.stderr[-2000:]
    # A run with no saved state left to resume is not told to pass --resume.
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite to replace it$"):
        train(cfg)


def _contents(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fails_in", ["first_epoch", "tracker"])
def test_an_overwrite_that_fails_before_saving_an_epoch_puts_the_old_run_back(data_dir, tmp_path, monkeypatch,
                                                                              fails_in):
    # An out-of-memory first step, a tracker that will not start, a Ctrl-C on seeing the wrong
    # config: until the new run has saved an epoch the old one is the only run there is.
    import accelerate

    import rvf.train as rvf_train

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    (run / "notes.txt").write_text("not rvf's")
    before = _contents(run)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    if fails_in == "first_epoch":
        monkeypatch.setattr(rvf_train, "train_one_epoch", fail)
    else:
        monkeypatch.setattr(accelerate.Accelerator, "init_trackers", fail)
    with pytest.raises(KeyboardInterrupt):
        train(cfg.replace(seed=1), overwrite=True)
    assert _contents(run) == before and not (run / ".replaced").exists()


def test_an_overwrite_killed_before_its_first_epoch_leaves_the_old_run_for_the_next(data_dir, tmp_path,
                                                                                    monkeypatch):
    # What a SIGKILL leaves: the old run set aside, a replacement that never saved an epoch.
    import rvf.train as rvf_train

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    old = _contents(run)
    rvf_train.ReplacedRun(run, "rvf", replace=True)
    (run / "config.yaml").write_bytes(old["config.yaml"])
    with pytest.raises(RunDirError, match="saved no epoch .*--overwrite to start it again \\(the run it was replacing "
                                          "is in .*\\.replaced; --overwrite deletes it once the new run saves"):
        train(cfg)
    with pytest.raises(RunDirError, match="the run it was replacing is in .*\\.replaced"):
        train(cfg, resume=True)
    with monkeypatch.context() as m:  # the next --overwrite fails too: the first run comes back
        m.setattr(rvf_train, "train_one_epoch", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            train(cfg.replace(seed=1), overwrite=True)
    assert _contents(run) == old
    train(cfg.replace(seed=1), overwrite=True)  # one that saves an epoch replaces it for good
    assert not (run / ".replaced").exists() and _contents(run)["model.safetensors"] != old["model.safetensors"]


def test_a_set_aside_run_never_comes_back_over_a_newer_one(data_dir, tmp_path, monkeypatch):
    # Killed (or Ctrl-C) between the new run's first save and dropping the old one: the new run
    # has an epoch, so what is set aside is stale; it must never be restored over it later.
    import shutil

    import rvf.train as rvf_train

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if Path(path).name == ".replaced":
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rvf_train.shutil, "rmtree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg.replace(seed=1, epochs=2), overwrite=True)
    new = _contents(run)  # the new run's first epoch, not the old run put back
    assert (run / ".replaced").is_dir() and json.loads(new["model.json"])["config"]["seed"] == 1
    train(cfg.replace(seed=1, epochs=2), resume=True)  # RUN has an epoch: the leftover goes
    assert not (run / ".replaced").exists()
    finished = _contents(run)
    with monkeypatch.context() as m:  # and a later failed --overwrite puts back this run, not the stale one
        m.setattr(rvf_train, "train_one_epoch", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            train(cfg.replace(seed=2), overwrite=True)
    assert _contents(run) == finished


def test_resume_refuses_another_model(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(RunDirError, match="model lenet -> alexnet; a resumed run keeps its model"):
        train(cfg.replace(model="alexnet", epochs=2), resume=True)


def test_no_holdout_keeps_the_last_epoch(data_dir, tmp_path, capsys):
    m = train(_cfg(data_dir, tmp_path, epochs=2, holdout=0.0))
    assert m["counts"]["holdout"] == 0 and m["best_epoch"] == 2
    assert np.isfinite(m["valid"]["accuracy"]) and m["valid"]["threshold"] == 0.5
    # Each epoch says there is nothing to select on, not "holdout loss nan ... | best".
    out, err = capsys.readouterr()
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("| no holdout slice |" in line for line in epochs)
    assert "holdout:" not in err and "valid:" in err  # no empty holdout progress bar each epoch
    assert not any("nan" in line or "best" in line for line in epochs)
    # Its 0.5 is not called calibrated, in the run's report or in evaluate.py's.
    uncalibrated = "Accuracy at threshold 0.5000 (not calibrated: no holdout slice):"
    assert uncalibrated in (tmp_path / "run" / "classification_report.txt").read_text()
    r = _run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(tmp_path / "run"), "--data-dir",
              str(data_dir), "--output-dir", str(tmp_path / "eval")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert uncalibrated in (tmp_path / "eval" / "classification_report.txt").read_text()


def test_curves_leave_out_a_split_without_figures(tmp_path, monkeypatch):
    from rvf import reports

    drawn = []

    def save(fig, path):
        drawn.append([[line.get_label() for line in ax.get_lines()] for ax in fig.axes])
        reports._plt().close(fig)

    monkeypatch.setattr(reports, "_save", save)
    # As metrics.json gives it back after `holdout: 0`: null holdout figures (NaN before the round trip).
    history = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 0.8, "holdout_loss": None,
                "holdout_accuracy": float("nan")} for e in (1, 2)]
    reports.plot_curves(tmp_path / "curves.png", history)
    history[1] |= {"holdout_loss": 0.4, "holdout_accuracy": 0.9}
    reports.plot_curves(tmp_path / "curves.png", history)
    assert drawn == [[["train"], ["train"]], [["train", "holdout"], ["train", "holdout"]]]


def test_curves_mark_whole_epochs_only(tmp_path, monkeypatch):
    from rvf import reports

    ticks = []

    def save(fig, path):
        ticks.extend(ax.get_xticks().tolist() for ax in fig.axes)
        reports._plt().close(fig)

    monkeypatch.setattr(reports, "_save", save)
    history = [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "train_accuracy": 0.5 + 0.1 * e, "holdout_loss": 0.6,
                "holdout_accuracy": 0.6} for e in (1, 2, 3)]
    reports.plot_curves(tmp_path / "curves.png", history)
    # A three-epoch run's axis read 1.0, 1.5, 2.0, ...: epochs that were never logged.
    assert len(ticks) == 2 and all(t == int(t) for axis in ticks for t in axis), ticks


def test_one_process_can_train_in_two_precisions(data_dir, tmp_path):
    # Accelerate refuses a second Accelerator with another precision unless its state is reset.
    first = train(_cfg(data_dir, tmp_path / "a", epochs=1, mixed_precision="no"))
    second = train(_cfg(data_dir, tmp_path / "b", epochs=1, mixed_precision="bf16"))
    assert (first["mixed_precision"], second["mixed_precision"]) == ("no", "bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on a GPU")
def test_fp16_on_a_cpu_is_refused_rather_than_trained_in_fp32(data_dir, tmp_path, monkeypatch):
    from rvf.config import ConfigError

    # Accelerate has no fp16 autocast on a CPU: such a run trained in fp32, bit for bit, and
    # its banner and metrics.json said fp16.
    with pytest.raises(ConfigError, match="^mixed_precision fp16 needs a GPU.*use bf16 or no"):
        train(_cfg(data_dir, tmp_path, epochs=1, mixed_precision="fp16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `auto` takes the launcher's choice
    with pytest.raises(ConfigError, match=r"fp16 \(the launcher's, for mixed_precision: auto\) needs a GPU"):
        train(_cfg(data_dir, tmp_path, epochs=1))
    assert not (tmp_path / "run").exists()


def test_training_scores_in_fp32_as_evaluate_does(data_dir, tmp_path):
    # Training under bf16 autocast; its holdout/valid scoring, threshold included, must be what
    # evaluate.py, predict.py and the app (fp32) reproduce from the saved model.
    m = train(_cfg(data_dir, tmp_path, epochs=1, mixed_precision="bf16"))
    assert m["mixed_precision"] == "bf16"
    # its own process: Accelerate's state (precision included) is per process
    r = _run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(tmp_path / "run"), "--data-dir",
              str(data_dir), "--output-dir", str(tmp_path / "eval")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())["valid"]
    for key in ("accuracy", "roc_auc", "average_precision", "loss", "accuracy_at_threshold"):
        assert ev[key] == pytest.approx(m["valid"][key], abs=1e-6), key
    threshold = f"Accuracy at calibrated threshold {m['valid']['threshold']:.4f}:"
    for folder in ("run", "eval"):
        assert threshold in (tmp_path / folder / "classification_report.txt").read_text()
    import csv

    with open(tmp_path / "eval" / "probabilities.csv") as f:  # each row names its image
        rows = list(csv.DictReader(f))
    assert len(rows) == ev["n"] and len({r["path"] for r in rows}) == ev["n"]
    assert all(int(r["label"]) == ("fake", "real").index(Path(r["path"]).parent.name) for r in rows)


def test_a_compiled_run_saves_a_model_everything_can_load(data_dir, tmp_path, monkeypatch):
    import functools

    import torch

    from rvf.checkpoint import load_pretrained

    # the "eager" backend wraps the model exactly as inductor does, without compiling kernels
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    m = train(_cfg(data_dir, tmp_path, epochs=1, compile=True))
    model, meta, _ = load_pretrained(tmp_path / "run")
    assert meta["epoch"] == m["best_epoch"] and not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_gradient_accumulation_is_refused_not_half_done(data_dir, tmp_path, monkeypatch):
    from rvf.config import ConfigError

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(ConfigError, match="gradient accumulation \\(2 steps"):
        train(_cfg(data_dir, tmp_path, epochs=1))


def test_an_odd_batch_is_mixed_but_for_its_last_image(data_dir, tmp_path):
    import torch

    from rvf.train import build_mixup, mix_batch

    mixup = build_mixup(_cfg(data_dir, tmp_path, mixup=0.2, label_smoothing=0.1), num_classes=2)
    x, labels = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 1, 0, 1])
    mixed, targets = mix_batch(mixup, x.clone(), labels)
    assert mixed.shape == x.shape and targets.shape == (5, 2)
    assert torch.equal(mixed[-1], x[-1]) and targets[-1].tolist() == pytest.approx([0.05, 0.95])
    assert torch.allclose(targets.sum(1), torch.ones(5))


def test_device_data_learns_and_needs_the_cache(data_dir, tmp_path):
    m = train(_cfg(data_dir, tmp_path, epochs=6, device_data=True, model_args={"drop_rate": 0.0}))
    assert m["device_data"] and m["valid"]["accuracy"] >= 0.9
    assert [round(h["epoch"]) for h in m["history"]] == list(range(1, 7))
    with pytest.raises(ValueError, match="device_data: true needs cache: true"):
        train(_cfg(data_dir, tmp_path / "x", device_data=True, cache=False))


def test_overwrite_removes_only_what_a_run_wrote(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    mine = tmp_path / "run" / "notes.txt"
    mine.write_text("not rvf's")
    train(cfg, overwrite=True)
    assert mine.read_text() == "not rvf's" and not (tmp_path / "run" / ".replaced").exists()
    assert (tmp_path / "run" / "model.safetensors").is_file() and latest_state(tmp_path / "run").name == "epoch_0"


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: the lock is skipped there")
def test_a_folder_another_process_trains_into_is_refused(data_dir, tmp_path, monkeypatch):
    # A second --resume or --overwrite while the run trains passed every check and both wrote
    # into one folder. The lock is held here as a training process holds it.
    import fcntl
    import re

    import rvf.train as rvf_train

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    busy = f"^{re.escape(str(run))} is being trained by another process \\(pid 4242\\); wait for it or pick another"
    with open(run / ".training.lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _contents(run)
        for kwargs in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(RunDirError, match=busy):
                train(cfg.replace(epochs=2), **kwargs)
        assert _contents(run) == before
        fresh = tmp_path / "fresh"  # a folder whose first run is still in its first epoch
        fresh.mkdir()
        os.link(run / ".training.lock", fresh / ".training.lock")
        with pytest.raises(RunDirError, match="is being trained by another process"):
            train(cfg.replace(output_dir=str(fresh)))
    # Released (as a dead process's is): the lock file it leaves blocks nothing and is no run.
    train(cfg.replace(output_dir=str(fresh)))
    assert (fresh / "metrics.json").is_file() and not (fresh / ".training.lock").exists()

    def locked_out(*args, **kwargs):  # while a resume or an --overwrite trains, at RUN (not in RUN/.replaced)
        with open(run / ".training.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(sorted(p.name for p in (run / ".replaced").iterdir()) if (run / ".replaced").is_dir() else None)
        return real(*args, **kwargs)

    real, seen = rvf_train.train_one_epoch, []
    monkeypatch.setattr(rvf_train, "train_one_epoch", locked_out)
    train(cfg.replace(epochs=2), resume=True)
    train(cfg, overwrite=True)
    assert seen[0] is None and "model.safetensors" in seen[1] and ".training.lock" not in seen[1]
    assert not (run / ".training.lock").exists() and not (run / ".replaced").exists()


def test_a_folder_of_other_files_is_refused_with_or_without_overwrite(data_dir, tmp_path):
    # --output-dir ~/photos: model.safetensors, the reports and checkpoints/ would land among the
    # user's files (and a later --overwrite removes every *.png there).
    import re

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("me.png", "you.png"):
        (photos / name).write_bytes(b"not rvf's")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=f"^output dir {re.escape(str(photos))} holds no run but is not empty "
                                              r"\(me.png and 1 more\): .* give a new or empty folder"):
            train(_cfg(data_dir, tmp_path, output_dir=str(photos), epochs=1), overwrite=overwrite)
    assert sorted(p.name for p in photos.iterdir()) == ["me.png", "you.png"]
    # An empty folder is a new one; a decode cache put inside the folder is the run's own, even when
    # a run killed while decoding left it there with no run beside it.
    fresh = tmp_path / "fresh"
    (fresh / "cache").mkdir(parents=True)
    (fresh / "cache" / "train-32px-killed.npy.tmp").write_bytes(b"")
    train(_cfg(data_dir, tmp_path, output_dir=str(fresh), cache_dir=str(fresh / "cache"), epochs=1))
    assert latest_state(fresh) is not None


def test_per_file_path_matches_the_cache(data_dir, tmp_path):
    # same DataLoader order on both sides; only where the pixels come from differs
    a = train(_cfg(data_dir, tmp_path / "a", epochs=1, device_data=False))
    b = train(_cfg(data_dir, tmp_path / "b", epochs=1, cache=False, num_workers=0))
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], abs=1e-5)
    assert a["valid"]["accuracy"] == b["valid"]["accuracy"]


def test_wandb_offline_without_credentials(data_dir, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    r = _run([sys.executable, "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(out),
              "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--tracker", "wandb",
              "--set", "holdout=0.25", "--set", "num_sample_preds=4"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "W&B: no API key found" in r.stdout + r.stderr and "wandb sync" in r.stdout + r.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_resume_continues_the_same_run(data_dir, tmp_path):
    # `--resume` used to start a second W&B run of the same name, its history from the resumed
    # epoch on only; W&B's id + resume="allow" continues the first (offline: `wandb sync` uploads
    # both files into one run, in order).
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    first = ["--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1", "--image-size", "32",
             "--batch-size", "8", "--tracker", "wandb", "--set", "holdout=0.25", "--set", "num_sample_preds=2"]
    for args in (first, ["--resume", str(out), "--epochs", "2"]):
        r = _run([sys.executable, "scripts/train.py", *args], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    ids = {p.stem.removeprefix("run-") for p in (out / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids
    # A copy of the folder is a new run from its state (it logged on to the original W&B run).
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    r = _run([sys.executable, "scripts/train.py", "--resume", str(copy), "--epochs", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"W&B: {copy} is a copy of {out}: it logs to a new W&B run from epoch 3 on" in r.stdout, r.stdout
    new = {p.stem.removeprefix("run-") for p in (copy / "wandb").glob("offline-run-*/run-*.wandb")} - ids
    assert len(new) == 1, new


def test_a_resumed_run_keeps_its_wandb_run_unless_it_is_a_copy(tmp_path):
    from rvf.train import STATE_DIR, STATE_MARKER, wandb_run_to_continue

    def saved(folder: Path, **run) -> dict:
        (folder / STATE_DIR / "epoch_0").mkdir(parents=True)
        (folder / STATE_DIR / "epoch_0" / STATE_MARKER).write_text(json.dumps(run))
        return run

    a = tmp_path / "a"
    run = saved(a, wandb_id="abc", wandb_folder=str(a))
    assert wandb_run_to_continue(a, run) == "abc"
    assert wandb_run_to_continue(tmp_path / "x" / ".." / "a", run) == "abc"  # the same folder, spelled another way
    shutil.copytree(a, tmp_path / "b")
    assert wandb_run_to_continue(tmp_path / "b", run) is None  # a copy: a new W&B run
    a.rename(tmp_path / "c")
    assert wandb_run_to_continue(tmp_path / "c", run) == "abc"  # moved or renamed: the same run
    assert wandb_run_to_continue(tmp_path / "d", {"wandb_id": "abc"}) == "abc"  # saved before the folder was kept


def test_wandb_that_cannot_start_is_one_line_saying_how_to_go_on(data_dir, tmp_path, monkeypatch):
    # With a key set but W&B's server unreachable, wandb.init times out and raised its CommError
    # through Accelerate as a 40-line traceback. Errors that are not W&B's stay as they are.
    wandb = pytest.importorskip("wandb")
    from rvf.tracking import TrackerError

    monkeypatch.setenv("WANDB_MODE", "online")

    def unreachable(**kwargs):
        raise wandb.errors.CommError("Timed out while retrying: connection refused\nConsider increasing ...")
    monkeypatch.setattr(wandb, "init", unreachable)
    want = (r"^W&B could not start the run \(CommError: Timed out while retrying: connection refused\); "
            r"log offline with WANDB_MODE=offline .* --tracker none$")
    with pytest.raises(TrackerError, match=want):
        train(_cfg(data_dir, tmp_path / "a", tracker="wandb"))
    monkeypatch.setattr(wandb, "init", lambda **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(_cfg(data_dir, tmp_path / "b", tracker="wandb"))


def test_wandb_login_is_found_in_a_netrc_named_with_a_tilde(tmp_path, monkeypatch):
    # NETRC=~/secrets/netrc (as set in a .env file, where no shell expands it) was not found: the
    # run went offline though `wandb login` had stored a key there.
    from rvf import tracking

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", "~/secrets/netrc")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert tracking._wandb_has_credentials()
    monkeypatch.setenv("NETRC", "~/secrets/none")
    assert not tracking._wandb_has_credentials()


@pytest.mark.parametrize("host", [None, "https://wandb.mycorp.com:8443"])
def test_wandb_login_of_this_wandb_is_found(tmp_path, monkeypatch, host):
    # What `wandb login` itself writes: wandb 0.31 saves the default server's key for
    # api.forge.coreweave.com and a self-hosted one's for host:port, naming that server in its
    # settings file rather than the environment; rvf looked for api.wandb.ai and logged offline.
    pytest.importorskip("wandb")
    from rvf import tracking

    env = _env(tmp_path, WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), NETRC=str(tmp_path / "netrc"))
    login = [sys.executable, "-m", "wandb", "login", "--no-verify", *(["--host", host] if host else []), "0" * 40]
    r = subprocess.run(login, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.returncode == 0 and (tmp_path / "netrc").is_file(), r.stderr
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETRC", env["NETRC"])
    monkeypatch.setenv("WANDB_CONFIG_DIR", env["WANDB_CONFIG_DIR"])
    assert tracking._wandb_has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://elsewhere.example")  # the environment names another server
    assert not tracking._wandb_has_credentials()


def test_wandb_settings_come_from_the_environment_and_are_checked_first(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rvf import tracking
    from rvf.config import ConfigError

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "team-project")
    monkeypatch.setenv("WANDB_NAME", "nightly")
    cfg = TrainConfig(tracker="wandb", tags=[2024, "a"])
    _, kwargs, _ = tracking.resolve_tracker(cfg, tmp_path / "run")
    assert kwargs["wandb"]["name"] == "nightly" and kwargs["wandb"]["tags"] == ["2024", "a"]
    assert tracking.project_name(cfg) == "team-project"  # W&B's own variable, where project is not set
    assert tracking.project_name(cfg.replace(project="mine")) == "mine"
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(ConfigError, match="WANDB_MODE='offlin' is not a W&B mode"):
        tracking.resolve_tracker(cfg, tmp_path / "run")


def test_overwrite_removes_the_old_runs_tensorboard_folder_whatever_its_project(tmp_path):
    from rvf.train import clear_run

    out = tmp_path / "run"
    for name in ("foo", "rvf", "keep_me"):
        (out / name).mkdir(parents=True)
    (out / "foo" / "events.out.tfevents.1.host").write_text("")  # TensorBoard's, under project foo
    (out / "model.json").write_text("{}")
    clear_run(out, "foo")
    assert sorted(p.name for p in out.iterdir()) == ["keep_me"]
    clear_run(out, "keep_me")  # a project named like a folder of the user's, without event files
    clear_run(out, ".")  # never the run folder itself
    assert out.is_dir() and (out / "keep_me").is_dir()


def test_wandb_predictions_table_pairs_each_image_with_its_own_row(monkeypatch):
    import types

    from rvf.tracking import log_final_wandb

    rows_logged = []

    class Table:
        def __init__(self, columns):
            self.columns = columns

        def add_data(self, *row):
            rows_logged.append(dict(zip(self.columns, row)))

    stub = types.SimpleNamespace(Table=Table, Image=lambda x: x,
                                 plot=types.SimpleNamespace(confusion_matrix=lambda **kw: None,
                                                            roc_curve=lambda *a, **kw: None))
    monkeypatch.setitem(sys.modules, "wandb", stub)
    run = types.SimpleNamespace(log=lambda d: None, summary={})
    # Kaggle's valid.csv lists every real image, then every fake one; the table samples across it.
    labels = np.array([1] * 5 + [0] * 5)
    probs = np.stack([1.0 - labels, labels], 1).astype(float)  # a perfect model: P(fake) = 1 for fakes
    rows = [0, 4, 5, 9]
    images = np.zeros((4, 3, 2, 2), np.uint8)
    log_final_wandb(run, labels, probs, rows, images, [f"{i}.jpg" for i in rows], {}, [])
    assert [r["file"] for r in rows_logged] == ["0.jpg", "4.jpg", "5.jpg", "9.jpg"]
    assert [r["label"] for r in rows_logged] == ["real", "real", "fake", "fake"]
    assert all(r["prediction"] == r["label"] for r in rows_logged)
    assert [r["p_fake"] for r in rows_logged] == [0.0, 0.0, 1.0, 1.0]


def test_tensorboard_tracker(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    train(_cfg(data_dir, tmp_path, epochs=1, tracker="tensorboard"))
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_resume_takes_its_own_folder_as_output_dir(tmp_path):
    # `--resume RUN --output-dir RUN` names one folder twice (here spelled another way): nothing to
    # refuse, and certainly not "copy the run to RUN and resume that".
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "runs").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(TrainConfig(epochs=3).to_dict()))
    same = tmp_path / "runs" / ".." / "run"
    r = _run([sys.executable, "scripts/train.py", "--resume", str(run), "--output-dir", str(same), "--print-config"],
             tmp_path)
    assert r.returncode == 0 and f"output_dir: {run}\n" in r.stdout, r.stderr[-2000:]


def test_ctrl_c_says_where_the_run_stands_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    # One line and exit 130, not KeyboardInterrupt's traceback; the command it names is the one
    # prepare_output_dir will take for the folder as the Ctrl-C left it.
    import importlib.util

    import rvf.train

    for var in rvf.train._LAUNCHER_VARS:  # not launched, whatever pytest runs under
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def ctrl_c(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rvf.train, "train", ctrl_c)
    run = tmp_path / "run"

    def main():
        try:
            rc = script.main(script.get_args_parser().parse_args(["--output-dir", str(run), "--tracker", "none"]))
        except KeyboardInterrupt:  # would stop the whole pytest session
            pytest.fail("KeyboardInterrupt escaped main()")
        return rc, capsys.readouterr().err.splitlines()

    assert main() == (130, ["interrupted before training started: nothing was saved; run the same command again"])

    bars = []  # held, as the frames of a traceback hold theirs

    def ctrl_c_with_a_bar_open(cfg, **kwargs):  # as in tqdm's constructor, after it drew the bar
        from tqdm.auto import tqdm

        bars.append(tqdm(total=3, desc="epoch 2/50", leave=False))
        raise KeyboardInterrupt

    monkeypatch.setattr(rvf.train, "train", ctrl_c_with_a_bar_open)
    rc, err = main()  # the message went onto the bar's line: "epoch 2/50:   0%| ... interrupted: ..."
    assert rc == 130 and err[-1] == "interrupted before training started: nothing was saved; run the same command again"
    monkeypatch.setattr(rvf.train, "train", ctrl_c)
    run.mkdir()
    (run / "config.yaml").write_text("model: lenet\n")
    assert main() == (130, [f"interrupted: {run} saved no epoch, so there is nothing to resume; to start again, "
                            "add --overwrite"])
    (run / "checkpoints" / "epoch_1").mkdir(parents=True)
    (run / "checkpoints" / "epoch_1" / "rvf_state.json").write_text("{}")
    assert main() == (130, [f"interrupted: {run} has 2 epochs saved; to continue: scripts/train.py --resume {run}"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # launched: resumed by the same launch
    assert main()[1][0].endswith(f"--resume {run} (started the same way: accelerate launch or torchrun, with the "
                                 "same options)")
    monkeypatch.setenv("RANK", "1")  # every process of a launch gets the Ctrl-C; the first one says it
    assert main() == (130, [])


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/missing.yaml"], "configs/missing.yaml does not exist"),
    (["--model", "lenet5"], "Unknown model"),
    (["--data-dir", "/nonexistent/rvf"], "/nonexistent/rvf does not exist"),
    (["--set", "lr=fast"], "lr must be a number"),
    (["--set", "mixup=0.2", "--batch-size", "7"], "mixup/cutmix need an even batch_size, got 7"),
    (["--set", "cutmix=-1"], "cutmix is a Beta distribution's alpha and must be >= 0"),
    (["--set", "scheduler=cosine", "--set", "min_lr=1e-3"], "min_lr 0.001 is above lr 0.0001"),
    (["--resume", "runs/x"], "--resume runs/x continues in that folder; drop --output-dir"),
    (["--image-size", "8"], "image_size 8: model lenet cannot take 8px images"),
    (["--set", "project=team/rvf"], "project 'team/rvf' is not a valid project name"),
])
def test_bad_input_is_one_clear_message(data_dir, tmp_path, args, message):
    base = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--tracker", "none", "--epochs", "1"]
    r = _run([sys.executable, "scripts/train.py", *base, *args], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message.lower() in r.stderr.lower() and "Traceback" not in r.stderr


def test_a_diverged_run_stops_with_one_clear_message(data_dir, tmp_path):
    base = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--tracker", "none", "--epochs", "3",
            "--mixed-precision", "no", "--set", "optimizer=sgd", "--set", "lr=1e30", "--set", "log_every=1"]
    r = _run([sys.executable, "scripts/train.py", *base], tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "epoch 1: training diverged" in r.stderr and "lower lr" in r.stderr and "Traceback" not in r.stderr
    assert "train in fp32" not in r.stderr  # it trained in fp32 already


def test_unwritable_output_dir(data_dir, tmp_path):
    # A path under a regular file cannot be created, even by root (CI runs as root).
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    r = _run([sys.executable, "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(blocker / "run"),
              "--tracker", "none", "--epochs", "1"], tmp_path)
    # Checked before any decoding: a bad path, not a failed write (2, not 1)
    assert r.returncode == 2 and f"cannot write into {blocker}" in r.stderr and "Traceback" not in r.stderr


def test_an_output_dir_that_is_a_file_is_named(data_dir, tmp_path):
    taken = tmp_path / "notes.yaml"
    taken.write_text("")
    r = _run([sys.executable, "scripts/train.py", "--data-dir", str(data_dir), "--output-dir", str(taken),
              "--tracker", "none", "--epochs", "1"], tmp_path)
    assert r.returncode == 2 and f"output dir {taken} is a file; give a folder" in r.stderr
    r = _run([sys.executable, "scripts/train.py", "--resume", str(tmp_path), "--overwrite"], tmp_path)
    assert r.returncode == 2 and "--overwrite discards it; pass one of them" in r.stderr


def test_disk_full_keeps_the_earlier_best_model(data_dir, tmp_path, monkeypatch):
    import errno

    import rvf.train
    from rvf.checkpoint import load_pretrained

    cfg = _cfg(data_dir, tmp_path, epochs=4, lr=3e-3)
    real_save, calls = rvf.train.save_pretrained, []

    def save_then_fill_the_disk(directory, model, meta):
        calls.append(meta["epoch"])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))
        return real_save(directory, model, meta)

    monkeypatch.setattr(rvf.train, "save_pretrained", save_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    if len(calls) < 2:
        pytest.skip("the model never improved after epoch 1, so no second save was attempted")
    model, meta, _ = load_pretrained(tmp_path / "run")  # the epoch-1 model is whole and loadable
    assert meta["epoch"] == calls[0]
    assert not list((tmp_path / "run").glob(".*.tmp"))


@pytest.mark.slow
def test_two_process_ddp_counts_each_image_once(data_dir, tmp_path):
    """Train under 2-process CPU DDP, then evaluate one checkpoint with 1 and 2 processes."""
    # 25 valid images: not a multiple of 2 x batch, so DDP pads the last batch
    data = make_folder_dataset(tmp_path / "odd", n=12, size=32)
    (data / "valid" / "real" / "00000.jpg").unlink()
    # accelerate launch's multi-CPU mode needs MPI; torchrun + ACCELERATE_USE_CPU is the same DDP (gloo)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    out = tmp_path / "run"
    r = _run([*launch, "scripts/train.py", "--data-dir", str(data), "--output-dir", str(out), "--epochs", "1",
              "--image-size", "32", "--batch-size", "4", "--tracker", "none"],
             tmp_path, timeout=600, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-3000:]
    m2train = json.loads((out / "metrics.json").read_text())
    assert m2train["num_processes"] == 2 and m2train["valid"]["n"] == 23
    results = {}
    for n, prefix in ((1, [sys.executable]), (2, launch)):
        ev = tmp_path / f"eval{n}"
        r = _run([*prefix, "scripts/evaluate.py", "--checkpoint", str(out), "--data-dir", str(data),
                  "--output-dir", str(ev), "--batch-size", "5"], tmp_path, timeout=600, ACCELERATE_USE_CPU="1")
        assert r.returncode == 0, r.stderr[-3000:]
        results[n] = json.loads((ev / "metrics.json").read_text())
    assert results[2]["num_processes"] == 2
    v1, v2 = results[1]["valid"], results[2]["valid"]
    assert v1["n"] == v2["n"] == 23
    assert v1["confusion_matrix"] == v2["confusion_matrix"]
    for key in ("accuracy", "roc_auc", "average_precision", "loss"):
        assert v1[key] == pytest.approx(v2[key], abs=1e-6)
    assert v1["accuracy"] == pytest.approx(m2train["valid"]["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_two_process_holdout_scores_are_those_of_the_saved_batchnorm_model(data_dir, tmp_path):
    # Under DDP each process's last training forward moves its own BatchNorm running statistics,
    # and the main process saves its own: the holdout slice, scored on both processes, must be
    # scored with those, or the threshold and holdout figures in model.json are not the saved
    # model's (AlexNet+BN on rvf10k-mini: holdout loss 0.65069 recorded, 0.65025 rescored; here
    # 0.2501 and 0.2554).
    import torch.nn.functional as F

    from rvf.checkpoint import load_pretrained
    from rvf.data import build_eval_transform
    from rvf.metrics import calibrate_threshold
    from rvf.train import load_splits

    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    r = _run([*launch, "scripts/train.py", "--model", "alexnet_bn", "--data-dir", str(data_dir), "--output-dir",
              str(out), "--epochs", "2", "--image-size", "32", "--batch-size", "4", "--lr", "3e-3", "--tracker", "none",
              "--mixed-precision", "no", "--set", "holdout=0.25", "--set", "eval_batch_size=2"],  # both score some
             tmp_path, timeout=600, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-3000:]
    model, meta, data_cfg = load_pretrained(out)
    cfg = TrainConfig().replace(**meta["config"]).replace(cache_dir=str(tmp_path / "cache"))  # the run's
    holdout = load_splits(cfg, data_cfg, progress=False).holdout
    images, labels = holdout.__getitems__(range(len(holdout)))  # (6, 3, 32, 32) uint8, (6,)
    with torch.no_grad():
        logits = model(build_eval_transform(data_cfg)(images))  # (6, 2)
    assert meta["metrics"]["holdout"]["n"] == 6
    assert meta["metrics"]["holdout"]["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    assert meta["threshold"] == pytest.approx(calibrate_threshold(labels.numpy(), logits.softmax(1)[:, 0].numpy()),
                                              abs=1e-6)


# Run under torchrun: record which fit images each process draws in each epoch, then train.
DDP_PROBE = """
import json, os, sys
import torch
root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "scripts")]
import rvf.train as T
real = T.train_one_epoch
def probe(model, loader, *args, **kwargs):
    drawn = [i for batch in loader.batch_sampler for i in batch]  # the sampler replays its epoch's order
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, drawn)
    if torch.distributed.get_rank() == 0:
        print("PROBE " + json.dumps({"draws": sum(map(len, gathered)), "distinct": len(set(sum(gathered, []))),
                                     "fit": len(loader.dataset)}), flush=True)
    return real(model, loader, *args, **kwargs)
T.train_one_epoch = probe
import train
sys.exit(train.main(train.get_args_parser().parse_args()))
"""


@pytest.mark.slow
def test_two_processes_on_the_dataloader_path_share_out_one_shuffle(data_dir, tmp_path):
    # `device_data: false` (a 256 px rvf10k on CPU, `cache: false`): a DataLoader per process.
    # Each must take its share of one permutation (not its own shuffle, which overlaps), and the
    # schedule must count the steps a process really runs. 24 images, holdout 0.25: 18 to fit;
    # batch 12 x 2 processes > 18, so no batch is dropped and each process trains one a step.
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    r = _run([*launch, str(probe), str(ROOT), "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
              "--image-size", "32", "--batch-size", "12", "--tracker", "none", "--set", "device_data=false",
              "--set", "holdout=0.25", "--set", "scheduler=cosine", "--set", "min_lr=1e-5", "--lr", "1e-3"],
             tmp_path, timeout=600, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [json.loads(line.split("PROBE ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(epochs) == 2 and epochs[0]["fit"] == 18
    for e in epochs:
        assert e["draws"] == 24 and e["distinct"] == 18  # 12 + 12: the second process's batch wraps around
    m = json.loads((out / "metrics.json").read_text())
    # A 4-step cosine as one process counts them, 2 a step: epoch 2's one step trains halfway down
    # (a schedule counting other steps, or a process left idle, moves it).
    assert m["num_processes"] == 2
    assert [h["lr"] for h in m["history"]] == pytest.approx([1e-3, 1e-5 + (1e-3 - 1e-5) / 2], rel=1e-9)


# Run under torchrun: scripts/train.py with a W&B whose server cannot be reached.
WANDB_UNREACHABLE = """
import os, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "scripts")]
import wandb
def unreachable(**kwargs):
    raise wandb.errors.CommError("Timed out while retrying: connection refused")
wandb.init = unreachable
import train
sys.exit(train.main(train.get_args_parser().parse_args()))
"""


@pytest.mark.slow
def test_wandb_that_cannot_start_stops_two_processes_with_one_message(data_dir, tmp_path):
    # W&B starts in the main process alone: its TrackerError left the other process to train on
    # into the first all-reduce and die there ("error: process 1 stopped: another process failed").

    pytest.importorskip("wandb")
    probe = tmp_path / "probe.py"
    probe.write_text(WANDB_UNREACHABLE)
    _, error = _torchrun_one_error([str(probe), str(ROOT), "--data-dir", str(data_dir), "--output-dir",
                                    str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--batch-size", "4",
                                    "--tracker", "wandb"], tmp_path, WANDB_MODE="online")
    assert error.startswith("error: W&B could not start the run"), error


@pytest.mark.slow
def test_bad_input_stops_two_processes_with_one_message(data_dir, tmp_path):
    # A check only the main process makes (a resume's batch size: the others used to die at the
    # next barrier, on gloo's "Connection closed by peer" traceback), and one the main process
    # meets first (a missing data folder, while the others wait to map its cache). Each process's
    # stderr goes to its own file (--redirects 2), so the assertions say which process printed what.
    import contextlib
    import re

    from rvf.train import RunLock

    cfg = _cfg(data_dir, tmp_path, epochs=1)
    train(cfg)
    run = tmp_path / "run"
    old = _contents(run)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    for name, args, message in (
            ("resume", ["--resume", str(run), "--epochs", "2", "--batch-size", "4"],
             f"error: --resume {run}: batch_size 8 -> 4; the saved LR schedule counts"),
            ("data", ["--output-dir", str(run), "--overwrite", "--data-dir", str(tmp_path / "nowhere"),
                      "--image-size", "32", "--tracker", "none"],
             f"error: dataset root {tmp_path / 'nowhere'} does not exist"),
            ("busy", ["--resume", str(run), "--epochs", "2"],  # another command trains into the folder
             f"error: {run} is being trained by another process (pid {os.getpid()}); wait for it")):
        logs = tmp_path / f"logs-{name}"
        with contextlib.ExitStack() as stack:
            if name == "busy":
                stack.enter_context(RunLock(run))
            r = _run([*launch, "--log-dir", str(logs), "--redirects", "2", "scripts/train.py", *args],
                     tmp_path, timeout=120, ACCELERATE_USE_CPU="1")
        stderr = {int(f.parent.name): f.read_text() for f in logs.glob("*/attempt_0/*/stderr.log")}
        assert sorted(stderr) == [0, 1], r.stderr[-3000:]
        # The main process says what is wrong, once; the other stops without a word or a traceback.
        errors = [line for line in stderr[0].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), stderr
        assert "Traceback" not in stderr[0] and "Traceback" not in stderr[1] and "error:" not in stderr[1], stderr
        assert not any("terminate called" in text for text in stderr.values()), stderr  # a torn-down gloo thread
        # torch.distributed.run exits 1 whenever a process fails (its own ChildFailedError
        # traceback and summary, not ours); the summary lists each process's status: 2, or
        # SIGTERM (-15) for one it stopped as it was leaving on its own.
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
        assert r.returncode == 1 and "2" in codes and set(codes) <= {"2", "-15"}, r.stderr[-3000:]
        assert _contents(run) == old  # neither the resume nor the overwrite touched the run


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate", "ensemble"])
def test_an_unreadable_image_stops_two_scoring_processes_with_one_message(data_dir, tmp_path, script):
    # The main process decodes the split first while the other waits for it at a barrier: a file
    # it cannot read used to leave the other there, to die on gloo's "Connection closed by peer"
    # traceback (exit 1). --monitor-interval 5: the launcher's SIGTERM comes too late to hide it.
    import io
    import re

    from synth import face

    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        train(_cfg(data_dir, tmp_path, epochs=1, seed=seed, split_seed=0, output_dir=str(run)))
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    buf = io.BytesIO()
    face(0, 32).save(buf, "JPEG")
    bad = data / "valid" / "fake" / "00001.jpg"
    bad.write_bytes(buf.getvalue()[:buf.getvalue().index(b"\xff\xda") + 20])  # decodes only half-way
    args = ({"evaluate": ["--checkpoint", str(runs[0]), "--output-dir", str(tmp_path / "eval")],
             "ensemble": ["--checkpoints", *map(str, runs)]}[script])
    r, error = _torchrun_one_error([f"scripts/{script}.py", "--data-dir", str(data), *args], tmp_path, timeout=120)
    assert error.startswith(f"error: {bad}: "), error
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate", "ensemble"])
def test_a_cache_folder_error_stops_two_scoring_processes_with_one_message(data_dir, tmp_path, script):
    # An OSError the main process meets while it decodes first (a full disk, a cache folder under
    # a file) reaches the other through all_or_none too, which printed it again: two error lines.

    run = tmp_path / "a"
    train(_cfg(data_dir, tmp_path, epochs=1, output_dir=str(run)))
    shutil.copytree(run, tmp_path / "b")  # an ensemble's second member
    (tmp_path / "file").write_text("")
    args = ({"evaluate": ["--checkpoint", str(run), "--output-dir", str(tmp_path / "eval")],
             "ensemble": ["--checkpoints", str(run), str(tmp_path / "b")]}[script])
    _, error = _torchrun_one_error([f"scripts/{script}.py", "--data-dir", str(data_dir), "--cache-dir",
                                    str(tmp_path / "file" / "cache"), *args], tmp_path, timeout=120)
    assert error.startswith("error: Not a directory"), error


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["checkpoint", "data"])
@pytest.mark.parametrize("script", ["evaluate", "ensemble"])
def test_an_error_every_scoring_process_meets_is_printed_once(data_dir, tmp_path, script, missing):
    # A checkpoint or data folder that is not there: each process met it before any of them
    # compared notes, and each printed it (two error lines, one per process).
    import re

    from conftest import make_checkpoint

    runs = [make_checkpoint(tmp_path / name, image_size=32, seed=seed) for seed, name in enumerate("ab")]
    gone = tmp_path / "nowhere"
    if missing == "checkpoint":
        runs[-1] = gone
    args = ({"evaluate": ["--checkpoint", str(runs[-1]), "--output-dir", str(tmp_path / "eval")],
             "ensemble": ["--checkpoints", *map(str, runs)]}[script])
    r, error = _torchrun_one_error([f"scripts/{script}.py", "--data-dir", str(gone if missing == "data" else data_dir),
                                    *args], tmp_path, timeout=120)
    assert error.startswith({"checkpoint": f"error: checkpoint folder {gone} does not exist",
                             "data": f"error: dataset root {gone} does not exist"}[missing]), error
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, r.stderr[-3000:]
    assert not (tmp_path / "eval").exists()


# Run under torchrun: scripts/evaluate.py with a checkpoint that process 1 alone cannot read.
ONE_PROCESS_CANNOT_READ = """
import os, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "scripts")]
import rvf.evaluate
from rvf.checkpoint import CheckpointError
from rvf.cli import end_process_group
if os.environ["RANK"] == "1":
    def unreadable(checkpoint, *args, **kwargs):
        raise CheckpointError(f"{checkpoint}: process 1 cannot read it")
    rvf.evaluate.load_pretrained = unreadable
import evaluate
try:
    sys.exit(evaluate.main(evaluate.get_args_parser().parse_args()))
finally:
    end_process_group()
"""


@pytest.mark.slow
def test_an_error_one_scoring_process_meets_is_printed_by_the_main_one(data_dir, tmp_path):
    # Met by process 1 alone (another node's file system), it must still be said, once.
    from conftest import make_checkpoint

    run = make_checkpoint(tmp_path / "a", image_size=32)
    probe = tmp_path / "probe.py"
    probe.write_text(ONE_PROCESS_CANNOT_READ)
    _, error = _torchrun_one_error([str(probe), str(ROOT), "--checkpoint", str(run), "--data-dir", str(data_dir),
                                    "--output-dir", str(tmp_path / "eval")], tmp_path, timeout=120)
    assert error == f"error: {run}: process 1 cannot read it", error


def test_an_error_mid_epoch_closes_the_progress_bar(tmp_path):
    # A bar left open keeps its line: the error's message was printed onto the end of it.
    import io

    from synth import face
    from tqdm.auto import tqdm

    from rvf.data import BadImageError

    data = make_folder_dataset(tmp_path / "data", n=6, size=32)
    buf = io.BytesIO()
    face(0, 32).save(buf, "JPEG")
    bad = data / "train" / "fake" / "00001.jpg"
    bad.write_bytes(buf.getvalue()[:buf.getvalue().index(b"\xff\xda") + 20])  # decodes only half-way
    with pytest.raises(BadImageError, match="00001.jpg") as e:
        train(_cfg(data, tmp_path, cache=False, num_workers=0, holdout=0))
    # While the traceback (as the user's terminal sees it) still holds the epoch's frame:
    assert e.value.__traceback__ is not None
    assert not [bar for bar in tqdm._instances if bar.desc.startswith("epoch")]


def test_a_loader_workers_error_is_reported_by_its_own_message():
    # The DataLoader re-raises a worker's error with the worker's whole traceback in its message;
    # the user needs the one line that names the file.
    import importlib.util

    from torch._utils import ExceptionWrapper

    from rvf.data import BadImageError

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        raise BadImageError("faces/00004.jpg: cannot decode image (image file is truncated)")
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")  # what a worker sends back
    with pytest.raises(BadImageError) as e:
        wrapped.reraise()
    assert "Traceback" in str(e.value)
    assert script.message(e.value) == "faces/00004.jpg: cannot decode image (image file is truncated)"
    assert script.message(BadImageError("a.jpg: empty")) == "a.jpg: empty"  # raised in the main process


@pytest.mark.slow
def test_a_bad_image_mid_training_stops_two_processes_with_one_message(tmp_path):
    # `cache: false` decodes each file when a batch draws it, so a corrupt one fails in the one
    # process that draws it, mid-epoch, while the other waits for it in the gradient all-reduce
    # (which used to end in gloo's "Connection closed by peer" traceback). `holdout: 0`: 24 images,
    # 2 processes x 3 batches of 4, so each file is drawn once, by one process, in epoch 1.
    import io
    import re

    from synth import face

    data = make_folder_dataset(tmp_path / "data", n=12, size=32)
    buf = io.BytesIO()
    face(0, 32).save(buf, "JPEG")
    jpeg = buf.getvalue()
    bad = data / "train" / "fake" / "00004.jpg"
    bad.write_bytes(jpeg[:jpeg.index(b"\xff\xda") + 20])  # a whole header, the scan cut short: fails at decode
    logs = tmp_path / "logs"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    r = _run([*launch, "--log-dir", str(logs), "--redirects", "2", "scripts/train.py", "--data-dir", str(data),
              "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--batch-size", "4",
              "--tracker", "none", "--set", "cache=false", "--set", "holdout=0"],
             tmp_path, timeout=120, ACCELERATE_USE_CPU="1")
    stderr = {int(f.parent.name): f.read_text() for f in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(stderr) == [0, 1], r.stderr[-3000:]
    errors = {rank: re.findall(r"error: [^\r\n]*", text) for rank, text in stderr.items()}  # after a tqdm bar
    # One process names the file, without the DataLoader worker's traceback around the message;
    # the other says at most that it stopped for it (or was stopped first by the launcher's SIGTERM).
    named = [(rank, e) for rank, lines in errors.items() for e in lines if bad.name in e]
    assert len(named) == 1 and named[0][1].startswith(f"error: {bad}: cannot decode image"), stderr
    other = 1 - named[0][0]
    assert errors[named[0][0]] == [named[0][1]], stderr
    assert errors[other] in ([], [f"error: process {other} stopped: another process failed (see its error, or "
                                  "its exit code in the launcher's summary)"]), stderr
    assert not any("Traceback" in text or "terminate called" in text for text in (*stderr.values(), r.stdout)), stderr
    # The launcher's summary (after its own ChildFailedError traceback): 2 for the bad file; 1, or
    # its SIGTERM (-15), for the other process.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    assert r.returncode == 1 and "2" in codes and set(codes) <= {"2", "1", "-15"}, r.stderr[-3000:]


@pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"{SHARED_MINI} not present (rvf10k-mini ships with CI only)")
def test_lenet_learns_rvf10k_mini(tmp_path):
    m = train(TrainConfig(model="lenet", data_dir=str(SHARED_MINI), output_dir=str(tmp_path / "run"),
                          epochs=8, batch_size=32, lr=1e-3, tracker="none", cache_dir=str(tmp_path / "cache")))
    # 400 valid images; chance is 0.5. Measured (README "Tests"): 0.6725 accuracy, 0.738 AUC with bf16
    # autocast on CI's Intel Xeon (AMX), 0.6750 and 0.758 in fp32; 0.6700 / 0.729 and 0.6725 / 0.739
    # on an AVX512-BF16 AMD EPYC.
    assert m["valid"]["accuracy"] >= 0.60, m["valid"]
    assert m["valid"]["roc_auc"] >= 0.65


def test_a_run_resumes_only_on_the_train_list_it_drew_its_slice_from(tmp_path):
    from rvf.data import DatasetError

    data = make_folder_dataset(tmp_path / "data", n=12)
    first = train(_cfg(data, tmp_path, epochs=1))
    meta = json.loads((tmp_path / "run/model.json").read_text())
    assert meta["train_files"]["files"] == 24 and len(meta["train_files"]["sha256"]) == 64
    other = make_folder_dataset(tmp_path / "other", n=10)
    with pytest.raises(DatasetError, match=r"--resume .*run trained on another list of train images \(24 files"):
        train(_cfg(other, tmp_path, epochs=2), resume=True)
    shutil.move(data, tmp_path / "moved")  # the same images, moved: the same list
    resumed = train(_cfg(tmp_path / "moved", tmp_path, epochs=2), resume=True)
    assert resumed["history"][0] == first["history"][0] and len(resumed["history"]) == 2


def test_ctrl_c_in_an_overwrite_never_offers_to_resume_the_run_it_was_replacing(data_dir, tmp_path, monkeypatch):
    import importlib.util

    import rvf.train as rvf_train

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    old = _cfg(data_dir, tmp_path, epochs=1)
    train(old)
    new = old.replace(seed=1, epochs=3)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rvf_train, "train_one_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        train(new, overwrite=True)  # the old run is put back
    said = script.interrupted(new, overwrite=True)
    assert "holds the run it was to replace" in said and "--resume" not in said
    assert "--resume" in script.interrupted(old)  # the old run itself: resumable as before


def test_a_run_lock_on_a_file_system_without_flock_leaves_nothing_behind(tmp_path, monkeypatch, caplog):
    import errno

    import rvf.train as rvf_train

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    if rvf_train.fcntl is None:
        pytest.skip("no flock on this platform (Windows): RunLock does nothing there")
    monkeypatch.setattr(rvf_train.fcntl, "flock", no_flock)
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="failed start"), rvf_train.RunLock(out):
        assert out.is_dir() and not (out / ".training.lock").exists()  # trains unlocked, said once
        raise RuntimeError("failed start")
    assert "could not lock" in caplog.text and not (tmp_path / "a").exists()
