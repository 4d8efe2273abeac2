"""Report files of a run: the seed's figures and tables, and a little more.

Every function takes plain arrays and a path, so `train` and `evaluate.py` write identical
files. Matplotlib runs headless (Agg) and every figure is closed after saving.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np

from rvf import CLASSES
from rvf.utils import atomic_path, atomic_write_text, count_parameters, json_text

__all__ = [
    "architecture_diagram", "architecture_table", "plot_confusion_matrix", "plot_curves",
    "plot_roc", "plot_samples", "write_evaluation_reports", "write_json",
]

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented, strict JSON (NaN becomes null: `rvf.utils.json_text`), atomically."""
    atomic_write_text(path, json_text(data))


def write_probabilities(path: str | Path, labels, p_fake, paths, more: dict | None = None) -> None:
    """Write one CSV row per image, in split order: label, P(fake), its file (so that each error
    can be looked at), then a column for each of `more` ({name: P(fake) per image}), atomically.

    9 significant digits: a float32 exactly, so ties stay ties for whoever re-thresholds them.
    """
    import csv

    more = more or {}
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "p_fake", "path", *more])
        for row, (y, p, file) in enumerate(zip(labels, p_fake, paths, strict=True)):
            writer.writerow([int(y), f"{p:.9g}", file, *(f"{column[row]:.9g}" for column in more.values())])


def plot_confusion_matrix(path: Path, cm, title: str = "") -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(CLASSES)).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title or "Confusion matrix")
    _save(fig, path)


def plot_roc(path: Path, labels, p_fake, title: str = "") -> None:
    from sklearn.metrics import RocCurveDisplay

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    names = np.asarray(CLASSES)[np.asarray(labels)]  # (N,) "fake" / "real"
    if len(np.unique(names)) == 2:
        # By name: sklearn titles the axes "(Positive label: 1)" for booleans, and label 1 is real here.
        RocCurveDisplay.from_predictions(names, p_fake, pos_label="fake", ax=ax, name="P(fake)")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set_title(title or "ROC (positive = fake)")
    _save(fig, path)


def plot_curves(path: Path, history: list[dict], title: str = "") -> None:
    """Loss and accuracy per epoch, train and holdout (train only for a run without a holdout slice)."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("holdout", "-s")):
            # A resumed run's history comes back from JSON, where a missing figure is null.
            ys = np.array([np.nan if h.get(f"{split}_{key}") is None else h[f"{split}_{key}"] for h in history],
                          dtype=float)
            if np.isfinite(ys).any():  # `holdout: 0` has no holdout figures: no empty legend entry
                ax.plot(epochs, ys, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5 on a short run
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Training curves")
    _save(fig, path)


def plot_samples(path: Path, images: np.ndarray, labels, n: int = 32, title: str = "") -> None:
    """A grid of uint8 images `(N, 3, H, W)` with their labels."""
    plt = _plt()
    n = min(n, len(images))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(np.asarray(images[i]).transpose(1, 2, 0))
        label = CLASSES[int(labels[i])]
        ax.set_title(label, fontsize=8, color="tab:red" if label == "fake" else "tab:green")
    fig.suptitle(title or "Training samples")
    _save(fig, path)


def architecture_table(model, input_size: tuple[int, int, int]) -> tuple[str, dict]:
    """A torchinfo layer table (shapes, parameters, MACs) at the run's input size.

    Without torchinfo (a GPU image with only torch, timm and accelerate, say) the text is the
    module's repr and MACs are None: a report must never fail a finished run.

    Returns:
        (text, {"params": int, "macs": int | None}).
    """
    try:
        from torchinfo import summary
    except ImportError:
        return (f"(torchinfo is not installed: pip install torchinfo for shapes and MACs)\n{model}",
                {"params": count_parameters(model), "macs": None})

    was_training = model.training
    device = next(model.parameters()).device
    stats = summary(model, input_size=(1, *input_size), device=device, depth=3, verbose=0,
                    col_names=("output_size", "num_params", "mult_adds"), row_settings=("var_names",))
    model.train(was_training)
    return str(stats), {"params": int(stats.total_params), "macs": int(stats.total_mult_adds)}


def architecture_diagram(model, input_size: tuple[int, int, int], path: Path) -> str | None:
    """Render an architecture diagram PNG with torchview + graphviz.

    Returns:
        None on success, else a note saying why it was skipped (graphviz missing, ...).
    """
    if shutil.which("dot") is None:
        return "graphviz's `dot` is not installed (apt-get install graphviz); diagram skipped"
    try:
        from torchview import draw_graph
    except ImportError:
        return "torchview is not installed (pip install torchview graphviz); diagram skipped"
    try:
        graph = draw_graph(model, input_size=(1, *input_size), depth=2, expand_nested=False,
                           device=str(next(model.parameters()).device))
        graph.visual_graph.format = "png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(graph.visual_graph.pipe(format="png"))
    except Exception as e:  # a diagram is a nicety: never fail a finished run over it
        return f"architecture diagram failed: {type(e).__name__}: {e}"
    return None


def write_evaluation_reports(out_dir: Path, labels, probs, metrics: dict, title: str = "",
                             calibrated: bool = True) -> None:
    """Write classification_report.txt, confusion_matrix.png and roc.png for one split.

    `calibrated=False` (a model trained without a holdout slice keeps 0.5) says so beside the
    threshold, rather than calling 0.5 calibrated.
    """
    from sklearn.metrics import classification_report

    from rvf.metrics import predicted_labels

    out_dir = Path(out_dir)
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    report = classification_report(labels, predicted_labels(probs), labels=[0, 1], target_names=list(CLASSES),
                                   digits=4, zero_division=0)
    extra = (f"\nROC AUC (fake positive): {metrics['roc_auc']:.4f}\n"
             f"Average precision:       {metrics['average_precision']:.4f}\n"
             f"EER:                     {metrics['eer']:.4f}\n"
             + (f"Accuracy at calibrated threshold {metrics['threshold']:.4f}: " if calibrated else
                f"Accuracy at threshold {metrics['threshold']:.4f} (not calibrated: no holdout slice): ")
             + f"{metrics['accuracy_at_threshold']:.4f}\n")
    atomic_write_text(out_dir / "classification_report.txt", (f"{title}\n\n" if title else "") + report + extra)
    plot_confusion_matrix(out_dir / "confusion_matrix.png", metrics["confusion_matrix"], title)
    plot_roc(out_dir / "roc.png", labels, probs[:, CLASSES.index("fake")], title)
