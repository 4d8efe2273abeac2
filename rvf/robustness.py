"""How a detector holds up when images are degraded the way they are on the web.

Each perturbation is applied to the decoded image at its native resolution (as a re-upload
or a re-share would do), *then* the image goes through the model's own resize and eval
transform, so the "clean" row equals `evaluate.py` on the same split.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rvf import CLASSES
from rvf.checkpoint import load_pretrained, meta_threshold
from rvf.data import RVF10K, BadImageError, DatasetError, build_eval_transform, open_rgb
from rvf.data.transforms import to_uint8
from rvf.framing import FILE_NAME as FRAMING_FILE
from rvf.framing import FramingReference
from rvf.metrics import classification_metrics, predicted_labels

__all__ = ["PERTURBATIONS", "Perturbation", "evaluate_robustness"]


class Perturbation:
    """A named, picklable, deterministic image degradation.

    Args:
        kind: "clean", "jpeg" (value = quality), "scale" (value = down-scale factor, then
            back up), "blur" (value = Gaussian radius in pixels), "noise" (value = std of
            additive Gaussian noise on the 0..255 scale, seeded per image), "shift" (value =
            whole pixels the picture moves down and right, its top rows and left columns
            repeated into the gap: the same face, framed a little differently), "crop" (value =
            the share of the side kept, a square at a random place, seeded per image: a face
            cropped by another tool) or "rotate" (value = degrees counter-clockwise about the
            centre, corners filled by the nearest edge: a tilted head left untilted).
        value: the kind's parameter.
    """

    KINDS = ("clean", "jpeg", "scale", "blur", "noise", "shift", "crop", "rotate")
    # A value for each kind that needs one, shown when it is left out.
    EXAMPLES = {"jpeg": "jpeg:75 (quality)", "scale": "scale:0.5 (factor)", "blur": "blur:1 (radius)",
                "noise": "noise:8 (std of 255)", "shift": "shift:2 (pixels down and right)",
                "crop": "crop:0.8 (share of the side kept)", "rotate": "rotate:10 (degrees)"}

    def __init__(self, kind: str, value: float = 0.0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown perturbation {kind!r} (one of {', '.join(self.KINDS)})")
        if not math.isfinite(value):
            raise ValueError(f"the value must be a finite number, got {value:g}")
        if kind == "shift" and (value != int(value) or value < 0):
            raise ValueError(f"a shift is a whole number of pixels, 0 or more, got {value:g}")
        if kind == "crop" and not 0 < value <= 1:
            raise ValueError(f"a crop keeps a share of the side in (0, 1], got {value:g}")
        if kind == "jpeg" and (value != int(value) or not 1 <= value <= 100):
            raise ValueError(f"a JPEG quality is a whole number in 1..100, got {value:g}")
        if kind == "scale" and not 0 < value <= 1:
            raise ValueError(f"a scale shrinks the picture by a factor in (0, 1], got {value:g}")
        if kind in ("blur", "noise") and value < 0:
            raise ValueError(f"a {kind} strength is 0 or more, got {value:g}")
        self.kind, self.value = kind, value

    @classmethod
    def parse(cls, text: str) -> "Perturbation":
        """`KIND[:VALUE]`, e.g. "clean", "jpeg:75", "shift:2"; every kind but clean needs its value."""
        kind, _, value = text.partition(":")
        # Without one, 0 would be taken: a shift, blur, noise or rotation of 0 is a second clean
        # row that looks like a measured result.
        if kind in cls.EXAMPLES and not value.strip():
            raise ValueError(f"perturbation {text!r} needs a value: give KIND:VALUE, e.g. {cls.EXAMPLES[kind]}")
        try:
            return cls(kind, float(value) if value else 0.0)
        except ValueError as e:
            raise ValueError(f"perturbation {text!r}: {e}") from None

    @property
    def name(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind} {self.value:g}"

    def __call__(self, img: Image.Image, seed: int = 0) -> Image.Image:
        if self.kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(self.value))
            return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        if self.kind == "scale":
            w, h = img.size
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            small = img.resize(size, Image.Resampling.BILINEAR)
            return small.resize((w, h), Image.Resampling.BILINEAR)
        if self.kind == "blur":
            return img.filter(ImageFilter.GaussianBlur(self.value))
        if self.kind == "noise":
            rng = np.random.default_rng(seed)
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0, self.value, (img.size[1], img.size[0], 3))
            return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
        if self.kind == "shift":
            k = int(self.value)
            arr = np.pad(np.asarray(img), ((k, 0), (k, 0), (0, 0)), mode="edge")  # (H + k, W + k, 3)
            return Image.fromarray(arr[:img.size[1], :img.size[0]])
        if self.kind == "crop":
            w, h = img.size
            side = max(1, round(min(w, h) * self.value))
            x, y = np.random.default_rng(seed).integers(0, [w - side + 1, h - side + 1])
            return img.crop((int(x), int(y), int(x) + side, int(y) + side))
        if self.kind == "rotate":
            # Pad by edge, rotate, cut back: corners take the border's colours, not black ones.
            w, h = img.size
            k = (w + h) // 2
            arr = np.pad(np.asarray(img), ((k, k), (k, k), (0, 0)), mode="edge")
            turned = Image.fromarray(arr).rotate(self.value, resample=Image.Resampling.BILINEAR)
            return turned.crop((k, k, k + w, k + h))
        return img


PERTURBATIONS = [
    Perturbation("clean"),
    Perturbation("jpeg", 95), Perturbation("jpeg", 75), Perturbation("jpeg", 50),
    Perturbation("scale", 0.5), Perturbation("scale", 0.25),
    Perturbation("blur", 1.0), Perturbation("noise", 8.0),
]


class _Perturbed(Dataset):
    """Each image decoded once and returned under every perturbation: uint8 (P, 3, S, S)."""

    def __init__(self, samples, perturbations, size: int, interpolation: str):
        self.samples, self.perturbations = samples, perturbations
        self.size, self.interpolation = size, interpolation

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = open_rgb(path)
        except BadImageError:
            # Say which image by its label, -1 - i: the main process names the file (an error
            # raised in a loader worker would reach the user as a dump of that worker's traceback).
            return torch.zeros(len(self.perturbations), 3, self.size, self.size, dtype=torch.uint8), -1 - i
        return torch.stack([to_uint8(p(img, seed=i), self.size, self.interpolation)
                            for p in self.perturbations]), label


def evaluate_robustness(checkpoint, data_dir, split: str = "valid", output_dir=None, limit: int | None = None,
                        batch_size: int = 128, num_workers: int | None = None, perturbations=None,
                        device: str = "cpu", progress: bool = True, skip_bad: bool = False) -> dict:
    """Evaluate a checkpoint on `split` under each perturbation; write a table, JSON and plot.

    Args:
        checkpoint: a training run's folder (model.safetensors + model.json).
        data_dir: dataset root (either layout).
        split: which split to degrade.
        output_dir: where robustness.{json,md,png} go; default CHECKPOINT/robustness-SPLIT.
        limit: use a stratified subset of this many images (quick looks).
        perturbations: list of `Perturbation`; default `PERTURBATIONS`.
        progress: show a progress bar over the images (a 256 px model takes minutes on a CPU).
        skip_bad: leave unreadable images out (counted in "skipped") instead of raising.

    Raises:
        BadImageError: naming the first unreadable image, unless `skip_bad`.

    Returns:
        {"rows": [{"perturbation", "accuracy", "roc_auc", "delta_accuracy", "recall", ...}], ...};
        "recall" maps each class to the share of its faces called right, which says which way a
        perturbation pushes the verdicts (accuracy alone cannot: 50 % is both "all real" and a
        coin toss). When the run has a framing check (`framing.safetensors`), each row also has
        "framing_off" (the share of faces it calls off) and "accuracy_framing_ok" (accuracy on
        the others).
    """
    import os

    from rvf import reports
    from rvf.data import stratified_sample
    from rvf.inference import resolve_device
    from rvf.utils import atomic_write_text, device_name, output_folder, predict_logits

    checkpoint = Path(checkpoint)
    output_dir = Path(output_dir) if output_dir else checkpoint / f"robustness-{split}"
    device = resolve_device(device)  # "auto": the GPU when there is one
    model, meta, data_cfg = load_pretrained(checkpoint, device=device)
    # Made now: a bad path must not cost the whole evaluation. Removed again if the evaluation
    # fails, so a failed run leaves no empty robustness-SPLIT folder behind to pass for a result.
    with output_folder(output_dir):
        transform = build_eval_transform(data_cfg).to(device)
        ds = RVF10K(data_dir, split)
        samples = ds.samples
        if limit and limit < len(samples):
            keep = stratified_sample(ds.targets, limit, seed=0)
            samples = [samples[i] for i in keep]
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        threshold = meta_threshold(meta)
        # The run's framing check, when it has one: which faces would the app have warned about?
        framing = FramingReference.load(checkpoint)
        perturbations = list(perturbations or PERTURBATIONS)
        n_p = len(perturbations)
        # One pass: each image is decoded once and degraded every way (decoding was a fifth of the
        # time when each condition read the split again). A batch holds batch_size // P faces, so
        # a forward pass still sees about batch_size images and memory stays what it was.
        loader = DataLoader(_Perturbed(samples, perturbations, data_cfg.image_size, data_cfg.interpolation),
                            batch_size=max(1, batch_size // n_p), num_workers=workers)
        probs, labels, off, skipped = [], [], [], set()
        with torch.no_grad(), tqdm(total=len(samples), desc=f"{n_p} conditions", unit="img",
                                   disable=not progress) as bar:
            for x, y in loader:  # x: (B, P, 3, S, S)
                bar.update(len(y))
                if (bad := y < 0).any():
                    first = samples[-1 - int(y[bad][0])][0]
                    if not skip_bad:
                        open_rgb(first)  # raises the BadImageError that names it
                        raise BadImageError(f"{first}: could not be read")  # it read this time: flaky storage
                    skipped.update((-1 - y[bad]).tolist())
                    x, y = x[~bad], y[~bad]
                    if not len(y):
                        continue
                x = x.flatten(0, 1)  # (B * P, 3, S, S): image 0 under each perturbation, then image 1...
                logits = predict_logits(model, transform(x.to(device)), hflip=meta.get("tta_hflip", False))
                probs.append(logits.float().softmax(1).cpu().view(len(y), n_p, -1))
                labels.append(y)
                if framing is not None:
                    off.append(torch.tensor([not f.ok for f in framing.check(x)]).view(len(y), n_p))
        if not labels:  # --skip-bad, and not one image could be read
            raise DatasetError(f"{data_dir}: no readable image in the {split} split")
        labels, probs = torch.cat(labels).numpy(), torch.cat(probs).numpy()  # (N,), (N, P, classes)
        off = torch.cat(off).numpy() if framing is not None else None
        rows = []
        for j, p in enumerate(perturbations):
            m = classification_metrics(labels, probs[:, j], threshold=threshold)
            row = {"perturbation": p.name, "accuracy": m["accuracy"], "roc_auc": m["roc_auc"],
                   "average_precision": m["average_precision"], "accuracy_at_threshold": m["accuracy_at_threshold"],
                   "recall": {c: m["per_class"][c]["recall"] for c in CLASSES}}
            if framing is not None:
                right, ok = predicted_labels(probs[:, j]) == labels, ~off[:, j]
                row["framing_off"] = float(off[:, j].mean())  # the share the app would have warned about
                row["accuracy_framing_ok"] = float(right[ok].mean()) if ok.any() else None
            rows.append(row)
        clean = next((r["accuracy"] for r in rows if r["perturbation"] == "clean"), None)  # wherever it was asked
        for r in rows:
            r["delta_accuracy"] = None if clean is None else r["accuracy"] - clean
        result = {"model": meta["model_name"], "checkpoint": str(checkpoint), "split": split,
                  "n": len(samples) - len(skipped), "skipped": len(skipped),
                  "image_size": data_cfg.image_size, "device": device_name(device), "rows": rows}

        output_dir.mkdir(parents=True, exist_ok=True)
        reports.write_json(output_dir / "robustness.json", result)
        lines = [f"# Robustness of `{meta['model_name']}` on {split} ({result['n']} images"
                 + (f"; {len(skipped)} unreadable, left out" if skipped else "") + ")", "",
                 f"| perturbation | accuracy % | change (points) | {' / '.join(CLASSES)} called right % "
                 f"| accuracy % at threshold {threshold:.4f} | ROC AUC | AP |"
                 + (" framing off % | accuracy % where framing ok |" if framing is not None else ""),
                 "|---|---|---|---|---|---|---|" + ("---|---|" if framing is not None else "")]
        for r in rows:
            delta = "" if r["delta_accuracy"] is None else f"{100 * r['delta_accuracy']:+.2f}"
            recall = " / ".join(f"{100 * r['recall'][c]:.1f}" for c in CLASSES)
            # The argmax's columns, then accuracy at the stored threshold: what the app and CLI decide at.
            line = (f"| {r['perturbation']} | {100 * r['accuracy']:.2f} | {delta} | {recall} "
                    f"| {100 * r['accuracy_at_threshold']:.2f} | {r['roc_auc']:.4f} | {r['average_precision']:.4f} |")
            if framing is not None:
                ok_acc = r["accuracy_framing_ok"]
                line += f" {100 * r['framing_off']:.1f} | {'' if ok_acc is None else f'{100 * ok_acc:.2f}'} |"
            lines.append(line)
        if framing is None:
            lines += ["", f"No framing check: {checkpoint} has no {FRAMING_FILE} (add one with scripts/framing.py)."]
        atomic_write_text(output_dir / "robustness.md", "\n".join(lines) + "\n")
        plt = reports._plt()
        fig, ax = plt.subplots(figsize=(7, 3.4))
        names = [r["perturbation"] for r in rows]
        ax.bar(names, [100 * r["accuracy"] for r in rows], color="tab:blue", label="accuracy")
        for c, marker in zip(CLASSES, "v^"):  # each class's recall: where the verdicts went
            ax.plot(names, [100 * r["recall"][c] for r in rows], marker, color="black", linestyle="none",
                    label=f"{c} called right")
        ax.legend(fontsize="small", loc="lower left")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)  # a class's recall can fall to 0
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", rotation=30)
        ax.set_title(f"{meta['model_name']}: accuracy under degradation ({split})")
        reports._save(fig, output_dir / "robustness.png")
        return result
