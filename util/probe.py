"""Frozen-representation probes: pooled encoder features, a k-NN and a linear classifier, their mAP.

The same functions serve the monitor of a pretraining run (``--probe_every``) and ``python -m
analysis.probe`` on saved checkpoints. The encoder is an argument: this module knows no model.

- ``pooled_features``: the encoder's token features averaged over tokens, inputs normalised exactly as
  pretraining and finetuning feed the model; eval mode and no gradient; no global random stream is touched,
  so a run with the probe trains bit-identically to one without.
- ``knn_scores``: cosine k-NN with DINO's weighted vote (each of the k nearest training samples votes
  for its labels with weight ``exp(similarity / T)``), normalised to a score in [0, 1] per class.
- ``linear_probe_scores``: features standardised on the training part, one logistic regression per class.
- ``handcrafted_features``: the floor every learned representation must beat: per-channel dB statistics
  and histograms.
"""
from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from util.augment import normalize
from util.metrics import multilabel_metrics

log = logging.getLogger("sarwmix")

PROBE_METRICS: tuple[str, ...] = ("knn_mAP_macro", "knn_mAP_micro", "linear_mAP_macro", "linear_mAP_micro")
PERCENTILES: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 95.0)


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Average over tokens: (B, L, D) -> (B, D); a timm Swin's NHWC (B, H, W, D) -> (B, D); (B, D) as is."""
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 4:
        return features.flatten(1, 2).mean(dim=1)
    if features.dim() == 2:
        return features
    raise ValueError(f"forward_features returned shape {tuple(features.shape)}; expected (B, L, D)")


class _RandomState:
    """Save every global random stream on entry and restore it on exit (torch CPU and CUDA, numpy, random)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        self.torch_state = torch.get_rng_state()
        self.cuda_state = (torch.cuda.get_rng_state(self.device)
                           if self.device.type == "cuda" and torch.cuda.is_available() else None)
        self.np_state, self.py_state = np.random.get_state(), random.getstate()

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.torch_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        np.random.set_state(self.np_state)
        random.setstate(self.py_state)


def pooled_features(encoder: torch.nn.Module, dataset, mean: Sequence[float], std: Sequence[float], *,
                    device: torch.device | str = "cpu", batch_size: int = 64, num_workers: int = 0,
                    amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frozen encoder's token-averaged features of every item of ``dataset``.

    Args:
        encoder: a module with ``forward_features(x)`` -> (B, L, D) (or a timm Swin's (B, H, W, D)).
        dataset: items ``(sar_db (C, S, S) raw dB, target (K,))`` as ``PatchDataset`` returns them.
        mean, std: per-channel dB statistics; the input is ``(x - mean) / std`` as in training.
        amp_dtype: autocast dtype of the forward pass (None: float32).
    Returns:
        (features (N, D) float32, targets (N, K) float32), in dataset order.
    Side effects: none; the train/eval state of every submodule is restored, and the global random streams
    are saved and restored (a DataLoader draws its base seed from the global stream unless given its own).
    """
    device = torch.device(device)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=device)
    modes = {m: m.training for m in encoder.modules()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    feats, targets = [], []
    try:
        encoder.eval()
        with _RandomState(device), torch.no_grad():
            for sar_db, target in loader:
                x = normalize(sar_db.to(device).float(), mean_t, std_t)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    f = _pool(encoder.forward_features(x))
                feats.append(f.float().cpu().numpy())
                targets.append(np.asarray(target, dtype=np.float32))
    finally:
        for m, training in modes.items():
            m.training = training
    if not feats:
        raise ValueError("pooled_features: the data set is empty")
    return np.concatenate(feats).astype(np.float32), np.concatenate(targets).astype(np.float32)


def _check_xy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, ...]:
    train_x, train_y, test_x = (np.asarray(a, dtype=np.float64) for a in (train_x, train_y, test_x))
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features train {train_x.shape} and test {test_x.shape} must be (N, D) with one D")
    if train_y.ndim != 2 or train_y.shape[0] != train_x.shape[0]:
        raise ValueError(f"targets {train_y.shape} must be (N, K) with N = {train_x.shape[0]}")
    return train_x, train_y, test_x


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
    """Cosine k-NN multi-label scores with DINO's weighted vote.

    Args:
        train_x: (N, D) features; train_y: (N, K) multi-hot; test_x: (M, D) features.
        k: neighbours (capped at N); temperature: T in the vote weight ``exp(cos / T)``.
    Returns:
        (M, K) float64 scores in [0, 1]: the vote-weighted fraction of neighbours carrying each class.
    """
    train_x, train_y, test_x = _check_xy(train_x, train_y, test_x)
    k = min(int(k), train_x.shape[0])
    if k < 1:
        raise ValueError(f"k-NN needs k >= 1 and a non-empty training set, got k={k}")
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    scores = np.empty((b.shape[0], train_y.shape[1]))
    for start in range(0, b.shape[0], 1024):  # bounded memory: 1024 x N similarities at a time
        sim = b[start:start + 1024] @ a.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sim, idx, axis=1)
        w = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)  # shift: same ratios, no overflow
        scores[start:start + 1024] = np.einsum("mk,mkc->mc", w, train_y[idx]) / w.sum(axis=1, keepdims=True)
    return np.clip(scores, 0.0, 1.0)


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, c: float = 1.0,
                        seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """Logistic-regression probe, one binary classifier per class, on standardised features.

    The scaler is fit on the training part. A class with a single value in ``train_y`` predicts its
    constant prevalence (0 or 1). A solver that stops at ``max_iter`` before converging is logged.

    Returns:
        (M, K) float64 probabilities.
    """
    train_x, train_y, test_x = _check_xy(train_x, train_y, test_x)
    scaler = StandardScaler().fit(train_x)
    xs, xt = scaler.transform(train_x), scaler.transform(test_x)
    out = np.empty((xt.shape[0], train_y.shape[1]))
    not_converged = []
    for j in range(train_y.shape[1]):
        y = (train_y[:, j] > 0.5).astype(np.int64)
        if y.min() == y.max():
            out[:, j] = float(y[0])
            continue
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xs, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            not_converged.append(j)
        out[:, j] = clf.predict_proba(xt)[:, 1]
    if not_converged:
        log.warning("linear probe: classes %s did not converge in %d iterations", not_converged, max_iter)
    return out


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """mAP macro and micro of probability scores by the project's multi-label rule.

    ``multilabel_metrics`` takes logits and applies a sigmoid; average precision depends only on the order
    of the scores, and the sigmoid is strictly increasing, so probabilities can be passed as they are.
    """
    m = multilabel_metrics(scores, targets)
    return m["mAP_macro"], m["mAP_micro"]


def probe_metrics(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                  k: int = 20, c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """k-NN and linear-probe mAP (macro over the classes present in ``test_y``, and micro).

    Returns:
        ``{"knn_mAP_macro", "knn_mAP_micro", "linear_mAP_macro", "linear_mAP_micro"}`` as floats.
    """
    knn = _average_precision(knn_scores(train_x, train_y, test_x, k=k), test_y)
    lin = _average_precision(linear_probe_scores(train_x, train_y, test_x, c=c, seed=seed), test_y)
    return dict(zip(PROBE_METRICS, (*knn, *lin)))


def handcrafted_features(sar_db: np.ndarray, bins: int = 16, lo: float = -35.0, hi: float = 5.0) -> np.ndarray:
    """Per-channel dB statistics: mean, std, percentiles (5, 25, 50, 75, 95) and a ``bins``-bin histogram.

    Args:
        sar_db: (N, C, S, S) raw dB.
        bins, lo, hi: histogram of [lo, hi] dB in equal bins; values outside fall into the edge bins;
            counts are fractions of the pixels.
    Returns:
        (N, C * (7 + bins)) float32, channel by channel.
    """
    x = np.asarray(sar_db, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"sar_db shape {x.shape}: expected (N, C, S, S)")
    if not hi > lo or bins < 1:
        raise ValueError(f"histogram range [{lo}, {hi}] with {bins} bins: expected lo < hi and bins >= 1")
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    stats = [flat.mean(-1, keepdims=True), flat.std(-1, keepdims=True),
             np.moveaxis(np.percentile(flat, PERCENTILES, axis=-1), 0, -1)]
    edges = np.clip(((flat - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros(flat.shape[:2] + (bins,))
    for b in range(bins):
        hist[..., b] = (edges == b).mean(-1)
    return np.concatenate([*stats, hist], axis=-1).reshape(x.shape[0], -1).astype(np.float32)
