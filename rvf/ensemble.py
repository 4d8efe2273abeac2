"""Average several trained detectors and score them together, calibrated like one model.

Each member scores the holdout slice and the valid split through its own input pipeline
(image size, filter, test-time flips as it was trained); the ensemble's P(fake) is the mean of
the members' probabilities. Its threshold is calibrated on the holdout slice, as a single run's
is, so every member must have held out the same slice (same `split_seed`, which defaults to
`seed`, and `holdout`): otherwise
one member's holdout images could be another's training images and the calibration would leak.
Members trained on all of train (`holdout: 0`) can only be averaged with each other; with no
slice to calibrate on, the ensemble keeps the threshold such a run keeps, 0.5, and has no
holdout figures.

It also scores every smaller ensemble of the same members (`sub_ensembles`), which tells
whether more members of the same kind would still pay.

With an output folder it also writes `ensemble.json`, the manifest that lets the web app and
`scripts/predict.py` serve the ensemble like one checkpoint (`rvf.inference.load_predictor`):
the members' run folders (relative to the manifest, so a tree of runs can move), the sha256
of each member's `model.safetensors` as it was scored, the calibrated threshold and the
valid-split figures. Loading refuses a member whose weights have changed since
(`check_member_weights`): the threshold and figures describe the weights that were scored.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from rvf.checkpoint import ENSEMBLE_MANIFEST
from rvf.metrics import FAKE, calibrate_threshold, classification_metrics, predicted_labels

__all__ = ["MANIFEST", "EnsembleError", "check_member_weights", "evaluate_ensemble", "member_names", "read_manifest",
           "sub_ensembles", "write_manifest"]

MANIFEST = ENSEMBLE_MANIFEST
MANIFEST_KIND = "rvf-ensemble"

log = logging.getLogger(__name__)


class EnsembleError(ValueError):
    """Members that cannot be averaged together; the message names the checkpoint at fault."""


def _member_config(checkpoint: Path, meta: dict, data_dir, cache_dir):
    from rvf.config import TrainConfig

    if "config" not in meta:
        raise EnsembleError(f"{checkpoint}/model.json has no training config: cannot tell which images it held out")
    cfg = TrainConfig().replace(source=f"{checkpoint}/model.json", **meta["config"])
    # `subset` stays: the holdout slice is drawn from the images the run used.
    return cfg.replace(data_dir=str(data_dir), cache_dir=None if cache_dir is None else str(cache_dir))


def _slice(cfg) -> tuple:
    # The split seed draws the holdout slice and `subset`'s images; with neither it draws
    # nothing, and any two such runs trained on (and are scored on) the same images.
    drawn = cfg.holdout or cfg.subset is not None
    return (cfg.resolved_split_seed if drawn else None), cfg.holdout, cfg.subset


def _describe_slice(cfg) -> str:
    seed, holdout, subset = _slice(cfg)
    held = f"split seed {seed}, holdout {holdout}" if holdout else "no holdout slice"
    return f"{held}, subset {subset}"


def _check_members(checkpoints: list[Path], data_dir, output_dir, cache_dir) -> list:
    """Check every member before any is scored (a typo in the last of eight costs nothing); return their configs."""
    from rvf.checkpoint import META_NAME, read_meta
    from rvf.data import RVF10K, check_same_train
    from rvf.train import run_exists

    if len(checkpoints) < 2:
        raise EnsembleError(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}")
    if len({c.resolve() for c in checkpoints}) < len(checkpoints):
        raise EnsembleError(f"the same run is listed twice in {[str(c) for c in checkpoints]}")
    if output_dir is not None and (run_exists(Path(output_dir)) or (Path(output_dir) / META_NAME).exists()):
        # Its metrics.json and reports would be replaced by the ensemble's, and its ensemble.json
        # would make predict.py and the app serve the ensemble in the run's place.
        raise EnsembleError(f"output dir {output_dir} holds a training run: the ensemble's reports would replace "
                            f"its own; give the ensemble a folder of its own")
    configs = [_member_config(c, read_meta(c), data_dir, cache_dir) for c in checkpoints]
    first = (checkpoints[0], configs[0])
    for checkpoint, cfg in zip(checkpoints[1:], configs[1:]):
        if _slice(cfg) != _slice(first[1]):
            raise EnsembleError(
                f"{checkpoint} held out another slice of train ({_describe_slice(cfg)}) than {first[0]} "
                f"({_describe_slice(first[1])}): the members must share it (train seeds of an ensemble with the same "
                f"split_seed)")
    # ... drawn from the same list of train images: same settings on other data draw other images
    # (with no holdout slice there is nothing the members could have trained on and be scored on).
    train_files = RVF10K(data_dir, "train").file_list_id()
    for checkpoint in checkpoints if first[1].holdout else ():
        meta = read_meta(checkpoint)
        check_same_train(str(checkpoint), meta.get("train_files"), train_files, data_dir,
                         meta.get("config", {}).get("data_dir"))
    return configs


def evaluate_ensemble(checkpoints: list[str | Path], data_dir: str | Path, output_dir: str | Path | None = None,
                      batch_size: int = 128, cache_dir: str | os.PathLike | None = None,
                      cpu_threads: int | None = None) -> dict:
    """Score `checkpoints` (run folders) one by one on holdout and valid, then their mean.

    `cpu_threads`: torch threads per process on a CPU (default: as training's `cpu_threads` key
    chooses them).

    Returns:
        {"members": [{checkpoint, model, holdout, valid}...], "holdout": ..., "valid": ...,
        "threshold": ...} ("holdout" None where the members held nothing out), also written to
        `output_dir/metrics.json` with the valid split's reports and probabilities.csv (columns
        label, p_fake, path as evaluate.py writes them, then `p_fake:RUN` per member, RUN its folder's
        name, with parent folders where two members share one).
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from rvf import reports
    from rvf.checkpoint import CheckpointError, load_pretrained, meta_threshold, weights_sha256
    from rvf.data import build_eval_transform, collate_batch
    from rvf.train import all_or_none, check_launch, evaluate, load_splits, use_cpu_threads
    from rvf.utils import device_name

    checkpoints = [Path(c) for c in checkpoints]
    accelerator = Accelerator()
    check_launch(accelerator, "scripts/ensemble.py")
    _, note = use_cpu_threads(accelerator, cpu_threads)  # under `accelerate launch`, more than its one thread
    if note:
        accelerator.print(note)
    # Every process meets a bad member or data folder alike: all_or_none has one of them say so.
    with all_or_none(accelerator):
        configs = _check_members(checkpoints, data_dir, output_dir, cache_dir)
    first = (checkpoints[0], configs[0])
    if output_dir is not None and accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # now, not after scoring every member
    members, holdout_p, valid_p, labels, digests = [], [], [], {}, []
    valid_paths = None
    for checkpoint, cfg in zip(checkpoints, configs):
        if accelerator.num_processes > 1 and cfg.skip_bad and not cfg.cache:
            # Decoded per file, each process drops its own unreadable files and the batches it
            # gathers stop lining up (training refuses the pair); decoded up front they go once,
            # and the holdout slice is the same images either way (load_splits).
            cfg = cfg.replace(cache=True)
        # The main process reads the weights and decodes first; a file it cannot read stops the
        # others with one message.
        with all_or_none(accelerator, main_first=True):
            digests.append(weights_sha256(checkpoint))  # the file about to be scored, for the manifest
            model, meta, data_cfg = load_pretrained(checkpoint)
            splits = load_splits(cfg, data_cfg, progress=accelerator.is_local_main_process)
        transform = build_eval_transform(data_cfg).to(accelerator.device)
        model = accelerator.prepare(model)
        tta = bool(meta.get("tta_hflip", False))
        scored = {"checkpoint": str(checkpoint), "model": meta["model_name"], "image_size": data_cfg.image_size,
                  "tta_hflip": tta, "holdout": None}
        for split, dataset, store in (("holdout", splits.holdout, holdout_p), ("valid", splits.valid, valid_p)):
            if not len(dataset):  # holdout: 0, checked above to hold for every member
                continue
            loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                    collate_fn=collate_batch))
            y, probs, loss = evaluate(model, loader, transform, accelerator, desc=f"{checkpoint.name} {split}",
                                      tta_hflip=tta)
            if split in labels and not np.array_equal(labels[split], y):
                raise EnsembleError(f"{checkpoint} sees another {split} split than {first[0]} (different data?)")
            labels[split] = y
            store.append(probs)
            # Rows follow the split's file list (gather_for_metrics keeps the order), less the
            # unreadable files skip_bad dropped: only a member that decoded the split up front
            # knows which those were.
            if split == "valid" and valid_paths is None and len(dataset.samples) == len(y):
                valid_paths = [path for path, _ in dataset.samples]
            try:
                scored[split] = classification_metrics(y, probs, threshold=meta_threshold(meta), loss=loss)
            except ValueError as e:  # NaN or inf out of finite weights
                raise CheckpointError(f"{checkpoint}: {e}") from e
        members.append(scored)
        del model
        accelerator.free_memory()

    # The ensemble: mean probabilities, threshold calibrated on the holdout slice (if any:
    # else 0.5, the threshold each member trained on all of train stored).
    valid = np.mean(valid_p, axis=0)  # (N_valid, 2)
    holdout = None
    threshold = 0.5
    if holdout_p:
        hold = np.mean(holdout_p, axis=0)  # (N_holdout, 2)
        threshold = calibrate_threshold(labels["holdout"], hold[:, 0])
        holdout = classification_metrics(labels["holdout"], hold, threshold=threshold)
    metrics = {
        "members": members, "threshold": threshold, "holdout": holdout,
        "valid": classification_metrics(labels["valid"], valid, threshold=threshold),
        "sub_ensembles": sub_ensembles(labels["valid"], valid_p),
        "device": device_name(accelerator.device),
    }
    if output_dir is not None and accelerator.is_main_process:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = " + ".join(m["model"] for m in members)
        reports.write_evaluation_reports(out, labels["valid"], valid, metrics["valid"], f"ensemble: {names}",
                                         calibrated=holdout is not None)
        reports.write_json(out / "metrics.json", metrics)
        write_manifest(out, checkpoints, threshold, metrics["valid"], digests)
        if valid_paths is None:
            log.warning("probabilities.csv: no path for its rows: every member decoded the valid split per file and "
                        "skipped unreadable images, so which rows are which file is not known")
            valid_paths = [""] * len(labels["valid"])
        # As evaluate.py's (label, p_fake, path), so the same tools read both, then each member's.
        reports.write_probabilities(out / "probabilities.csv", labels["valid"], valid[:, 0], valid_paths,
                                    {f"p_fake:{name}": p[:, 0] for name, p in zip(member_names(checkpoints), valid_p)})
    accelerator.end_training()
    return metrics


def member_names(checkpoints: list[str | Path]) -> list[str]:
    """Name each member by its run folder, with as many parent folders as tell apart two of the same name."""
    parts = [Path(c).resolve().parts for c in checkpoints]  # distinct: evaluate_ensemble refuses a run twice
    names = []
    for p in parts:
        k = 1
        while any(q != p and q[-k:] == p[-k:] for q in parts):
            k += 1
        names.append(Path(*p[-k:]).as_posix())
    return names


def sub_ensembles(labels, member_probs: list[np.ndarray], max_subsets: int = 200, seed: int = 0) -> dict:
    """Accuracy and ROC AUC of the k-member ensembles drawn from the members, k = 1..M.

    Answers "would more members like these still pay?". Each size is scored as the mean, lowest
    and highest over all its subsets (a seeded sample of `max_subsets` where there are more),
    at 0.5 (the argmax), like `accuracy` in `classification_metrics`. With three members or more, `limit`
    fits score(k) = a - b / k by least squares and reports a: averaging k members of like skill
    shrinks the part of their error that differs between them about as 1/k (the variance term of
    Krogh and Vedelsby's 1995 decomposition), so a is a rough guide to what many more members of
    the same kind would reach, not a bound.

    Args:
        labels: (N,) true labels, 0 = fake, 1 = real.
        member_probs: M arrays (N, 2) of softmax probabilities, column 0 = P(fake).

    Returns:
        {"sizes": [{"members", "subsets", "accuracy", "accuracy_min", "accuracy_max", "roc_auc"}...],
        "limit": {"accuracy", "roc_auc"} or None}
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    probs = np.stack(member_probs)  # (M, N, 2), averaged below exactly as the whole ensemble is
    is_fake = labels == FAKE
    two_classes = len(np.unique(labels)) == 2
    rng = np.random.default_rng(seed)
    m = len(probs)
    sizes = []
    for k in range(1, m + 1):
        if math.comb(m, k) <= max_subsets:
            subsets = list(itertools.combinations(range(m), k))
        else:  # draws may repeat; a repeat only weighs one subset twice in the mean
            subsets = [tuple(rng.choice(m, size=k, replace=False)) for _ in range(max_subsets)]
        acc, auc = [], []
        for subset in subsets:
            mean = np.mean(probs[list(subset)], axis=0)  # (N, 2)
            acc.append(float((predicted_labels(mean) == labels).mean()))
            auc.append(float(roc_auc_score(is_fake, mean[:, FAKE])) if two_classes else float("nan"))
        sizes.append({"members": k, "subsets": len(subsets), "accuracy": float(np.mean(acc)),
                      "accuracy_min": min(acc), "accuracy_max": max(acc), "roc_auc": float(np.mean(auc))})
    limit = None
    if m >= 3:
        inv_k = 1.0 / np.arange(1, m + 1)
        limit = {}
        for key in ("accuracy", "roc_auc"):
            scores = np.array([s[key] for s in sizes])
            # polyfit gives (-b, a); a split of one class has no ROC AUC to fit
            limit[key] = float(np.polyfit(inv_k, scores, 1)[1]) if np.isfinite(scores).all() else float("nan")
    return {"sizes": sizes, "limit": limit}


def write_manifest(directory: str | Path, checkpoints: list[str | Path], threshold: float, valid: dict,
                   digests: list[str] | None = None) -> Path:
    """Write `directory/ensemble.json`: member run folders, their weights' sha256, threshold and valid figures.

    `digests`: each member's `weights_sha256` when it was scored (default: hashed now).
    """
    from rvf.checkpoint import weights_sha256

    directory = Path(directory)
    if digests is None:
        digests = [weights_sha256(c) for c in checkpoints]
    members = []
    for c in map(Path, checkpoints):
        try:  # relative, so the runs and the ensemble can move together
            members.append(Path(os.path.relpath(c.resolve(), directory.resolve())).as_posix())
        except ValueError:  # another drive (Windows): nothing to be relative to
            members.append(str(c.resolve()))
    manifest = {"kind": MANIFEST_KIND, "members": members, "weights_sha256": dict(zip(members, digests, strict=True)),
                "threshold": float(threshold),
                "valid": {k: valid.get(k)
                          for k in ("accuracy", "accuracy_at_threshold", "roc_auc", "average_precision")}}
    from rvf.reports import write_json

    path = directory / MANIFEST
    write_json(path, manifest)  # atomic; a NaN AUC (one class only) becomes null
    return path


def read_manifest(directory: str | Path) -> dict:
    """Read and check `directory/ensemble.json`; member paths come back resolved.

    "weights_sha256" comes back as one digest per member, or None for a manifest written before
    ensembles recorded them (loaded as before, unchecked, as `model.json` without `weights_id` is).

    Raises:
        CheckpointError: naming the manifest and the key at fault.
    """
    from rvf.checkpoint import CheckpointError, check_threshold

    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ensemble manifest ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise CheckpointError(f"{path}: not an rvf ensemble manifest (expected \"kind\": \"{MANIFEST_KIND}\")")
    members = manifest.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise CheckpointError(f"{path}: \"members\" must list at least two run folders, got {members!r}")
    threshold = check_threshold(manifest.get("threshold"), path)
    valid = manifest.get("valid") or {}
    if not isinstance(valid, dict):
        raise CheckpointError(f"{path}: \"valid\" must be an object, got {valid!r}")
    digests = manifest.get("weights_sha256")
    if digests is not None:
        if (not isinstance(digests, dict) or set(digests) != set(members)
                or not all(isinstance(d, str) and re.fullmatch("[0-9a-f]{64}", d) for d in digests.values())):
            raise CheckpointError(f"{path}: \"weights_sha256\" must give one sha256 (64 hex digits) per member, "
                                  f"keyed as in \"members\"")
        digests = [digests[m] for m in members]
    return {"members": [(path.parent / m).resolve() for m in members], "weights_sha256": digests,
            "threshold": float(threshold), "valid": valid}


def check_member_weights(directory: str | Path, manifest: dict) -> None:
    """Refuse a member whose `model.safetensors` is not the file the ensemble scored.

    A member retrained or resumed since (its best epoch replaced) would otherwise be served at the
    ensemble's old threshold, beside the old figures.

    Args:
        directory: the ensemble folder, named in the message.
        manifest: as `read_manifest` returns it; without "weights_sha256" nothing is checked.

    Raises:
        CheckpointError: naming the manifest and the member, saying how to rebuild.
    """
    from rvf.checkpoint import WEIGHTS_NAME, CheckpointError, weights_sha256

    if manifest["weights_sha256"] is None:
        return
    path = Path(directory) / MANIFEST
    for member, scored in zip(manifest["members"], manifest["weights_sha256"], strict=True):
        try:
            now = weights_sha256(member)
        except OSError as e:
            raise CheckpointError(f"{path} lists member {member}: cannot read its {WEIGHTS_NAME} "
                                  f"({e.strerror or e})") from e
        if now != scored:
            raise CheckpointError(
                f"{path} lists member {member}, whose {WEIGHTS_NAME} has changed since the ensemble was built "
                f"(sha256 {now[:12]}..., scored {scored[:12]}...): the ensemble's threshold and figures are for the "
                f"old weights; re-run scripts/ensemble.py with the same --checkpoints")
