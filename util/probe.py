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
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Subset, TensorDataset

from sarwmix.data.datasets import build_dataset, dataset_spec
from util.augment import normalize
from util.metrics import average_precision
from util.watchdog import heartbeat

log = logging.getLogger("sarwmix")

PROBE_METRICS: tuple[str, ...] = ("knn_mAP_macro", "knn_mAP_micro", "linear_mAP_macro", "linear_mAP_micro")
PERCENTILES: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 95.0)


# How token features become one vector per image: ``mean`` over the final tokens; ``meanmax`` their mean
# and maximum (a small cover lifts the maximum where the mean dilutes it); ``stages`` the mean of the
# tokens of every stage's output, concatenated with the final mean (local texture from the fine grids).
POOLINGS: tuple[str, ...] = ("mean", "meanmax", "stages")


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, L, D) as is; a timm Swin's NHWC (B, H, W, D) -> (B, H*W, D); (B, D) -> (B, 1, D)."""
    if features.dim() == 3:
        return features
    if features.dim() == 4:
        return features.flatten(1, 2)
    if features.dim() == 2:
        return features[:, None]
    raise ValueError(f"forward_features returned shape {tuple(features.shape)}; expected (B, L, D)")


def _pool(features: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Tokens (B, L, D) (or NHWC, or (B, D)) -> (B, D) for ``mean``, (B, 2D) for ``meanmax``."""
    tokens = _tokens(features)
    if pooling == "meanmax":
        return torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=1)
    return tokens.mean(dim=1)


def _stage_modules(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The stages of a Swin encoder (its ``layers``): the modules whose outputs ``stages`` pooling averages."""
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList | torch.nn.Sequential) or len(layers) == 0:
        raise ValueError(f"pooling 'stages': {type(encoder).__name__} has no 'layers' (stages) to read")
    return list(layers)


def _forward_pooled(encoder: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, S, S) -> pooled features (B, D') of ``pooling`` (one of ``POOLINGS``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
    if pooling != "stages":
        return _pool(encoder.forward_features(x), pooling)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(_pool(out)))
             for m in _stage_modules(encoder)]
    try:
        final = _pool(encoder.forward_features(x))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([*outputs, final], dim=1)


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
                    amp_dtype: torch.dtype | None = None, pooling: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Frozen encoder's pooled token features of every item of ``dataset``.

    Args:
        encoder: a module with ``forward_features(x)`` -> (B, L, D) (or a timm Swin's (B, H, W, D)).
        dataset: items ``(sar_db (C, S, S) raw dB, target (K,))`` as ``PatchDataset`` returns them.
        mean, std: per-channel dB statistics; the input is ``(x - mean) / std`` as in training.
        amp_dtype: autocast dtype of the forward pass (None: float32).
        pooling: one of ``POOLINGS`` (``mean``: D = the encoder's width; ``meanmax``: 2x; ``stages``: the
            widths of every stage's output plus the final one).
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
            for k, (sar_db, target) in enumerate(loader):
                heartbeat(f"probe features, batch {k} of {len(loader)}")
                x = normalize(sar_db.to(device).float(), mean_t, std_t)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    f = _forward_pooled(encoder, x, pooling)
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
                        seed: int = 0, max_iter: int = 3000, solver: str = "sklearn",
                        device: torch.device | str = "cpu") -> np.ndarray:
    """Logistic-regression probe, one binary classifier per class, on standardised features.

    The scaler is fit on the training part. A class with a single value in ``train_y`` predicts its
    constant prevalence (0 or 1). A solver that stops at ``max_iter`` before converging is logged.

    Args:
        solver: ``sklearn`` (one ``LogisticRegression`` per class) or ``torch``: the same L2-regularised
            problem (``C * sum of log-losses + |w|^2 / 2``, intercept not penalised), whose minimiser is
            unique, solved for all classes at once by full-batch L-BFGS in float64 on ``device``: one
            solve instead of one per class, and on a GPU a fraction of a second.
    Returns:
        (M, K) float64 probabilities.
    """
    train_x, train_y, test_x = _check_xy(train_x, train_y, test_x)
    if solver not in ("sklearn", "torch"):
        raise ValueError(f"linear probe solver {solver!r}: expected 'sklearn' or 'torch'")
    scaler = StandardScaler().fit(train_x)
    xs, xt = scaler.transform(train_x), scaler.transform(test_x)
    y = (train_y > 0.5).astype(np.float64)
    out = np.repeat(y[:1], xt.shape[0], axis=0)  # constant classes: their single value
    fit = np.flatnonzero(y.min(axis=0) != y.max(axis=0))
    if len(fit) and solver == "torch":
        out[:, fit] = _torch_logistic(xs, y[:, fit], xt, c, max_iter, torch.device(device))
    elif len(fit):
        out[:, fit] = _sklearn_logistic(xs, y[:, fit], xt, c, seed, max_iter)
    return out


def _sklearn_logistic(xs: np.ndarray, y: np.ndarray, xt: np.ndarray, c: float, seed: int,
                      max_iter: int) -> np.ndarray:
    """One scikit-learn ``LogisticRegression`` per column of ``y`` (N, K) -> probabilities (M, K)."""
    out = np.empty((xt.shape[0], y.shape[1]))
    not_converged = []
    for j in range(y.shape[1]):
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xs, y[:, j].astype(np.int64))
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            not_converged.append(j)
        out[:, j] = clf.predict_proba(xt)[:, 1]
    if not_converged:
        log.warning("linear probe: classes %s did not converge in %d iterations", not_converged, max_iter)
    return out


def _torch_logistic(xs: np.ndarray, y: np.ndarray, xt: np.ndarray, c: float, max_iter: int,
                    device: torch.device) -> np.ndarray:
    """All columns of ``y`` (N, K) at once: L-BFGS on the mean log-loss + |W|^2 / (2 C N) -> (M, K)."""
    x = torch.as_tensor(xs, dtype=torch.float64, device=device)
    t = torch.as_tensor(y, dtype=torch.float64, device=device)
    w = torch.zeros(x.shape[1], t.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(t.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    # Converged when no gradient entry of the mean loss exceeds 1e-5: on the study's 960 stage features every
    # fit ends within 3,000 iterations, in 2-6 s, and its test mAP agrees with a 20,000-iteration solve to
    # 1e-4. At 1e-7 float64 L-BFGS crawled for thousands of iterations (once past 20,000) without changing
    # a score.
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")
    n = x.shape[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, t, reduction="sum") / n
        loss = loss + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    if opt.state[w]["n_iter"] >= max_iter:
        log.warning("linear probe (torch): L-BFGS stopped at %d iterations before converging", max_iter)
    with torch.no_grad():
        xt_t = torch.as_tensor(xt, dtype=torch.float64, device=device)
        return torch.sigmoid(xt_t @ w + b).cpu().numpy()


def probe_metrics(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                  k: int = 20, c: float = 1.0, seed: int = 0, solver: str = "sklearn",
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """k-NN and linear-probe mAP (macro over the classes present in ``test_y``, and micro).

    ``solver``/``device``: see ``linear_probe_scores``.

    Returns:
        ``{"knn_mAP_macro", "knn_mAP_micro", "linear_mAP_macro", "linear_mAP_micro"}`` as floats.
    """
    knn = average_precision(knn_scores(train_x, train_y, test_x, k=k), test_y)
    lin = average_precision(linear_probe_scores(train_x, train_y, test_x, c=c, seed=seed, solver=solver,
                                                device=device), test_y)
    return dict(zip(PROBE_METRICS, (knn["mAP_macro"], knn["mAP_micro"], lin["mAP_macro"], lin["mAP_micro"])))


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


# ---------------------------------------------------------------------------------------------------
# The labelled probe set and the monitor of a pretraining run.

# Synthetic probe sets use the data-set seed ``seed + PROBE_SEED_OFFSET``: patches that no split of the
# run's own seed generates.
PROBE_SEED_OFFSET = 1000
TRAIN_FRACTION = 0.75


def _cached(dataset, indices: Sequence[int], num_workers: int) -> TensorDataset:
    """Read the items once into memory: (raw dB inputs, targets), so later probes only run the encoder."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=64, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    xs, ys = zip(*[(x.float(), y.float()) for x, y in loader])
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def build_probe_sets(name: str, *, data_path: str | None, input_size: int, channels: Sequence[str],
                     samples: int = 1024, seed: int = 0, num_workers: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The labelled probe data: a training part (3/4) and a held-out part (1/4), read once into memory.

    Synthetic data sets are generated from their own seed (``seed + PROBE_SEED_OFFSET``), so no patch of
    the pretraining data is probed. Other data sets take a seeded random subset of their validation split.

    Returns:
        (train, test) ``TensorDataset`` of (raw dB (C, S, S), target (K,)), each with the data set's
        ``stats``.
    """
    if samples < 8:
        raise ValueError(f"probe samples {samples}: expected at least 8 (a training and a held-out part)")
    synthetic = dataset_spec(name).synthetic
    ds = build_dataset(name, data_path=data_path, split="train" if synthetic else "val", input_size=input_size,
                       channels=tuple(channels), num_samples=samples if synthetic else None,
                       seed=seed + PROBE_SEED_OFFSET if synthetic else 0)
    if len(ds) < 8:
        raise ValueError(f"probe data set {name!r} ({data_path}) has {len(ds)} items; expected at least 8")
    order = np.random.default_rng(seed).permutation(len(ds))[:samples]
    n_train = int(round(len(order) * TRAIN_FRACTION))
    train, test = _cached(ds, order[:n_train], num_workers), _cached(ds, order[n_train:], num_workers)
    train.stats = test.stats = dict(ds.stats)  # the data set's own normalisation, as finetuning uses
    return train, test


class ProbeMonitor:
    """Epoch-end callback of pretraining: probe mAP of the frozen encoder every ``every`` epochs and at the last.

    Rank 0 computes; the other ranks wait at a barrier. Sharding the forward pass would save little: the
    forward of a few thousand patches takes seconds on one GPU, and the scikit-learn fits (the larger part)
    run on the CPU of one process anyway.

    Args:
        encoder: the module whose ``forward_features`` is probed; the training model's own (shared) module,
            so every call sees the current weights.
        train_set, test_set: ``build_probe_sets``'s output (only needed on rank 0).
        mean, std: per-channel dB statistics the pretraining normalises with.
        every: probe after every ``every``-th epoch and the last (0: never).
        solver: of the linear probe (``linear_probe_scores``); ``torch`` fits every class in one L-BFGS
            solve on the run's device.
    """

    def __init__(self, encoder: torch.nn.Module, train_set, test_set, mean: Sequence[float],
                 std: Sequence[float], *, every: int, device: torch.device | str = "cpu", knn_k: int = 20,
                 batch_size: int = 64, amp_dtype: torch.dtype | None = None, seed: int = 0,
                 is_main: bool = True, distributed: bool = False, solver: str = "torch") -> None:
        self.encoder, self.train_set, self.test_set = encoder, train_set, test_set
        self.mean, self.std, self.every, self.device = list(mean), list(std), every, device
        self.knn_k, self.batch_size, self.amp_dtype, self.seed = knn_k, batch_size, amp_dtype, seed
        self.is_main, self.distributed, self.solver = is_main, distributed, solver

    def due(self, epoch: int, last: bool) -> bool:
        """Probe at the end of every ``every``-th epoch (counted from 1) and of the last one."""
        return self.every > 0 and ((epoch + 1) % self.every == 0 or last)

    def __call__(self, epoch: int, last: bool) -> dict[str, float]:
        """``{"probe_knn_mAP_macro", ..., "probe_seconds"}`` on rank 0 when due, else ``{}``."""
        if not self.due(epoch, last):
            return {}
        out: dict[str, float] = {}
        if self.is_main:
            t0 = time.perf_counter()
            kw = {"device": self.device, "batch_size": self.batch_size, "amp_dtype": self.amp_dtype}
            train_x, train_y = pooled_features(self.encoder, self.train_set, self.mean, self.std, **kw)
            test_x, test_y = pooled_features(self.encoder, self.test_set, self.mean, self.std, **kw)
            metrics = probe_metrics(train_x, train_y, test_x, test_y, k=self.knn_k, seed=self.seed,
                                    solver=self.solver, device=self.device)
            out = {f"probe_{k}": v for k, v in metrics.items()}
            out["probe_seconds"] = time.perf_counter() - t0
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out
