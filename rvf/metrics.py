"""Detector metrics from predicted probabilities, with scikit-learn doing the arithmetic.

The detector's positive class is *fake* (label 0): ROC AUC, average precision and EER score
P(fake). Accuracy is reported both at threshold 0.5 (the argmax) and at the threshold
calibrated on the holdout slice of train, which is the one the app and CLI use.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from rvf import CLASSES

__all__ = ["calibrate_threshold", "classification_metrics", "equal_error_rate", "predicted_labels"]

FAKE = CLASSES.index("fake")


def equal_error_rate(is_fake: np.ndarray, p_fake: np.ndarray) -> float:
    """Return the rate where the false-positive and false-negative rates are equal.

    Read where the ROC curve crosses FPR = FNR, interpolating linearly between the two
    thresholds around the crossing, on the full curve: sklearn's default drops the points
    between collinear ones, and the nearest remaining point can be far off on a small split.
    """
    if len(np.unique(is_fake)) < 2:
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(is_fake, p_fake, drop_intermediate=False)
    gap = (1 - tpr) - fpr  # FNR - FPR: 1 at the first point (nothing flagged), -1 at the last
    i = int(np.argmax(gap <= 0))  # the first point at or past the crossing
    if gap[i] == 0:
        return float(fpr[i])
    t = gap[i - 1] / (gap[i - 1] - gap[i])  # where the segment from i-1 to i crosses 0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def predicted_labels(probs, threshold: float = 0.5) -> np.ndarray:
    """(N,) labels from (N, 2) probabilities: fake iff P(fake) >= threshold, the CLI's and the app's rule.

    At 0.5 this is the argmax but for ties, which it calls fake, as the threshold does; an
    argmax would call a tie, or a rounding such as [0.5, 0.50000006], the other way, and the
    accuracy at the argmax would disagree with the accuracy at a stored threshold of 0.5.
    """
    return np.where(np.asarray(probs)[:, FAKE] >= threshold, FAKE, 1 - FAKE)


def calibrate_threshold(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """Return the P(fake) threshold that maximises accuracy on (holdout) data.

    Candidates are midpoints between sorted scores, so the threshold generalises no worse
    than the data allows; ties resolve to the one closest to 0.5.
    """
    labels, p_fake = np.asarray(labels), np.asarray(p_fake, dtype=np.float64)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 0.5
    is_fake = labels == FAKE
    s = np.unique(p_fake)
    candidates = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0 + 1e-9], [0.5]])
    acc = np.array([((p_fake >= t) == is_fake).mean() for t in candidates])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def classification_metrics(labels, probs, threshold: float = 0.5, loss: float | None = None) -> dict:
    """Summarise a split's predictions.

    Args:
        labels: (N,) true labels, 0 = fake, 1 = real.
        probs: (N, 2) softmax probabilities, column 0 = P(fake).
        threshold: calibrated P(fake) threshold (label fake iff p_fake >= threshold).
        loss: mean cross-entropy, if known.

    Returns:
        JSON-ready dict: accuracy, per-class precision/recall/F1, ROC AUC, AP, EER,
        accuracy at the calibrated threshold, confusion matrix, counts.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("no predictions to score: the split is empty")
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(1).sum())
        raise ValueError(f"{bad} of {len(probs)} predictions are NaN or inf: the model's output overflowed, "
                         "or its weights are damaged")
    p_fake = probs[:, FAKE]
    is_fake = labels == FAKE
    preds = predicted_labels(probs)
    two_classes = len(np.unique(labels)) == 2
    report = skm.classification_report(labels, preds, labels=[0, 1], target_names=list(CLASSES),
                                       output_dict=True, zero_division=0)
    out = {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)) if two_classes else float("nan"),
        "roc_auc": float(skm.roc_auc_score(is_fake, p_fake)) if two_classes else float("nan"),
        "average_precision": float(skm.average_precision_score(is_fake, p_fake)) if two_classes else float("nan"),
        "eer": equal_error_rate(is_fake, p_fake),
        "threshold": float(threshold),
        "accuracy_at_threshold": float(((p_fake >= threshold) == is_fake).mean()),
        "per_class": {c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score")}
                      | {"support": int(report[c]["support"])} for c in CLASSES},
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out
