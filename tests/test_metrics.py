"""util/metrics.py against values computed by hand on small fixed examples."""
import math

import numpy as np
import pytest
import torch

from util.metrics import BEN_METRICS, average_precision, binary_metrics, multilabel_metrics

# 4 samples, 3 classes; class 2 never occurs in y_true.
LOGITS = np.array([[2.0, -1.0, -3.0],
                   [-1.0, 1.0, 0.5],
                   [0.5, -2.0, -1.0],
                   [-0.5, 3.0, 0.0]])
TARGETS = np.array([[1, 0, 0],
                    [0, 1, 0],
                    [1, 1, 0],
                    [0, 0, 0]])


def test_multilabel_by_hand():
    m = multilabel_metrics(LOGITS, TARGETS)
    # Predictions (sigmoid > 0.5 <=> logit > 0): [1,0,0], [0,1,1], [1,0,0], [0,1,0]; logit 0 is not > 0.
    # Class 0: scores 2, -1, .5, -.5 for labels 1, 0, 1, 0 -> both positives ranked first: AP 1.
    #          TP 2, FP 0, FN 0 -> P 1, F1 1.
    # Class 1: scores -1, 1, -2, 3 for labels 0, 1, 1, 0 -> ranking 3(neg), 1(pos), -1(neg), -2(pos):
    #          AP = (1/2 + 2/4) / 2 = 0.5. TP 1 (sample 1), FP 1 (sample 3), FN 1 (sample 2):
    #          P 0.5, F1 0.5.
    # Class 2 is absent from y_true: left out of the macro averages (one false positive, sample 1).
    assert m["n_classes_present"] == 2
    assert m["mAP_macro"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["f1_macro"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["precision_macro"] == pytest.approx((1.0 + 0.5) / 2)
    # Micro over all 12 cells: TP 3, FP 2 (class 1 sample 3, class 2 sample 1), FN 1.
    assert m["precision_micro"] == pytest.approx(3 / 5)
    assert m["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Micro AP over the 12 scores, 4 positives: ranked 3(n) 2(p) 1(p) .5(p, class 0) .5(n, class 2) 0(n)
    # -.5(n) -1(n) -1(n) -1(n) -2(p) -3(n). The tie at .5 counts as one threshold: recall 3/4 reached
    # with precision 3/5. AP = 1/4 * (1/2 + 2/3 + 3/5 + 4/11).
    assert m["mAP_micro"] == pytest.approx(0.25 * (1 / 2 + 2 / 3 + 3 / 5 + 4 / 11))
    assert list(m)[: len(BEN_METRICS)] == list(BEN_METRICS)


def test_average_precision_by_hand_and_as_in_multilabel_metrics():
    result = average_precision(LOGITS, TARGETS)  # the classes worked out in test_multilabel_by_hand
    ap = result["per_class"]
    assert ap[:2] == pytest.approx([1.0, 0.5]) and math.isnan(ap[2])
    assert result["mAP_macro"] == np.nanmean(ap) == multilabel_metrics(LOGITS, TARGETS)["mAP_macro"]
    assert result["mAP_micro"] == multilabel_metrics(LOGITS, TARGETS)["mAP_micro"]
    # Average precision reads only the ranking: probabilities give the same values as logits.
    probs = average_precision(1 / (1 + np.exp(-np.asarray(LOGITS))), TARGETS)
    np.testing.assert_array_equal(probs["per_class"], ap)
    assert probs["mAP_micro"] == result["mAP_micro"]
    empty = average_precision(np.zeros((2, 3)), np.zeros((2, 3)))
    assert np.isnan(empty["per_class"]).all() and math.isnan(empty["mAP_macro"]) and math.isnan(empty["mAP_micro"])
    with pytest.raises(ValueError, match="must both be"):
        average_precision(np.zeros((4, 2)), TARGETS)


def test_multilabel_torch_input_and_perfect_scores():
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m = multilabel_metrics(torch.where(y > 0, 5.0, -5.0), y)
    assert all(m[k] == pytest.approx(1.0) for k in BEN_METRICS)


def test_multilabel_no_positive_at_all():
    m = multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 3)))
    assert math.isnan(m["mAP_macro"]) and math.isnan(m["f1_macro"]) and m["n_classes_present"] == 0
    assert m["f1_micro"] == 0.0 and m["precision_micro"] == 0.0


def test_multilabel_shape_mismatch():
    with pytest.raises(ValueError, match="must both be"):
        multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 4)))


def test_binary_by_hand():
    # Predicted classes: 1, 1, 0, 0, 1, 0 for labels 1, 0, 1, 0, 1, 1.
    logits = np.array([[0.0, 1.0], [-1.0, 2.0], [3.0, 1.0], [0.5, 0.2], [0.0, 0.1], [2.0, -2.0]])
    labels = np.array([1, 0, 1, 0, 1, 1])
    m = binary_metrics(logits, labels)
    # TP 2 (samples 0, 4), FP 1 (sample 1), FN 2 (samples 2, 5), TN 1 (sample 3).
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


def test_binary_without_flood_predictions_or_labels():
    m = binary_metrics(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 0]))
    assert m == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}

