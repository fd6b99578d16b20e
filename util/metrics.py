"""Evaluation metrics of the finetuning tasks (scikit-learn), from logits and targets.

BigEarthNet (multi-label): ``mAP_macro, mAP_micro`` (average precision of the sigmoid scores),
``f1_macro, f1_micro, precision_macro, precision_micro`` (predictions ``sigmoid(logit) > 0.5``), all with
``zero_division=0``.

Classes absent from ``y_true``: their average precision is undefined (no positive to rank), and their
F1/precision would be 0 or undefined whatever the model does. Macro averages therefore run over the
classes with at least one positive sample in the evaluated split (``n_classes_present`` reports how many);
micro averages pool every class, so false positives on an absent class still count against the model.
On the full BigEarthNet splits every one of the 19 classes is present and this rule changes nothing.

SEN12-FLOOD (binary, flood = class 1): ``accuracy`` and the ``precision, recall, f1`` of the flood class,
predictions ``argmax`` of the two logits.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score

THRESHOLD = 0.5
BEN_METRICS: tuple[str, ...] = (
    "mAP_macro", "mAP_micro", "f1_macro", "f1_micro", "precision_macro", "precision_micro",
)
SEN12_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1")


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def average_precision(scores: torch.Tensor | np.ndarray,
                      targets: torch.Tensor | np.ndarray) -> dict[str, np.ndarray | float]:
    """Average precision of multi-label scores, each class's and pooled.

    Args:
        scores: (N, K) any strictly increasing transform of the probabilities (logits, probabilities, k-NN
            votes): average precision reads only the ranking.
        targets: (N, K) multi-hot 0/1.
    Returns:
        ``per_class``: (K,) float64, NaN where the class has no positive sample; ``mAP_macro``: its mean over
        the other classes; ``mAP_micro``: AP of all N*K scores pooled. Both NaN when no class is present.
    """
    scores, y_true = _numpy(scores).astype(np.float64), (_numpy(targets) > 0.5).astype(np.int64)
    if scores.shape != y_true.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {y_true.shape} must both be (N, K)")
    per_class = np.array([average_precision_score(y_true[:, k], scores[:, k]) if y_true[:, k].any() else np.nan
                          for k in range(y_true.shape[1])])
    if not y_true.any():
        return {"per_class": per_class, "mAP_macro": float("nan"), "mAP_micro": float("nan")}
    return {"per_class": per_class, "mAP_macro": float(np.nanmean(per_class)),
            "mAP_micro": float(average_precision_score(y_true.ravel(), scores.ravel()))}


def multilabel_metrics(logits: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                       threshold: float = THRESHOLD) -> dict[str, float | int]:
    """BigEarthNet metrics (see the module docstring for the rule on absent classes).

    Args:
        logits: (N, K) raw scores (sigmoid is applied here).
        targets: (N, K) multi-hot 0/1.
        threshold: probability above which a class is predicted.
    Returns:
        ``BEN_METRICS`` as floats (NaN for macro averages when no class is present) plus
        ``n_classes_present`` (an int).
    """
    scores = 1.0 / (1.0 + np.exp(-_numpy(logits).astype(np.float64)))
    y_true = (_numpy(targets) > 0.5).astype(np.int64)
    if scores.shape != y_true.shape or scores.ndim != 2:
        raise ValueError(f"logits {scores.shape} and targets {y_true.shape} must both be (N, K)")
    y_pred = (scores > threshold).astype(np.int64)
    present = np.flatnonzero(y_true.sum(axis=0) > 0)
    out = {"n_classes_present": len(present)}
    ap = average_precision(scores, y_true)
    out.update(mAP_macro=ap["mAP_macro"], mAP_micro=ap["mAP_micro"])
    if len(present):
        out["f1_macro"] = float(f1_score(y_true[:, present], y_pred[:, present], average="macro",
                                         zero_division=0))
        out["precision_macro"] = float(precision_score(y_true[:, present], y_pred[:, present],
                                                       average="macro", zero_division=0))
    else:
        out.update(f1_macro=float("nan"), precision_macro=float("nan"))
    out["f1_micro"] = float(f1_score(y_true, y_pred, average="micro", zero_division=0))
    out["precision_micro"] = float(precision_score(y_true, y_pred, average="micro", zero_division=0))
    return {**{k: out[k] for k in BEN_METRICS}, "n_classes_present": out["n_classes_present"]}


def binary_metrics(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """SEN12-FLOOD metrics of the flood class.

    Args:
        logits: (N, 2) raw scores of (no flood, flood).
        labels: (N,) integers 0/1.
    Returns:
        ``SEN12_METRICS`` as floats (precision/recall/F1 are 0 when undefined).
    """
    scores, y_true = _numpy(logits), _numpy(labels).astype(np.int64).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != y_true.shape[0]:
        raise ValueError(f"logits {scores.shape} must be (N, 2) for labels {y_true.shape}")
    y_pred = scores.argmax(axis=1)
    kw = {"pos_label": 1, "average": "binary", "zero_division": 0, "labels": [0, 1]}
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "precision": float(precision_score(y_true, y_pred, **kw)),
            "recall": float(recall_score(y_true, y_pred, **kw)),
            "f1": float(f1_score(y_true, y_pred, **kw))}

