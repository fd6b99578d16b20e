"""Frozen-representation probes (util/probe.py): features, k-NN, linear probe, metrics, hand-crafted floor."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from util.probe import (
    PROBE_METRICS,
    handcrafted_features,
    knn_scores,
    linear_probe_scores,
    pooled_features,
    probe_metrics,
)


class _Pixels(torch.nn.Module):
    """forward_features: each pixel is a token with the channels as features; a dropout sees the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)
        self.seen: list[torch.Tensor] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.drop(x.flatten(2).transpose(1, 2))  # (B, H*W, C)


def _items(n: int = 10, c: int = 2, s: int = 8, k: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, s, s, generator=g) * 5 - 15, (torch.rand(k, generator=g) < 0.5).float())
            for _ in range(n)]


def test_pooled_features_normalises_like_training_and_averages_tokens() -> None:
    items = _items()
    enc = _Pixels()
    feats, targets = pooled_features(enc, items, [-15.0, -10.0], [5.0, 2.0], batch_size=4)
    x = torch.stack([it[0] for it in items])
    expected = ((x - torch.tensor([-15.0, -10.0]).view(1, 2, 1, 1)) / torch.tensor([5.0, 2.0]).view(1, 2, 1, 1))
    assert feats.shape == (10, 2) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets, torch.stack([it[1] for it in items]).numpy())
    assert [len(b) for b in enc.seen] == [4, 4, 2]


def test_pooled_features_restores_modes_and_touches_no_random_stream() -> None:
    enc = _Pixels()
    enc.train()
    enc.drop.eval()  # a mixed state must come back as it was
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    pooled_features(enc, _items(), [0.0, 0.0], [1.0, 1.0], batch_size=3)
    after = (torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(after[0], before[0]) and np.array_equal(after[1], before[1]) and after[2] == before[2]
    assert enc.training and not enc.drop.training


def test_pooled_features_eval_mode_on_a_swin_encoder() -> None:
    from models_mixmim import build_mixmim

    model = build_mixmim("mixmim_tiny", img_size=64, in_chans=2)
    model.train()
    items = _items(n=3, s=64)
    a, _ = pooled_features(model, items, [0.0, 0.0], [1.0, 1.0], batch_size=2)
    b, _ = pooled_features(model, items, [0.0, 0.0], [1.0, 1.0], batch_size=3)
    assert a.shape == (3, model.num_features) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # eval mode: no drop path, batch-independent
    assert model.training


def test_meanmax_pooling_appends_the_token_maximum_and_stages_every_stage_mean() -> None:
    from models_mixmim_ft import build_mixmim_ft

    items = _items(n=3)
    mean, _ = pooled_features(_Pixels(), items, [0.0, 0.0], [1.0, 1.0])
    both, _ = pooled_features(_Pixels(), items, [0.0, 0.0], [1.0, 1.0], pooling="meanmax")
    x = torch.stack([it[0] for it in items])
    np.testing.assert_allclose(both[:, :2], mean, rtol=1e-6)
    np.testing.assert_allclose(both[:, 2:], x.amax(dim=(2, 3)).numpy(), rtol=1e-6)
    model = build_mixmim_ft("mixmim_study", 19, img_size=64)
    swin = _items(n=2, s=64)
    final, _ = pooled_features(model, swin, [0.0, 0.0], [1.0, 1.0])
    stages, _ = pooled_features(model, swin, [0.0, 0.0], [1.0, 1.0], pooling="stages")
    # Stage outputs after patch merging: widths 64, 128, 256, 256 (embed 32), then the final mean.
    assert stages.shape == (2, 64 + 128 + 256 + 256 + model.num_features)
    np.testing.assert_allclose(stages[:, -model.num_features:], final, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling 'stages'"):
        pooled_features(_Pixels(), items, [0.0, 0.0], [1.0, 1.0], pooling="stages")
    with pytest.raises(ValueError, match="expected one of"):
        pooled_features(_Pixels(), items, [0.0, 0.0], [1.0, 1.0], pooling="median")


def test_knn_scores_vote_of_nearest_neighbours() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:2] * 10
    train_x = np.concatenate([centres[0] + rng.normal(0, 0.1, (20, 4)), centres[1] + rng.normal(0, 0.1, (20, 4))])
    train_y = np.repeat(np.array([[1, 0, 1], [0, 1, 1]], float), 20, axis=0)
    test_x = np.stack([centres[0], centres[1]]) + 0.05
    s = knn_scores(train_x, train_y, test_x, k=10)
    np.testing.assert_allclose(s, [[1, 0, 1], [0, 1, 1]], atol=1e-9)
    mixed = knn_scores(train_x, train_y, np.ones((1, 4)), k=40)  # equidistant: half the votes each
    assert mixed.shape == (1, 3) and 0.3 < mixed[0, 0] < 0.7 and mixed[0, 2] == pytest.approx(1.0)
    assert knn_scores(train_x, train_y, test_x, k=1000).shape == (2, 3)  # k capped at N


def test_knn_scores_weights_closer_neighbours_more() -> None:
    train_x = np.array([[1.0, 0.0], [0.8, 0.6]])
    train_y = np.array([[1.0], [0.0]])
    s = knn_scores(train_x, train_y, np.array([[1.0, 0.05]]), k=2, temperature=0.07)
    assert 0.9 < s[0, 0] < 1.0  # both vote, the nearer one with much more weight


def test_linear_probe_separable_and_constant_classes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0), np.zeros(200, bool), np.ones(200, bool)], 1).astype(float)
    p = linear_probe_scores(x[:150], y[:150], x[150:])
    assert p.shape == (50, 4) and (p >= 0).all() and (p <= 1).all()
    assert ((p[:, 0] > 0.5) == y[150:, 0]).mean() > 0.9
    assert (p[:, 2] == 0).all() and (p[:, 3] == 1).all()
    np.testing.assert_array_equal(p, linear_probe_scores(x[:150], y[:150], x[150:]))  # deterministic


def test_probe_metrics_keys_and_macro_over_present_classes() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5, np.zeros(120, bool)], 1).astype(float)
    y[:80, 2] = rng.random(80) < 0.3  # class 2 present in train, absent in test
    m = probe_metrics(x[:80], y[:80], x[80:], y[80:], k=10)
    assert tuple(m) == PROBE_METRICS
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["linear_mAP_macro"] > 0.9 and m["knn_mAP_macro"] > 0.6  # informative features, 2 classes present
    noise = probe_metrics(rng.normal(size=(80, 6)), y[:80], rng.normal(size=(40, 6)), y[80:], k=10)
    assert noise["linear_mAP_macro"] < m["linear_mAP_macro"] - 0.2


def test_handcrafted_features_layout() -> None:
    x = np.full((2, 2, 4, 4), -10.0, np.float32)
    x[1, 1] = np.linspace(-50, 20, 16).reshape(4, 4)  # tails beyond [lo, hi] fall into the edge bins
    f = handcrafted_features(x, bins=8)
    assert f.shape == (2, 2 * (7 + 8)) and f.dtype == np.float32
    per = f.reshape(2, 2, 15)
    np.testing.assert_allclose(per[0, 0, :7], [-10, 0, -10, -10, -10, -10, -10], atol=1e-5)
    np.testing.assert_allclose(per[..., 7:].sum(-1), 1.0, atol=1e-6)
    assert per[0, 0, 7 + 5] == 1.0  # -10 dB in bin 5 of [-35, 5) in 8 bins of 5 dB
    assert per[1, 1, 7] > 0 and per[1, 1, -1] > 0
    np.testing.assert_allclose(per[1, 1, 0], np.mean(x[1, 1]), rtol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        handcrafted_features(x[0])


def test_torch_solver_finds_the_same_classifier_as_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8))
    y = np.stack([x[:, 0] + 0.5 * rng.normal(size=300) > 0, x[:, 1] - x[:, 2] + rng.normal(size=300) > 0.5,
                  np.ones(300, bool)], 1).astype(float)
    a = linear_probe_scores(x[:200], y[:200], x[200:], c=0.5)
    b = linear_probe_scores(x[:200], y[:200], x[200:], c=0.5, solver="torch")
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert (b[:, 2] == 1).all()
    m = probe_metrics(x[:200], y[:200], x[200:], y[200:], k=10, solver="torch")
    assert m["linear_mAP_macro"] == pytest.approx(probe_metrics(x[:200], y[:200], x[200:], y[200:], k=10)
                                                  ["linear_mAP_macro"], abs=1e-3)
    with pytest.raises(ValueError, match="solver"):
        linear_probe_scores(x[:200], y[:200], x[200:], solver="newton")
