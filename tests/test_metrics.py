"""Detector metrics: the positive class, EER, the calibrated threshold, and what bad input gets."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from rvf.metrics import calibrate_threshold, classification_metrics, equal_error_rate, predicted_labels
from rvf.utils import json_text

FAKE, REAL = 0, 1


def _probs(p_fake):
    p_fake = np.asarray(p_fake, dtype=np.float64)
    return np.stack([p_fake, 1 - p_fake], 1)


def test_fake_is_the_positive_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p_fake = np.clip(0.5 + 0.3 * (labels == FAKE) - 0.15 + rng.normal(0, 0.2, 200), 0, 1)
    m = classification_metrics(labels, _probs(p_fake))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels == FAKE, p_fake)) and m["roc_auc"] > 0.7
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(labels == FAKE, p_fake))
    tn_fake, _, _, tp_real = np.asarray(m["confusion_matrix"]).ravel()  # rows: true fake, true real
    assert tn_fake == ((labels == FAKE) & (p_fake >= 0.5)).sum()
    assert tp_real == ((labels == REAL) & (p_fake < 0.5)).sum()
    support = m["per_class"]["fake"]["support"]
    assert support == (labels == FAKE).sum() and isinstance(support, int)


@pytest.mark.parametrize("is_fake, p_fake, eer", [
    # ROC (FPR, FNR): (0, 1) (0, .8) (0, .6) (1, .6) ...: the rates meet at 0.6 on the segment
    # from (0, .6) to (1, .6). sklearn's pruned curve has no (0, .6), and its nearest point said 0.8.
    ([1, 1, 1, 0, 1, 1], [.936, .88, .757, .791, .428, .33], 0.6),
    ([1, 1, 0, 0], [.9, .8, .2, .1], 0.0),  # separated
    ([1, 1, 0, 0], [.1, .2, .8, .9], 1.0),  # every call wrong
    ([1, 0, 1, 0], [.5, .5, .5, .5], 0.5),  # one tie: the diagonal's midpoint
    ([1, 1, 0, 0], [.9, .3, .6, .1], 0.5),  # FPR = FNR = 1/2 at a point of the curve
])
def test_equal_error_rate_where_the_rates_cross(is_fake, p_fake, eer):
    assert equal_error_rate(np.asarray(is_fake, bool), np.asarray(p_fake)) == pytest.approx(eer)


def test_equal_error_rate_is_where_fpr_equals_fnr_on_a_dense_curve():
    # Lowering the threshold past each score raises FPR and lowers FNR; where they cross, the
    # EER lies in both rates' intervals between the two thresholds around the crossing.
    rng = np.random.default_rng(1)
    is_fake = rng.random(400) < 0.5
    p = rng.normal(is_fake.astype(float), 1.0)
    eer = equal_error_rate(is_fake, p)
    before = (0.0, 1.0)  # above every score: nothing flagged
    for t in np.sort(p)[::-1]:
        fpr, fnr = (p[~is_fake] >= t).mean(), (p[is_fake] < t).mean()
        if fnr < fpr:
            assert max(before[0], fnr) <= eer <= min(fpr, before[1])
            break
        before = (fpr, fnr)
    assert 0.2 < eer < 0.45  # two unit-variance classes one sigma apart: about 0.31


def test_calibrated_threshold_reaches_the_best_accuracy_and_is_applied_with_ge():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    p_fake = np.clip(0.35 + 0.2 * (labels == FAKE) + rng.normal(0, 0.15, 300), 0, 1)
    t = calibrate_threshold(labels, p_fake)
    best = max(((p_fake >= c) == (labels == FAKE)).mean() for c in np.append(p_fake, 1.1))
    m = classification_metrics(labels, _probs(p_fake), threshold=t)
    assert m["accuracy_at_threshold"] == pytest.approx(best) and m["accuracy_at_threshold"] >= m["accuracy"]


def test_a_tie_is_called_fake_at_the_argmax_as_at_the_threshold():
    # float32 softmax of two equal logits plus rounding: P(fake) exactly 0.5, P(real) a hair above
    probs = np.array([[0.5, 0.50000006], [0.2, 0.8]])
    assert predicted_labels(probs).tolist() == [FAKE, REAL]
    m = classification_metrics(np.array([FAKE, REAL]), probs, threshold=0.5)
    assert m["accuracy"] == m["accuracy_at_threshold"] == 1.0


def test_one_class_scores_what_it_can_and_writes_strict_json():
    m = classification_metrics(np.array([REAL] * 4), _probs([0.1, 0.2, 0.7, 0.3]))
    assert m["accuracy"] == 0.75 and np.isnan(m["roc_auc"]) and np.isnan(m["eer"])
    text = json_text(m)
    assert json.loads(text)["roc_auc"] is None and "NaN" not in text


@pytest.mark.parametrize("labels, probs, message", [
    (np.array([], dtype=int), np.empty((0, 2)), "no predictions to score"),
    (np.array([0, 1, 1]), _probs([0.2, np.nan, 0.4]), "1 of 3 predictions are NaN or inf"),
])
def test_what_cannot_be_scored_says_why(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probs)


def test_json_text_is_strict():
    import torch

    text = json_text({"a": np.float32(0.5), "b": np.int64(3), "c": [float("inf"), (1, 2)],
                      "d": torch.tensor([1.5]), "e": np.array([[1, 2]]), "f": torch.tensor(float("nan"))})
    assert json.loads(text) == {"a": 0.5, "b": 3, "c": [None, [1, 2]], "d": [1.5], "e": [[1, 2]], "f": None}


def test_the_roc_plot_names_fake_as_its_positive_class(tmp_path, monkeypatch):
    from rvf import reports

    drawn = []

    def save(fig, path):
        ax = fig.axes[0]
        drawn.append((ax.get_xlabel(), ax.get_ylabel(), ax.get_lines()[0].get_label()))
        reports._plt().close(fig)

    monkeypatch.setattr(reports, "_save", save)
    reports.plot_roc(tmp_path / "roc.png", np.array([FAKE, FAKE, REAL, REAL]), np.array([0.9, 0.3, 0.6, 0.1]))
    # The curve is P(fake) against fake (AUC 0.75); the axes once said "Positive label: 1", which is real.
    assert drawn == [("False Positive Rate (Positive label: fake)", "True Positive Rate (Positive label: fake)",
                      "P(fake) (AUC = 0.75)")]
