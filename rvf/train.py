"""One training loop for every model and every device.

`train(cfg)` reads top to bottom: data -> model -> optimizer and scheduler ->
`accelerator.prepare` -> epochs (train, select on the holdout slice, log, save) -> evaluate
the best model on the valid split -> reports. The same code runs on a CPU, one GPU or
several GPUs with DDP; how it is launched lives in `accelerate_config.yaml` and
`configs/accelerate/*.yaml`, never in branches here.

    accelerate launch scripts/train.py --config configs/lenet.yaml --data-dir ROOT
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock, and no run-folder lock there (see RunLock)
    fcntl = None

import rvf
from rvf import CLASSES
from rvf.checkpoint import read_meta, save_pretrained
from rvf.config import ConfigError, TrainConfig
from rvf.data import (
    RVF10K,
    DeviceLoader,
    ToUint8,
    build_cache,
    build_eval_transform,
    build_train_transform,
    check_same_train,
    collate_batch,
    default_cache_dir,
    holdout_split,
    resolve_data_config,
    stratified_sample,
    use_device_data,
)
from rvf.distill import distill_targets, load_teachers
from rvf.framing import FramingReference, dataset_images
from rvf.metrics import calibrate_threshold, classification_metrics
from rvf.step import TrainStep, build_train_step, cuda_graph_problems, set_capturable
from rvf.utils import (
    atomic_write_text,
    count_parameters,
    device_name,
    make_folder,
    predict_logits,
    remove_empty,
    resolve_mixed_precision,
)

__all__ = ["RunDirError", "RunLock", "Splits", "all_or_none", "cpu_threads", "use_cpu_threads", "check_launch",
           "load_splits", "build_ema", "build_mixup", "build_optimizer", "build_scheduler", "evaluate",
           "train_one_epoch", "train"]

log = logging.getLogger(__name__)

STATE_DIR = "checkpoints"  # Accelerate save_state folders, for resuming only
STATE_MARKER = "rvf_state.json"  # written last inside a state folder: marks it complete
RUN_OUTPUTS = (STATE_DIR, "wandb", "model.safetensors", "model.json", "framing.safetensors", "config.yaml",
               "metrics.json", "classification_report.txt", "*.png", "architecture.txt", "events.out.tfevents.*", "rvf",
               "eval-*", "robustness-*")  # what --overwrite removes
REPLACED_DIR = ".replaced"  # the run --overwrite replaces, until the new one has saved an epoch
LOCK_FILE = ".training.lock"  # locked by the process training into the folder (RunLock); not a run output


class RunDirError(RuntimeError):
    """The output folder holds another run, or cannot be resumed."""


class DivergedError(RuntimeError):
    """The loss or the holdout predictions stopped being finite numbers."""


# ----------------------------------------------------------------------------- data

@dataclass
class Splits:
    fit: torch.utils.data.Dataset  # train minus the holdout: what the optimizer sees
    holdout: torch.utils.data.Dataset  # stratified slice of train: model selection only
    valid: torch.utils.data.Dataset  # Kaggle's valid split: evaluated, never selected on
    root: Path = None
    counts: dict = field(default_factory=dict)
    train_files: dict = field(default_factory=dict)  # RVF10K.file_list_id of train, before any subset


def _stratified_subset(targets, n: int | None, seed: int) -> np.ndarray:
    return stratified_sample(targets, n, seed) if n else np.arange(len(targets))


def load_splits(cfg: TrainConfig, data_cfg, progress: bool = True, same_train_as: Sequence[tuple] = ()) -> Splits:
    """Find the data, decode it once (or index it per file) and cut the holdout slice.

    `same_train_as`: (what, its `train_files`, its data_dir) of runs whose holdout slice this one
    must share (the run resumed, teachers), checked against the train list before any decoding.
    """
    if cfg.data_dir is None:
        from rvf.data.download import download_rvf10k

        root = download_rvf10k()
        log.info("rvf10k downloaded to %s", root)
    else:
        root = Path(cfg.data_dir)
    train_ds, valid_ds = RVF10K(root, "train", skip_bad=cfg.skip_bad), RVF10K(root, "valid", skip_bad=cfg.skip_bad)
    train_files = train_ds.file_list_id()
    for what, trained, trained_root in same_train_as:
        check_same_train(what, trained, train_files, root, trained_root)
    split_seed = cfg.resolved_split_seed
    train_samples = [train_ds.samples[i] for i in _stratified_subset(train_ds.targets, cfg.subset, split_seed)]
    valid_samples = [valid_ds.samples[i] for i in _stratified_subset(valid_ds.targets, cfg.subset, split_seed)]
    size, interp = data_cfg.image_size, data_cfg.interpolation
    # Drawn on the file list, before any decoding: with skip_bad the slice is then the same
    # images (less the unreadable ones) with or without the cache, which ensembles rely on.
    fit_idx, hold_idx = holdout_split([t for _, t in train_samples], cfg.holdout, split_seed)
    if cfg.cache:
        kw = dict(interpolation=interp, cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad, progress=progress)
        train_all = build_cache(train_samples, size, name="train", **kw)
        valid = build_cache(valid_samples, size, name="valid", **kw)
        fit, holdout = train_all.of_samples(fit_idx), train_all.of_samples(hold_idx)
    else:  # decode per step: for data that does not fit on disk/in memory as uint8
        to_uint8 = ToUint8(size, interp)
        train_ds.samples, valid_ds.samples = train_samples, valid_samples
        train_ds.transform = valid_ds.transform = to_uint8
        fit = torch.utils.data.Subset(train_ds, fit_idx.tolist())
        holdout = torch.utils.data.Subset(train_ds, hold_idx.tolist())
        valid = valid_ds
    counts = {"fit": len(fit), "holdout": len(holdout), "valid": len(valid)}
    return Splits(fit, holdout, valid, Path(root), counts, train_files)


def _loader(dataset, batch_size: int, cfg: TrainConfig, train: bool, num_processes: int = 1) -> DataLoader:
    # With the uint8 cache a batch is one memory-map read: worker processes would only add
    # IPC. Decoding per file is the opposite: it needs every core.
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if cfg.cache else min(8, _cores()))
    # Dropping the ragged last batch keeps batch statistics honest, but only where every
    # process still gets a whole batch: each trains on its share of the batches.
    drop_last = train and len(dataset) > batch_size * num_processes
    # Workers start afresh each epoch (no persistent_workers): every new iterator draws its
    # workers' base seed from torch's global generator, which also draws the augmentation and
    # dropout. Kept alive, they drew it in the first epoch only, so from the second on a run
    # trained otherwise with workers than without, and a resumed run otherwise than an
    # uninterrupted one (whose workers were already running).
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=workers, collate_fn=collate_batch, pin_memory=torch.cuda.is_available())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Set by `accelerate launch` and by torchrun: under them an OMP_NUM_THREADS of 1 is the
# launcher's default, not necessarily the user's wish (cpu_threads says that instead).
_LAUNCHER_VARS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
# How torchrun (LOCAL_WORLD_SIZE) and MPI launchers (Accelerate's multi-CPU path) say how many
# processes share this machine.
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def cpu_threads(requested: int | None, num_processes: int) -> tuple[int, str | None]:
    """torch's intra-op threads for one training process on the CPU, and a note when rvf chose
    them over OMP_NUM_THREADS.

    `requested` (the `cpu_threads` key) wins. Otherwise OMP_NUM_THREADS does, unless it is unset,
    not a count, or 1 under a launcher: `accelerate launch` with a config file sets 1 when it was
    given neither `--num_cpu_threads_per_process` nor an OMP_NUM_THREADS of the user's, and
    torchrun sets 1 for several processes, so `accelerate launch --config_file ... scripts/train.py`
    left every core but one idle (AlexNet+BN at 64 px trained 1.6x slower on 2 cores). Then each
    process takes its share of the physical cores it may run on.
    """
    if requested:
        # Followed (the user asked), but said: more threads than cores time-slice and slow every step.
        if requested <= (cores := _cores()):
            return requested, None
        return requested, (f"{requested} CPU threads asked for, more than the {cores} core{'s' * (cores > 1)} this "
                           "process may run on: they will take turns on them, and each step slows")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    launched = any(var in os.environ for var in _LAUNCHER_VARS)
    if (omp.isdigit() and int(omp) > 1) or (omp == "1" and not launched):
        return torch.get_num_threads(), None  # asked for: torch read it at start-up
    local = next((int(v) for k in _LOCAL_SIZE_VARS if (v := os.environ.get(k, "")).isdigit() and int(v) > 0),
                 num_processes)
    cores = _cores()
    with contextlib.suppress(ImportError, TypeError):  # psutil comes with Accelerate; None where it cannot tell
        import psutil

        cores = max(1, cores * psutil.cpu_count(logical=False) // (os.cpu_count() or cores))  # hyperthreads: 1 a core
    threads = max(1, cores // local)
    # A 1 from --num_cpu_threads_per_process 1 reads the same as the launcher's own: say how to keep it.
    note = (f"OMP_NUM_THREADS=1 (a launcher's default) overridden: {threads} threads for this process "
            "(to choose: cpu_threads in training, --cpu-threads in evaluate.py and ensemble.py)"
            if omp == "1" and threads > 1 else None)
    return threads, note


def use_cpu_threads(accelerator, requested: int | None = None) -> tuple[str, str | None]:
    """On a CPU, set this process's torch threads (`cpu_threads`); return the model line's
    ", N threads" ("" elsewhere) and the note that an override was made, if one was."""
    if accelerator.device.type != "cpu":
        return "", None
    threads, note = cpu_threads(requested, accelerator.num_processes)
    torch.set_num_threads(threads)
    return f", {threads} thread{'s' * (threads > 1)}", note


def check_launch(accelerator, script: str = "scripts/train.py") -> None:
    """Say when a launcher asked for several processes and Accelerate runs one: two ways.

    - `accelerate launch --num_processes N` without --multi_gpu (or with --cpu) exports the
      rendezvous address for N processes but starts one, and says nothing: a warning.
    - `accelerate launch --multi_gpu` on a machine without GPUs, or torchrun without
      ACCELERATE_USE_CPU=1, starts WORLD_SIZE processes that each fall back to one process's
      run: N copies of the same work writing into one folder. A `ConfigError`, said by the
      first process; the others leave quietly (`reported_elsewhere`).
    """
    if accelerator.num_processes > 1:
        return
    world = os.environ.get("WORLD_SIZE", "")
    if not world and "MASTER_ADDR" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        # (under `accelerate launch`, not a cluster's environment)
        log.warning("the launcher asked for several processes but started one: `accelerate launch` starts "
                    "several only with --multi_gpu on GPUs, or through MPI (--mpirun_hostfile) on CPUs; "
                    f"for CPU processes on one machine: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N {script} ...")
    if not world.isdigit() or int(world) < 2:
        return
    e = ConfigError(f"{world} processes were started (WORLD_SIZE={world}) but Accelerate runs each on its own "
                    f"({'no GPU for them' if accelerator.device.type == 'cpu' else 'no process group'}), so they "
                    f"would do the same work {world} times into one folder; for CPU processes on one machine: "
                    f"ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {world} {script} ... (--multi_gpu needs GPUs)")
    e.reported_elsewhere = os.environ.get("RANK", "0") != "0"
    raise e


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(cfg: TrainConfig, model: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer factory, with torch's fused kernel where the optimizer has one.

    `capturable` (CUDA only) keeps the optimizer's step count on the device, so its step can
    be recorded in a CUDA graph (`rvf.step`); optimizers without the option are built as usual.

    A fused step is one vectorised kernel per parameter instead of ~10 element-wise ops per
    parameter: on this project's 2-core CPU a whole 64 px training step of batch 64 drops from
    105 to 97 ms for AlexNet and from 28.3 to 26.6 ms for LeNet. timm's own optimizers (lamb,
    lion...) have no `fused` argument and are built as they are.
    """
    import inspect

    from timm.optim import create_optimizer_v2, get_optimizer_class

    kwargs = {}
    cls = get_optimizer_class(cfg.optimizer, bind_defaults=False)
    params = inspect.signature(cls).parameters if cls.__module__.startswith("torch.optim") else {}
    if cfg.fused_optimizer and "fused" in params:
        kwargs["fused"] = True
    if capturable and "capturable" in params:
        kwargs["capturable"] = True
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, **kwargs)


def wants_cuda_graph(cfg: TrainConfig, device, num_processes: int, precision: str | None) -> bool:
    """Whether to build this run for a CUDA-graph step (capturable optimizer, no autocast cache).

    Asked before the optimizer exists, with `cuda_graph_problems`' own rules. `cuda_graph: true`
    asks on any single CUDA process, and the full check after the optimizer is built then names
    whatever stands in the way; `null` asks only where no rule rules a graph out, so a run that
    will step eagerly anyway (fp16, SGD, torch.compile, batches of varying size) keeps the eager
    optimizer.
    """
    if cfg.cuda_graph is False or torch.device(device).type != "cuda" or num_processes > 1:
        return False
    return cfg.cuda_graph is True or not cuda_graph_problems(
        device, cfg.optimizer, num_processes=num_processes, mixed_precision=precision, compile=cfg.compile,
        variable_batches=cfg.skip_bad and not cfg.cache, sam=cfg.sam_rho > 0)


def refuse_cuda_graph(problems: list[str]) -> None:
    """`cuda_graph: true` is a demand: any reason a step cannot be captured here is an error."""
    if problems:
        raise ConfigError("cuda_graph: true, but a training step cannot be captured here: " + "; ".join(problems))


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's `Mixup` for `cfg.mixup` / `cfg.cutmix` (one lambda per batch), or None when both are 0."""
    for key in ("mixup", "cutmix"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} is a Beta distribution's alpha and must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.mixup_prob <= 1.0:
        raise ConfigError(f"mixup_prob must be between 0 and 1, got {cfg.mixup_prob}")
    if not (cfg.mixup or cfg.cutmix) or not cfg.mixup_prob:
        return None
    if cfg.batch_size % 2:
        # "batch" mode mixes image i with image B-1-i of the same batch.
        raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, mode="batch",
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def build_ema(cfg: TrainConfig, model: nn.Module):
    """timm's `ModelEmaV3` of `model` for `cfg.ema_decay` (None when off), with `cfg.ema_warmup`'s ramp."""
    if not cfg.ema_decay:
        return None
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be between 0 and 1 (e.g. 0.999), got {cfg.ema_decay}")
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup, warmup_power=0.75)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """A per-step LR schedule: optional linear warmup, then constant, cosine to `min_lr`, or
    step decay, as one `LambdaLR` over the global step.

    One function of the step, rather than torch's chained schedulers, because their saved
    state carries the horizon (`T_max`, milestones): resuming with `--epochs` raised would
    restore the old horizon, and a finished cosine would climb back to the peak. A
    `LambdaLR` saves only the step, so `--resume RUN --epochs N` continues the N-epoch
    schedule from where the run stopped.
    """
    import math

    if cfg.scheduler not in ("none", "cosine", "step"):
        raise ValueError(f"scheduler must be none, cosine or step, got {cfg.scheduler!r}")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        log.warning("warmup_epochs %g >= epochs %d: the learning rate warms up for the whole run and never "
                    "reaches its schedule; lower warmup_epochs", cfg.warmup_epochs, cfg.epochs)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0  # min_lr as a fraction of the peak
    step_size = max(1, cfg.step_size * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return 1e-3 + (1 - 1e-3) * step / warmup  # linear from lr/1000 to lr
        t = step - warmup
        if cfg.scheduler == "cosine":
            return floor + (1 - floor) * (1 + math.cos(math.pi * min(t, total - warmup) / (total - warmup))) / 2
        if cfg.scheduler == "step":
            return cfg.gamma ** (t // step_size)
        return 1.0

    return StepSchedule(optimizer, factor)


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A `LambdaLR` whose saved state is its step alone: the schedule comes from the config.

    It also reads the state of the chained torch schedulers that runs saved before it (their
    `last_epoch` counts steps the same way), so those runs still resume.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)


def check_input_size(model: nn.Module, name: str, image_size: int, crop_size: int | None = None) -> None:
    """Fail before any decoding when the model cannot take its images (or its training crops).

    One image through the model at each size: a LeNet at 8 px or an AlexNet at 16 px would
    otherwise fail in the first step, after the cache is built and `--overwrite` has cleared
    the previous run.
    """
    if crop_size is not None and not 8 <= crop_size < image_size:
        raise ConfigError(f"crop_size {crop_size} must be at least 8 and smaller than image_size {image_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in (image_size,) if crop_size is None else (crop_size, image_size):
                model(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:  # timm's fixed-size nets assert
        if crop_size is None:
            raise ConfigError(f"image_size {image_size}: model {name} cannot take {image_size}px images ({e}); "
                              f"use a larger image_size") from None
        raise ConfigError(f"crop_size {crop_size}: the model cannot take both {crop_size}px crops and "
                          f"{image_size}px images ({e}). Use a model that pools globally (every "
                          "rvf model and timm's CNNs do), or leave crop_size unset.") from None
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, transform, train_step: TrainStep, scheduler, accelerator, cfg,
                    epoch: int, ema=None, step: int = 0, mixup=None, teachers=None) -> tuple[dict, int]:
    """Train for one epoch; return ({loss, accuracy, lr, images_per_second, seconds}, global step).

    `train_step` runs forward, loss, backward and the optimizer step on each batch (an
    `rvf.step.TrainStep`, eager, or a CUDA graph replayed). It outlives the epoch: a graph is
    captured once per run.

    With `mixup` (a timm `Mixup`) the batch and its labels are mixed before the forward pass
    and the loss gets soft targets; accuracy is still counted against the unmixed labels.
    With `teachers` (`rvf.distill.Teachers`) the targets are blended with their probabilities
    on the same (augmented, mixed) batch.

    Loss and accuracy accumulate on the device and the host never waits for it inside the
    epoch: every `log_every` steps the running totals are copied to the host asynchronously,
    and the progress bar shows the newest copy that has landed (`_AsyncStats`).
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    shown = _AsyncStats(device)
    lr = scheduler.get_last_lr()[0]
    t0 = time.perf_counter()
    # `with`: an error mid-epoch (a file that will not decode) clears the bar before its message prints
    with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
              disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        for i, (images, labels) in enumerate(loader):
            if not len(labels):  # skip_bad without the cache: every image of this batch was unreadable
                continue
            x = transform(images)  # uint8 (B, 3, H, W) -> augmented, normalised float
            targets = labels
            if mixup is not None:
                x, targets = mix_batch(mixup, x, labels)  # (B, num_classes) soft targets, smoothing included
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if teachers is not None:
                with accelerator.autocast():
                    teacher_probs = teachers(x)
                targets = distill_targets(targets, teacher_probs, cfg.distill_weight, teacher_probs.shape[1],
                                          smoothing=cfg.label_smoothing)
            loss, logits = train_step(x, targets)  # forward, loss, backward, (clip), optimizer step
            lr = scheduler.get_last_lr()[0]  # what this step used; after `scheduler.step()` it is the next one's
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=step)
            loss_sum += loss * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            bar.update()
            if (i + 1) % cfg.log_every == 0 and not bar.disable:
                if (last := shown.update(loss_sum, correct, seen)) is not None:
                    bar.set_postfix(loss=f"{last[0] / last[2]:.4f}", acc=f"{last[1] / last[2]:.3f}",
                                    img_s=f"{seen * accelerator.num_processes / (time.perf_counter() - t0):.0f}")
    totals = accelerator.reduce(torch.stack([loss_sum, correct.to(loss_sum.dtype),
                                             torch.tensor(float(seen), device=device)]), "sum")
    loss_t, correct_t, n = totals.tolist()  # waits for the device: the epoch's work is done, not just queued
    seconds = time.perf_counter() - t0
    return {"loss": loss_t / max(n, 1), "accuracy": correct_t / max(n, 1), "lr": float(lr),
            "images_per_second": n / seconds, "seconds": seconds}, step


def mix_batch(mixup, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch `Mixup` on any batch size: it pairs image i with image B-1-i, so an odd
    batch (a short last one, or one that lost an unreadable file) mixes all but its last
    image, which keeps its own (smoothed) label."""
    if len(x) % 2 == 0:
        return mixup(x, labels)
    from timm.data.mixup import mixup_target

    head, head_targets = mixup(x[:-1], labels[:-1])
    last = mixup_target(labels[-1:], mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    return torch.cat([head, x[-1:]]), torch.cat([head_targets, last.to(head_targets.dtype)])


class _AsyncStats:
    """Running (loss sum, correct, seen) copied device -> host without waiting for the device.

    `update` queues a copy into pinned host memory behind the work already queued (unless one
    is still in flight) and returns the newest copy that has landed, or None. On a CPU the
    copy is immediate.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(2, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.in_flight = None  # `seen` of the copy not yet known to have landed
        self.landed = None

    def update(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, int] | None:
        if self.in_flight is not None and self.event.query():
            self.landed, self.in_flight = (*self.host.tolist(), self.in_flight), None
        if self.in_flight is None:
            self.host.copy_(torch.stack([loss_sum.float(), correct.float()]), non_blocking=self.cuda)
            if self.cuda:
                self.event.record()
                self.in_flight = seen
            else:
                self.landed = (*self.host.tolist(), seen)
        return self.landed


@torch.no_grad()
def evaluate(model, loader, transform, accelerator, desc: str = "eval",
             tta_hflip: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Predict a whole split across all processes (with `tta_hflip`, image and mirror averaged).

    Always in fp32, whatever precision trains the model (`fp32_forward`): the threshold
    calibrated here and the metrics in `metrics.json` are then what `evaluate.py`,
    `predict.py` and the web app, which score in fp32, reproduce.

    `gather_for_metrics` drops the samples DDP pads onto the last batch, so every image is
    counted exactly once however many processes run.

    Returns:
        (labels (N,), probabilities (N, 2), mean cross-entropy).
    """
    model.eval()
    forward = fp32_forward(model)
    all_probs, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                               disable=not accelerator.is_local_main_process):
        if not len(labels):  # skip_bad without the cache: nothing readable in this batch
            continue
        logits = predict_logits(forward, transform(images), hflip=tta_hflip).float()  # (B, 2)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_probs.append(logits)
        all_labels.append(labels)
    if not all_probs:  # nothing readable in the split (skip_bad without the cache)
        return _no_predictions()
    logits = torch.cat(all_probs)
    labels = torch.cat(all_labels)
    loss = nn.functional.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    return labels.cpu().numpy(), logits.softmax(1).cpu().numpy(), loss


def _no_predictions() -> tuple[np.ndarray, np.ndarray, float]:
    """What `evaluate` returns for a split with no images: empty labels and probabilities, NaN loss."""
    return np.empty(0, dtype=np.int64), np.empty((0, len(CLASSES)), dtype=np.float32), float("nan")


def fp32_forward(model: nn.Module):
    """`model`'s forward as its class defines it, without mixed-precision autocast.

    `accelerator.prepare` wraps a model's forward in autocast on its instance (and EMA copies
    inherit the wrapper); calling the class's own forward sidesteps it. Unwrapping DDP is safe
    here: evaluation runs without gradients, so there is nothing to synchronise.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return type(model).forward.__get__(model)


# ----------------------------------------------------------------------------- run folder

def run_exists(out: Path) -> bool:
    """Whether `out` holds a run (finished or not), or one set aside by an unfinished --overwrite."""
    return any((out / name).exists() for name in ("config.yaml", STATE_DIR, REPLACED_DIR))


def check_output_path(out: Path) -> None:
    """Refuse an output dir that is a file, or that cannot be made or written into."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output dir {out} is a file; give a folder for the run")
    parent = next(p for p in (out, *out.parents) if p.exists())  # the part that exists already
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"output dir {out}: cannot write into {parent}")


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, cache_dir: str | None = None) -> bool:
    """Refuse to mix two runs in one folder unless asked to resume or overwrite, and to put a run
    in a folder of other files at all.

    Returns whether the folder holds a run to replace. `ReplacedRun` sets it aside once the new
    run's model and data are set up, so that a typo costs nothing but an error message. The
    folder itself is made by `RunLock`, which removes it again if the run fails to start, so that
    none is left behind empty. `cache_dir` is the run's `cache_dir`: a decode cache inside `out`
    is the run's own.
    """
    check_output_path(out)
    holds_run = run_exists(out)
    if resume and not holds_run:
        raise RunDirError(f"--resume {out}: no run there to resume (no config.yaml)")
    if not holds_run and out.is_dir():
        # --output-dir ~/photos: the model, reports and checkpoints/ would land among the user's
        # files, and a later --overwrite removes what a run writes by name, every *.png included.
        # The decode cache, put in here, is written before the run is (load_splits): it is the run's.
        cache = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).resolve()
        own = {cache.relative_to(out.resolve()).parts[0]} if out.resolve() in cache.parents else set()
        own.add(LOCK_FILE)  # this run's own (RunLock), or one a killed run left: no one's files
        if theirs := sorted(p.name for p in out.iterdir() if p.name not in own):
            more = f" and {len(theirs) - 1} more" if len(theirs) > 1 else ""
            raise RunDirError(f"output dir {out} holds no run but is not empty ({theirs[0]}{more}): the model, "
                              "reports and checkpoints/ would go in among those files; give a new or empty folder"
                              + (" (--overwrite replaces a run, never other files)" if overwrite else ""))
    state = latest_state(out)
    replaced = out / REPLACED_DIR if (out / REPLACED_DIR).is_dir() else None
    aside = f" (the run it was replacing is in {replaced})" if replaced else ""
    # A run that died in its first epoch leaves config.yaml (and tracker logs), nothing to lose.
    # It is still refused rather than started over: a run still in its first epoch looks the
    # same, and where there is no flock (Windows: RunLock) the refusal is all that keeps a second
    # command from training into its folder.
    unsaved = holds_run and state is None and not any((out / name).exists()
                                                      for name in ("model.safetensors", "metrics.json"))
    if resume and unsaved and (out / "config.yaml").is_file():
        raise RunDirError(f"--resume {out}: the run there saved no epoch (it stopped in its first epoch, or is still "
                          f"in it), so there is nothing to resume; to start it again, pass --config "
                          f"{out / 'config.yaml'} --output-dir {out} --overwrite instead of --resume{aside}")
    if resume and state is None:
        raise RunDirError(f"--resume {out}: no complete saved state under {out / STATE_DIR}{aside}")
    if unsaved and not overwrite:
        raise RunDirError(f"output dir {out} holds a run that saved no epoch (it stopped in its first epoch, or is "
                          f"still in it); pass --overwrite to start it again"
                          + (f" (the run it was replacing is in {replaced}; --overwrite deletes it once the new "
                             "run saves an epoch)" if replaced else ""))
    if holds_run and not (resume or overwrite):
        resumable = f"pass --resume {out} to continue it or " if state is not None else "pass "
        raise RunDirError(f"output dir {out} already holds a run; {resumable}--overwrite to replace it")
    return holds_run and not resume


def run_outputs(out: Path, project: str = "rvf") -> list[Path]:
    """What a run wrote into `out`, and only that: --output-dir might hold other things too.

    `project` is the folder TensorBoard logs into (RUN/<project>), whatever it is called: taken
    by its exact name, never as a glob pattern ("*" is a valid project name), and only when it
    holds TensorBoard's event files (a project may share its name with a folder of the user's).
    """
    tb = out / project
    own = [tb] if (project.strip(".") and "/" not in project and tb.is_dir()
                   and next(tb.rglob("events.out.tfevents.*"), None)) else []
    return [p for name in RUN_OUTPUTS for p in out.glob(name)] + own


def clear_run(out: Path, project: str = "rvf") -> None:
    """Remove what a run wrote into `out` (see `run_outputs`)."""
    for p in run_outputs(out, project):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class ReplacedRun:
    """The run `--overwrite` replaces, set aside in RUN/.replaced until the new run has saved an epoch.

    Until then the old run is the only one there is: a first step out of memory, a tracker that
    will not start or a Ctrl-C in the first epoch (the wrong config, noticed) puts it back
    instead of leaving nothing. A process killed outright leaves it in RUN/.replaced, and the
    next `--overwrite` keeps that one (what is in RUN is then a replacement that never saved);
    once RUN holds a saved epoch again, a leftover RUN/.replaced is stale and goes.
    """

    def __init__(self, out: Path, project: str, replace: bool, main: bool = True):
        self.out, self.project, self.aside = out, project, None
        out.mkdir(parents=True, exist_ok=True)
        if not main:  # one process moves files
            return
        aside = out / REPLACED_DIR
        if aside.is_dir() and latest_state(out) is not None:  # RUN has saved an epoch since
            shutil.rmtree(aside, ignore_errors=True)
        if not replace:
            return
        self.aside = aside
        if aside.is_dir():  # a replacement killed before its first epoch: the old run is in there
            clear_run(out, project)
        else:
            aside.mkdir()
            for p in run_outputs(out, project):
                p.rename(aside / p.name)

    def __enter__(self) -> "ReplacedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.aside is not None:
            try:
                self.restore()
            except Exception as e:  # never in place of the error that stopped the run
                log.error("could not put the old run back (%s: %s); it is in %s", type(e).__name__, e, self.aside)

    def restore(self) -> None:
        """Remove what the new run wrote and put the old run back."""
        clear_run(self.out, self.project)
        for p in self.aside.iterdir():
            p.rename(self.out / p.name)
        self.aside.rmdir()
        self.aside = None
        log.warning("the new run failed before saving an epoch; %s holds the run it was to replace again", self.out)

    def drop(self) -> None:
        """The new run has saved an epoch: the old one goes for good."""
        aside, self.aside = self.aside, None  # first: from here on, a failure must never restore
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # what a failed delete leaves is stale: the next run clears it


class RunLock:
    """An exclusive lock on a run folder for as long as one process trains into it (RUN/.training.lock).

    Without it a second `--resume RUN` or `--overwrite` started while RUN trains would pass every
    check (the folder holds a run, and was asked to resume or replace it) and both would write
    into it. `flock` dies with its process however it ends, so a killed run leaves no stale lock,
    only a file the next run locks again; the file stays where it is when `--overwrite` sets the
    old run aside (it is no run output) and is removed when the run ends. The lock makes the
    folder, and removes what it made again if the run leaves nothing in it (a failed start).
    Under DDP the main process alone holds it.
    """

    def __init__(self, out: Path):
        self.out, self.fd, self.made = out, None, []

    def __enter__(self) -> "RunLock":
        if fcntl is None:  # Windows has no flock: two commands into one folder are not caught there
            return self
        path = self.out / LOCK_FILE
        while True:
            self.made += make_folder(self.out)  # again after a holder that left removed it
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip()  # empty while the holder is writing it
                os.close(fd)
                raise RunDirError(f"{self.out} is being trained by another process"
                                  + (f" (pid {pid})" if pid.isdigit() else "")
                                  + "; wait for it or pick another --output-dir") from None
            except OSError as e:  # a file system without flock (some network mounts): train unlocked
                os.close(fd)
                path.unlink(missing_ok=True)  # a lock no one can take is no use to the next run either
                log.warning("could not lock %s (%s): a second command could train into it at the same time",
                            path, e.strerror or e)
                return self
            # The previous holder may have removed the file between our open and our lock: ours
            # is then a lock on a file no one else will open. Only the one at the path counts.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # removed while still held: see the check in __enter__
                (self.out / LOCK_FILE).unlink()
            os.close(self.fd)
            self.fd = None
        remove_empty(self.made)  # a failed start leaves no folder behind; one the run wrote into stays


# What draws the holdout slice: a resume that changed one would let trained-on images into it.
SPLIT_KEYS = ("holdout", "subset", "resolved_split_seed")
# What the saved weights and optimizer state are for.
MODEL_KEYS = ("model", "model_args", "image_size", "interpolation", "optimizer")


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with another model, settings that would draw another holdout slice, another
    batch size (the schedule counts steps) or an EMA switched on or off (the state holds one or not)."""
    from rvf.config import load_run_config

    saved = load_run_config(out / "config.yaml", warn=False)  # scripts/train.py warned, reading it

    def changes(keys):
        return [f"{k.removeprefix('resolved_')} {getattr(saved, k)} -> {getattr(cfg, k)}"
                for k in keys if getattr(saved, k) != getattr(cfg, k)]

    if changed := changes(MODEL_KEYS):
        raise RunDirError(f"--resume {out}: {', '.join(changed)}; a resumed run keeps its model, input and "
                          "optimizer (start a new run instead)")
    if changed := changes(SPLIT_KEYS):
        raise RunDirError(f"--resume {out}: {', '.join(changed)} would draw another holdout slice, which "
                          "could hold images the run already trained on; resume with the run's own values")
    if changed := changes(("batch_size",)):
        raise RunDirError(f"--resume {out}: {changed[0]}; the saved LR schedule counts the run's steps in batches "
                          f"of {saved.batch_size} (resume with them, or start a new run)")
    if bool(saved.ema_decay) != bool(cfg.ema_decay):
        raise RunDirError(f"--resume {out}: ema_decay {saved.ema_decay} -> {cfg.ema_decay}; the saved state "
                          f"{'holds' if saved.ema_decay else 'has no'} weight average to continue (resume with "
                          f"ema_decay {saved.ema_decay})")


def latest_state(out: Path) -> Path | None:
    """Return the newest complete `save_state` folder of a run, if any."""
    states = []
    for p in (out / STATE_DIR).glob("epoch_*"):
        m = re.fullmatch(r"epoch_(\d+)", p.name)
        if m and (p / STATE_MARKER).is_file():
            states.append((int(m.group(1)), p))
    return max(states)[1] if states else None


def wandb_run_to_continue(out: Path, run: dict) -> str | None:
    """The W&B run id a resumed run logs on to: the one it saved, unless its folder is a copy.

    A copy (`cp -r runs/a runs/b`, then `--resume runs/b`) is a new run forked from a's state:
    logging on to a's id would mix b's epochs into a's W&B history, so it gets a new id. A folder
    resumed where it was saved, or moved (its old place holds no run of that id any more, e.g.
    renamed or on another machine), continues its own.
    """
    wandb_id, saved_in = run.get("wandb_id"), run.get("wandb_folder")  # no folder: saved before rvf kept it
    if not wandb_id or saved_in is None or Path(saved_in) == out.resolve():
        return wandb_id
    state = latest_state(Path(saved_in))
    try:
        original = state is not None and json.loads((state / STATE_MARKER).read_text()).get("wandb_id") == wandb_id
    except (OSError, ValueError):
        original = False
    return None if original else wandb_id


def save_run_state(accelerator, out: Path, epoch: int, run: dict) -> None:
    """`save_state` into checkpoints/epoch_N, mark it complete, then drop older ones."""
    path = out / STATE_DIR / f"epoch_{epoch}"
    # Accelerate logs each file it saves at INFO: eight lines an epoch under the epoch's own line.
    loggers = [logging.getLogger(name) for name in ("accelerate.accelerator", "accelerate.checkpointing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        accelerator.save_state(str(path))
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    accelerator.wait_for_everyone()  # each process writes its own RNG state: all of them, before "complete"
    if accelerator.is_main_process:
        atomic_write_text(path / STATE_MARKER, json.dumps(run))
        for old in (out / STATE_DIR).glob("epoch_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- processes

@contextmanager
def all_or_none(accelerator, main_first: bool = False):
    """Stop every process if the block raises in any of them, with one error to print.

    A process that leaves on an error of its own strands the others at the next barrier or
    collective until it is gone; each then dies on a gloo/NCCL "connection closed" traceback
    of its own (or on the launcher's SIGTERM), after the one line that says what was wrong.
    Here the processes compare notes at the end of the block (one `gather_object`) and all
    raise: the main process its own error or, if it had none, the first other process's (by
    rank, its traceback attached as a note); the others their own, or that same first one,
    marked `reported_elsewhere` for the caller to print nothing. The main process logs any
    other error a process hit, so what one process saw alone is never lost.

    Args:
        accelerator: the run's Accelerator; with one process the block runs as it would bare.
        main_first: the main process runs the block first (it decodes the cache the others then
            map), and the others do not start it if it failed there.
    """
    if accelerator.num_processes == 1:
        yield
        return
    main = accelerator.is_main_process
    if main_first and not main:
        _raise_if_any(accelerator, None)  # pairs with the main process's first call below
    error = None
    try:
        yield
    except Exception as e:  # anything: a bug stops the others as surely as a typo does
        error = e
    if main_first and main:
        _raise_if_any(accelerator, error)
    _raise_if_any(accelerator, error)


def _raise_if_any(accelerator, error: Exception | None) -> None:
    """Gather each process's error (or None) and raise on every process if any was one (see `all_or_none`)."""
    import pickle
    import traceback

    from accelerate.utils import gather_object

    sent = error
    if error is not None:
        try:  # the others must be able to rebuild it, or the gather fails in them alone
            sent = pickle.loads(pickle.dumps(error))
        except Exception:
            sent = RuntimeError(f"{type(error).__name__}: {error}")
        if not accelerator.is_main_process:  # where a bug was, for the main process's traceback
            note = f"raised in process {accelerator.process_index}:\n" + "".join(
                traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
            # add_note is Python 3.11's; on 3.10 its AttributeError, raised before the gather,
            # would strand the main process there (the very hang this avoids).
            sent.__notes__ = [*getattr(sent, "__notes__", []), note]
    errors = gather_object([sent])  # [rank 0's, rank 1's, ...]
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    first = failed[0][1]
    if accelerator.is_main_process:
        for rank, e in failed:
            if str(e) != str(first):
                log.error("process %d stopped too: %s", rank, e)
    else:
        (error if error is not None else first).reported_elsewhere = True
    raise error if error is not None else first


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train `cfg.model` on rvf10k, select on the holdout slice, report on the valid split.

    Args:
        cfg: the resolved config.
        resume: continue the run in `cfg.output_dir` from its newest saved state.
        overwrite: replace a run already in `cfg.output_dir`.

    Returns:
        The metrics written to `metrics.json`.
    """
    # Holds the run folder's lock (`RunLock`), taken once the processes are known, until the end.
    with contextlib.ExitStack() as held:
        return _train(cfg, resume, overwrite, held)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> dict:
    """`train`'s body; what it enters on `held` is released when the run returns or fails."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs, DataLoaderConfiguration, parse_flag_from_env, set_seed
    from timm.utils import distribute_bn

    from rvf import reports, tracking
    from rvf.models import create_model

    out = cfg.resolved_output_dir()
    mixup = build_mixup(cfg, num_classes=len(CLASSES))  # here, so bad settings fail before any decoding
    if cfg.sam_rho < 0:
        raise ConfigError(f"sam_rho is SAM's neighbourhood radius (e.g. 0.05; 0 = off), got {cfg.sam_rho}")
    if cfg.scheduler == "cosine" and cfg.min_lr > cfg.lr:  # the "floor" would be the peak: lr climbs to it
        raise ConfigError(f"min_lr {cfg.min_lr:g} is above lr {cfg.lr:g}: the cosine schedule would climb to it "
                          "instead of decaying; set min_lr below lr")
    log_with, init_kwargs, tracker_note = tracking.resolve_tracker(cfg, out)
    project = tracking.project_name(cfg)
    # PartialState is the process/device state the Accelerator below will share; its device
    # decides what "auto" precision means (bf16 only where the hardware does bf16 maths). It
    # reads `--cpu` from the environment as AcceleratorState would, or a CPU DDP run
    # (torchrun + ACCELERATE_USE_CPU) would start as one process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_mixed_precision(cfg.mixed_precision, state.device)
    # A CUDA graph (rvf.step) needs a capturable optimizer, and autocast's weight-cast cache
    # off, or casts made before capture would be replayed stale.
    graph_wanted = wants_cuda_graph(cfg, state.device, state.num_processes, precision)
    # Accelerate keeps one precision per process and refuses a second Accelerator with another;
    # a second train() in one process (a notebook, a sweep, the tests) may want another, so the
    # precision-holding AcceleratorState starts afresh. PartialState (devices, the process
    # group) is kept; the previous run's Accelerator is finished with by now.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if graph_wanted else None,
        log_with=log_with, project_dir=str(out),
        # A seeded sampler gives each epoch the same order whether or not the run was resumed;
        # `data_seed` gives it the same order in every process, which each then takes its share
        # of (left to the process's own seed, set per device below, the shares would overlap).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=torch.cuda.is_available()),
    )
    check_launch(accelerator)
    threads_text, threads_note = use_cpu_threads(accelerator, cfg.cpu_threads)
    # Every check of the folder, the settings and the model, before any decoding. The main
    # process alone checks the folder; all_or_none stops the others with it when it fails.
    replace = False
    with all_or_none(accelerator):
        if accelerator.is_main_process:
            check_output_path(out)  # said as such, before the lock makes the folder
            # Before the folder is judged: while this run trains, a second command is refused.
            held.enter_context(RunLock(out))
            replace = prepare_output_dir(out, resume, overwrite, cfg.cache_dir)
            if resume:
                check_resume_config(out, cfg)
        if cfg.device_data and not cfg.cache:
            raise ConfigError("device_data: true needs cache: true (the device holds the decoded uint8 split)")
        if cfg.skip_bad and not cfg.cache and accelerator.num_processes > 1:
            # Each process would drop its own bad files, and their batches stop lining up.
            raise ConfigError("skip_bad with cache: false runs in one process only; with the cache (the default) "
                              "unreadable images are dropped once, before the split is shared out")
        if accelerator.gradient_accumulation_steps > 1:
            # The loop steps the optimizer every batch; Accelerate would still divide each loss.
            raise ConfigError(f"gradient accumulation ({accelerator.gradient_accumulation_steps} steps, from the "
                              "Accelerate config) is not supported: raise batch_size, or add processes")
        if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            # Accelerate has no fp16 autocast on a CPU: the run would train in fp32 and record fp16.
            asked = cfg.mixed_precision
            source = "" if asked == "fp16" else f" (the launcher's, for mixed_precision: {asked})"
            raise ConfigError(f"mixed_precision fp16{source} needs a GPU: on a CPU Accelerate trains in fp32 instead "
                              "and the run would record fp16; use bf16 or no")
        if cfg.cuda_graph:  # by the optimizer's name; its built flags are checked below
            refuse_cuda_graph(cuda_graph_problems(
                accelerator.device, cfg.optimizer, num_processes=accelerator.num_processes,
                mixed_precision=accelerator.mixed_precision, compile=cfg.compile,
                variable_batches=cfg.skip_bad and not cfg.cache, sam=cfg.sam_rho > 0))
        # Seed before building the model so the seed also fixes the initial weights.
        set_seed(cfg.seed)

        # 1) model, and the input pipeline it declares
        model_args = {"num_classes": len(CLASSES), **cfg.model_args}
        try:
            model = create_model(cfg.model, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file,
                                 **model_args)
        except (RuntimeError, TypeError, OSError) as e:  # no weights to be had, an unknown model_args key
            raise ConfigError(f"model {cfg.model!r} (model_args {cfg.model_args}, pretrained {cfg.pretrained}, "
                              f"pretrained_file {cfg.pretrained_file}): {e}") from e
        if accelerator.num_processes > 1:
            # Same weights everywhere, but each process its own augmentation draws (flips, mixing).
            set_seed(cfg.seed, device_specific=True)
        data_cfg = resolve_data_config(model, image_size=cfg.image_size, interpolation=cfg.interpolation)
        input_size = (3, data_cfg.image_size, data_cfg.image_size)
        check_input_size(model, cfg.model, data_cfg.image_size, cfg.crop_size)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Teachers are checked (size, holdout slice) here, before any decoding.
        teachers = load_teachers(cfg, data_cfg, CLASSES, accelerator.device, channels_last=cfg.channels_last)

    # 2) data: the main process decodes the cache first, the others then map the same file.
    # A resumed run and the teachers must have drawn their holdout slice from the same train list.
    sharing = [(out, f"--resume {out}")] if resume else []
    if cfg.holdout:  # (without a holdout slice there is nothing a teacher could leak into)
        sharing += [(Path(t), f"teacher {t}") for t in cfg.teachers]
    same_train_as = []
    for folder, what in sharing:
        if (folder / "model.json").is_file():  # a folder without one is refused elsewhere, more clearly
            meta = read_meta(folder)
            same_train_as.append((what, meta.get("train_files"), meta.get("config", {}).get("data_dir")))
    with all_or_none(accelerator, main_first=True):
        splits = load_splits(cfg, data_cfg, progress=accelerator.is_local_main_process, same_train_as=same_train_as)
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    # On a GPU (and on a CPU for a small split) the whole uint8 train split lives on the device
    # and batches are indexed there: no DataLoader, no per-step copy (rvf.data.device_loader).
    fit_bytes = splits.fit.nbytes if cfg.cache else 0  # no cache: a per-file Subset, never resident
    device_data = use_device_data(cfg.device_data, accelerator.device, fit_bytes, cache=cfg.cache)
    if device_data:
        train_loader = DeviceLoader(splits.fit, cfg.batch_size, accelerator.device, seed=cfg.seed,
                                    rank=accelerator.process_index, world_size=accelerator.num_processes)
        steps_per_epoch = len(train_loader) * accelerator.num_processes  # as one process would count them
    else:
        train_loader = _loader(splits.fit, cfg.batch_size, cfg, train=True, num_processes=accelerator.num_processes)
        # Each process runs its share of the batches: Accelerate drops the odd ones out with
        # drop_last, else pads the last share (even_batches). Counted as one process would.
        n, world = len(train_loader), accelerator.num_processes
        steps_per_epoch = (n // world if train_loader.drop_last else -(-n // world)) * world
    holdout_loader = _loader(splits.holdout, eval_bs, cfg, train=False)
    valid_loader = _loader(splits.valid, eval_bs, cfg, train=False)
    train_tf = build_train_transform(data_cfg, hflip=cfg.hflip, crop_size=cfg.crop_size, scale=cfg.crop_scale,
                                     translate=cfg.translate, brightness=cfg.brightness, contrast=cfg.contrast,
                                     erase=cfg.erase, downscale=cfg.downscale,
                                     downscale_range=cfg.downscale_range).to(accelerator.device)
    eval_tf = build_eval_transform(data_cfg).to(accelerator.device)
    accelerator.print(f"data: {splits.root} | fit {splits.counts['fit']}, holdout {splits.counts['holdout']}, "
                      f"valid {splits.counts['valid']} | {data_cfg.image_size}px {data_cfg.interpolation}"
                      + (f" | train split on {accelerator.device} ({train_loader.nbytes / 2**20:.0f} MB)"
                         if device_data else ""))

    # 3) optimizer, schedule, loss (the schedule counts single-process steps: Accelerate
    #    steps it once per process per optimizer step)
    optimizer = build_optimizer(cfg, model, capturable=graph_wanted)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    # With mixing, timm's Mixup builds the smoothed soft targets itself; with teachers,
    # rvf.distill.distill_targets does (torch would smooth a soft target a second time).
    soft_targets = mixup is not None or teachers is not None
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if soft_targets else cfg.label_smoothing)

    # 4) one line makes it all device- and process-aware
    model, optimizer, holdout_loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, holdout_loader, valid_loader, scheduler)
    if not device_data:  # last, as it always was: a saved state names its samplers by this order
        train_loader = accelerator.prepare(train_loader)
        assert len(train_loader) * accelerator.num_processes == steps_per_epoch, "Accelerate shards otherwise"
    net = accelerator.unwrap_model(model)  # the plain module: what is saved, averaged and evaluated
    ema = build_ema(cfg, net)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if cfg.compile:
        model = torch.compile(model)  # training only: a compiled module's state_dict keys carry a prefix
    problems = cuda_graph_problems(accelerator.device, optimizer, num_processes=accelerator.num_processes,
                                   mixed_precision=accelerator.mixed_precision, compile=cfg.compile,
                                   gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
                                   variable_batches=cfg.skip_bad and not cfg.cache, sam=cfg.sam_rho > 0)
    with all_or_none(accelerator):  # the built optimizer's own flags: the same in every process
        if cfg.cuda_graph:
            refuse_cuda_graph(problems)
    use_graph = cfg.cuda_graph is not False and not problems
    # `cuda_graph: null` (wherever it can) trains on eagerly if the capture fails; `true` stops there.
    graph_kwargs = {"strict": cfg.cuda_graph is True} if use_graph else {}
    train_step = build_train_step(model, criterion, optimizer, cuda_graph=use_graph, sam_rho=cfg.sam_rho,
                                  grad_clip=cfg.grad_clip, aux_weight=cfg.aux_weight, backward=accelerator.backward,
                                  clip=accelerator.clip_grad_norm_, **graph_kwargs)

    # 5) resume, or start a fresh run record
    run = {"epoch": -1, "step": 0, "best_epoch": -1, "best_score": None, "history": [], "train_seconds": 0.0}
    # Only now: a wrong model name, data folder or setting has failed above. The old run is set
    # aside, not deleted, until the new one has saved an epoch.
    with ReplacedRun(out, project, replace=replace, main=accelerator.is_main_process) as replaced:
        accelerator.wait_for_everyone()
        if resume:
            state = latest_state(out)  # there is one: prepare_output_dir checked
            accelerator.load_state(str(state))
            set_capturable(optimizer, graph_wanted)  # the saved run may have stepped with or without a graph
            # The optimizer comes back holding the saved run's last lr; take it from the schedule
            # instead, which is longer when `--epochs` was raised.
            schedule = getattr(scheduler, "scheduler", scheduler)  # inside Accelerate's wrapper
            schedule.last_epoch -= 1
            schedule.step()
            run = json.loads((state / STATE_MARKER).read_text())
            accelerator.print(f"resumed from {state} (epoch {run['epoch'] + 1} done)")
            if (done := run["epoch"] + 1) >= cfg.epochs:
                has = (f"the run has {done} of {done} epochs" if done == cfg.epochs else
                       f"the run already has {done} epochs (--epochs {cfg.epochs} asks for fewer)")
                accelerator.print(f"nothing to train: {has}; pass --epochs N > {done} to extend it. Evaluating its "
                                  "best model again")
                cfg = cfg.replace(epochs=run["epoch"] + 1)  # what it trained, not a lower --epochs
        if accelerator.is_main_process:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if log_with == "wandb" and (wandb_id := wandb_run_to_continue(out, run)):
            # A resumed run continues its W&B run (steps go on from the saved one) rather than
            # starting a second run of the same name that holds only the epochs from here on.
            init_kwargs["wandb"] |= {"id": wandb_id, "resume": "allow"}
        elif log_with == "wandb" and run.get("wandb_id"):
            accelerator.print(f"W&B: {out} is a copy of {run['wandb_folder']}: it logs to a new W&B run from epoch "
                              f"{run['epoch'] + 2} on, leaving that run's ({run['wandb_id']}) as it is")
        # The trackers start in the main process alone: one that fails there stops the others with
        # it, rather than leaving them to die in the first step's all-reduce.
        with all_or_none(accelerator):
            try:
                accelerator.init_trackers(project, config=tracking.tracker_config(cfg.to_dict(), log_with),
                                          init_kwargs=init_kwargs)
            except Exception as e:  # W&B's server unreachable with a key set: a timeout, then a traceback
                if (explained := tracking.start_error(e, log_with)) is None:
                    raise
                raise explained from e
        if log_with == "wandb" and accelerator.is_main_process:
            # Saved with each epoch's state, with the folder it belongs to (wandb_run_to_continue).
            run |= {"wandb_id": accelerator.get_tracker("wandb", unwrap=True).id, "wandb_folder": str(out.resolve())}
        for note in (tracker_note, threads_note):
            if note:
                accelerator.print(note)
        n_params = count_parameters(net)
        accelerator.print(f"model: {cfg.model} | {n_params / 1e6:.2f} M params | {accelerator.device} "
                          f"({device_name(accelerator.device)}) x {accelerator.num_processes}{threads_text} | "
                          f"precision {accelerator.mixed_precision}" + (" | CUDA graph" if use_graph else "")
                          + (f" | distilling {len(teachers.models)} teacher(s), weight {cfg.distill_weight}"
                             if teachers is not None else ""))

        # 6) epochs: train, select on the holdout slice, log, save
        eval_net = ema.module if ema is not None else net
        selecting = splits.counts["holdout"] > 0  # `holdout: 0` trains on all of train and keeps the last epoch
        for epoch in range(run["epoch"] + 1, cfg.epochs):
            train_loader.set_epoch(epoch)
            stats, run["step"] = train_one_epoch(model, train_loader, train_tf, train_step, scheduler, accelerator,
                                                 cfg, epoch, ema=ema, step=run["step"], mixup=mixup,
                                                 teachers=teachers)
            run["train_seconds"] += stats["seconds"]
            if accelerator.num_processes > 1:
                # Each process's last forward moved its own BatchNorm running statistics (DDP hands
                # out the main process's only at the next forward): score what the main process saves.
                distribute_bn(eval_net, accelerator.num_processes)
            if selecting:
                labels, probs, loss = evaluate(eval_net, holdout_loader, eval_tf, accelerator, desc="holdout",
                                               tta_hflip=cfg.tta_hflip)
            else:  # nothing to score: no empty progress bar every epoch
                labels, probs, loss = _no_predictions()
            # Checked once per epoch, where the loss reaches the host anyway: a NaN would otherwise
            # surface as an sklearn error about its input, or as a run that silently learns nothing.
            if not (np.isfinite(stats["loss"]) and np.isfinite(probs).all()):
                kept = f" {out} keeps the best model and the saved state of the epochs before." if epoch else ""
                fixes = ("lower lr or set grad_clip" if accelerator.mixed_precision == "no" else
                         "lower lr, set grad_clip, or train in fp32 (--mixed-precision no)")  # not in fp32 already
                raise DivergedError(f"epoch {epoch + 1}: training diverged (train loss {stats['loss']:.4g}); "
                                    f"{fixes}.{kept}")
            # Scored at the threshold this epoch's model would be saved with (accuracy: at 0.5).
            threshold = calibrate_threshold(labels, probs[:, 0]) if selecting else 0.5
            hold = (classification_metrics(labels, probs, threshold=threshold, loss=loss) if selecting
                    else {"accuracy": float("nan"), "loss": float("nan")})
            row = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                   "holdout_loss": hold["loss"], "holdout_accuracy": hold["accuracy"],
                   "holdout_roc_auc": hold.get("roc_auc", float("nan")),
                   "lr": stats["lr"], "images_per_second": stats["images_per_second"]}
            run["history"].append(row)
            # Without a holdout slice the tracker gets no holdout series at all, rather than NaNs.
            logged = {k: v for k, v in row.items() if k != "epoch" and (selecting or not k.startswith("holdout_"))}
            accelerator.log(logged | {"epoch": epoch + 1}, step=run["step"])
            # Select on holdout accuracy, ties to the lower loss; no holdout: the last epoch wins.
            score = [hold["accuracy"], -hold["loss"]] if selecting else [epoch, 0.0]
            improved = run["best_score"] is None or score > run["best_score"]
            if improved:
                run["best_score"], run["best_epoch"] = score, epoch + 1
                if accelerator.is_main_process:
                    save_pretrained(out, eval_net, {
                        "model_name": cfg.model, "model_args": model_args, "data_config": data_cfg.to_dict(),
                        "classes": list(CLASSES), "threshold": threshold, "tta_hflip": cfg.tta_hflip,
                        "epoch": epoch + 1, "train_files": splits.train_files,
                        "metrics": {"holdout": hold}, "config": cfg.to_dict(), "rvf_version": rvf.__version__})
            accelerator.print(
                f"epoch {epoch + 1:3d}/{cfg.epochs} | train loss {stats['loss']:.4f} acc {stats['accuracy']:.4f} | "
                + (f"holdout loss {hold['loss']:.4f} acc {hold['accuracy']:.4f}" if selecting else "no holdout slice")
                + f" | {stats['images_per_second']:.0f} img/s" + (" | best" if improved and selecting else ""))
            run["epoch"] = epoch
            save_run_state(accelerator, out, epoch, run)
            replaced.drop()

    # 7) the best model, on the valid split (never used for selection)
    from safetensors.torch import load_file

    accelerator.wait_for_everyone()
    eval_net.load_state_dict(load_file(str(out / "model.safetensors"), device="cpu"))
    labels, probs, loss = evaluate(eval_net, valid_loader, eval_tf, accelerator, desc="valid", tta_hflip=cfg.tta_hflip)
    meta = json.loads((out / "model.json").read_text())
    valid = classification_metrics(labels, probs, threshold=meta["threshold"], loss=loss)
    metrics = {
        "model": cfg.model, "valid": valid, "holdout": meta["metrics"]["holdout"], "best_epoch": run["best_epoch"],
        "epochs": cfg.epochs, "history": run["history"], "train_seconds": run["train_seconds"],
        "images_per_second": (float(np.mean([h["images_per_second"] for h in run["history"]]))
                              if run["history"] else None),
        "params": n_params, "image_size": data_cfg.image_size, "counts": splits.counts,
        "device": device_name(accelerator.device), "num_processes": accelerator.num_processes,
        "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
        "mixed_precision": accelerator.mixed_precision, "device_data": bool(device_data),
        # Whether the step really replayed a graph: `cuda_graph: null` falls back to eager steps
        # when the capture fails, and a benchmark must not credit the graph for those.
        "cuda_graph": use_graph and getattr(train_step, "failed", None) is None,
        "torch": torch.__version__,
    }
    if getattr(train_step, "failed", None) is not None:
        metrics["cuda_graph_error"] = f"{type(train_step.failed).__name__}: {train_step.failed}"
    if accelerator.is_main_process:
        # Where the training faces sit, so the app and the CLI can warn about faces framed otherwise.
        FramingReference.fit(dataset_images(splits.fit), seed=cfg.seed).save(out)
        arch, sizes = reports.architecture_table(eval_net, input_size)
        metrics.update(sizes)
        atomic_write_text(out / "architecture.txt", arch)
        note = reports.architecture_diagram(eval_net, input_size, out / "architecture.png")
        if note:
            metrics["architecture_diagram"] = note
            accelerator.print(note)
        title = f"{cfg.model} on {splits.root.name}/valid"
        reports.write_evaluation_reports(out, labels, probs, valid, title, calibrated=selecting)
        reports.plot_curves(out / "curves.png", run["history"], f"{cfg.model}: loss and accuracy")
        sample_idx = np.linspace(0, len(splits.fit) - 1, min(32, len(splits.fit))).astype(int).tolist()
        samples = [s for s in (splits.fit[i] for i in sample_idx) if s is not None]  # None: skip_bad, no cache
        reports.plot_samples(out / "samples.png", np.stack([s[0].numpy() for s in samples]),
                             [s[1] for s in samples], title=f"{splits.root.name}/train at {data_cfg.image_size}px")
        reports.write_json(out / "metrics.json", metrics)
        meta["metrics"]["valid"] = valid
        reports.write_json(out / "model.json", meta)
        if log_with == "wandb":
            k = np.linspace(0, len(splits.valid) - 1, min(cfg.num_sample_preds, len(splits.valid))).astype(int)
            valid_items = [splits.valid[i] for i in k.tolist()]
            try:
                tracking.log_final_wandb(
                    accelerator.get_tracker("wandb", unwrap=True), labels, probs, k.tolist(),
                    [v[0].numpy() for v in valid_items], [_sample_path(splits.valid, i) for i in k.tolist()],
                    metrics, [out / f for f in ("confusion_matrix.png", "roc.png", "curves.png", "samples.png")])
            except Exception as e:  # the run and its reports are saved: never fail it over a plot upload
                log.warning("W&B final logging failed (%s: %s); metrics.json and the reports are intact",
                            type(e).__name__, e)
        accelerator.print(
            f"valid ({valid['n']} images): accuracy {valid['accuracy']:.4f} | ROC AUC {valid['roc_auc']:.4f} | "
            f"AP {valid['average_precision']:.4f} | best epoch {run['best_epoch']} | reports in {out}")
    accelerator.end_training()
    return metrics


def _sample_path(dataset, i: int) -> str:
    if hasattr(dataset, "all_paths"):  # DecodedImages
        return dataset.all_paths[dataset.indices[i]]
    if hasattr(dataset, "indices"):  # torch Subset of RVF10K
        return dataset.dataset.samples[dataset.indices[i]][0]
    return dataset.samples[i][0]
