"""Evaluate a saved model (a training run's folder) on a split and write its reports."""

from __future__ import annotations

from pathlib import Path

from rvf.checkpoint import META_NAME, CheckpointError, load_pretrained, meta_threshold
from rvf.data import RVF10K, DatasetError, build_cache, build_eval_transform
from rvf.metrics import classification_metrics
from rvf.utils import output_folder

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, split: str = "valid",
                        output_dir: str | Path | None = None, batch_size: int = 128,
                        cache_dir: str | None = None, skip_bad: bool = False,
                        tta_hflip: bool | None = None, cpu_threads: int | None = None) -> dict:
    """Run a checkpoint over `split` on every process Accelerate gives us.

    `tta_hflip` (image and mirror, logits averaged) defaults to what the model was trained
    and calibrated with (`model.json`). `cpu_threads`: torch threads per process on a CPU
    (default: as training's `cpu_threads` key chooses them).

    The images go through the same decode cache and eval transform as training, so the
    numbers match the run's own `metrics.json` for the same split.

    Returns:
        The metrics dict (also written to `output_dir/metrics.json` on the main process).
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from rvf import reports
    from rvf.data import collate_batch
    from rvf.train import all_or_none, check_launch, evaluate, run_exists, use_cpu_threads
    from rvf.utils import device_name

    accelerator = Accelerator()
    check_launch(accelerator, "scripts/evaluate.py")
    _, note = use_cpu_threads(accelerator, cpu_threads)  # under `accelerate launch`, more than its one thread
    if note:
        accelerator.print(note)
    checkpoint = Path(checkpoint)
    output_dir = Path(output_dir) if output_dir else checkpoint / f"eval-{split}"
    # Every process meets a bad checkpoint or data folder alike: all_or_none has one of them say so.
    with all_or_none(accelerator):
        if run_exists(output_dir) or (output_dir / META_NAME).exists():
            # Its metrics.json and reports would be replaced by this split's scores.
            raise CheckpointError(f"output dir {output_dir} holds a training run: the evaluation's reports would "
                                  f"replace its own; give the evaluation a folder of its own (default "
                                  f"{checkpoint / f'eval-{split}'})")
        model, meta, data_cfg = load_pretrained(checkpoint)
        dataset = RVF10K(data_dir, split, skip_bad=skip_bad)
    # Made now: a bad path must not cost the whole evaluation. Removed again if the evaluation
    # fails, so a failed run leaves no empty eval-SPLIT folder behind to pass for a result.
    with output_folder(output_dir, create=accelerator.is_main_process):
        # The main process decodes first; an image it cannot read stops the others with one message
        # (rather than leaving them at the barrier, to die on the process group's traceback).
        with all_or_none(accelerator, main_first=True):
            images = build_cache(dataset.samples, data_cfg.image_size, interpolation=data_cfg.interpolation,
                                 cache_dir=cache_dir, name=split, skip_bad=skip_bad,
                                 progress=accelerator.is_local_main_process)
        if len(images) == 0:  # every file unreadable, and skipped
            raise DatasetError(f"{dataset.root}/{split}: no readable images left to score")
        loader = DataLoader(images, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
        model, loader = accelerator.prepare(model, loader)
        transform = build_eval_transform(data_cfg).to(accelerator.device)
        if tta_hflip is None:
            tta_hflip = bool(meta.get("tta_hflip", False))
        labels, probs, loss = evaluate(model, loader, transform, accelerator, desc=split, tta_hflip=tta_hflip)
        try:
            scored = classification_metrics(labels, probs, threshold=meta_threshold(meta), loss=loss)
        except ValueError as e:  # NaN or inf out of finite weights: the forward pass overflowed
            raise CheckpointError(f"{checkpoint}: {e}") from e
        metrics = {
            "model": meta["model_name"], "checkpoint": str(checkpoint), "split": split, split: scored,
            "image_size": data_cfg.image_size, "tta_hflip": tta_hflip, "device": device_name(accelerator.device),
            "num_processes": accelerator.num_processes,
        }
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            # A run trained on all of train (`holdout: 0`) stored 0.5 without calibrating it.
            calibrated = meta.get("threshold") is not None and meta.get("config", {}).get("holdout") != 0
            reports.write_evaluation_reports(output_dir, labels, probs, metrics[split],
                                             f"{meta['model_name']} on {Path(data_dir).name}/{split}",
                                             calibrated=calibrated)
            reports.write_json(output_dir / "metrics.json", metrics)
            # Rows in split order: gather_for_metrics keeps it.
            reports.write_probabilities(output_dir / "probabilities.csv", labels, probs[:, 0],
                                        [path for path, _ in images.samples])
            m = metrics[split]
            accelerator.print(f"{split} ({m['n']} images): accuracy {m['accuracy']:.4f} | ROC AUC {m['roc_auc']:.4f} | "
                              f"AP {m['average_precision']:.4f} | reports in {output_dir}")
    accelerator.end_training()
    return metrics
