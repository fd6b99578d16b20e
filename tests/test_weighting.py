import math

import numpy as np
import pytest
import torch

from sarwmix.sar.units import db_to_linear
from sarwmix.sar.weighting import DEFAULT_WEIGHTS, WeightSpec, percentile, token_average, weight_map
from util.config import RunConfig


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return -15 + 5 * torch.randn(3, 2, 64, 64, generator=g)


@pytest.mark.parametrize("mode", ["per_channel", "shared_avg"])
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_weights_in_range_and_reach_the_ends(mode, s):
    w = weight_map(_batch(), WeightSpec(mode, s))
    assert w.shape == (3, 2, 64, 64) and w.dtype == torch.float32
    assert w.min() >= 1.0 - 1e-6 and w.max() <= math.exp(s) + 1e-5
    # the darkest pixel of each image gets e^s, the brightest ~1
    assert torch.allclose(w.amax(dim=(-2, -1)), torch.full((3, 2), math.exp(s)), rtol=1e-5)
    assert torch.allclose(w.amin(dim=(-2, -1)), torch.ones(3, 2), atol=1e-4)


def test_weights_decrease_with_backscatter():
    x = torch.linspace(-30, 0, 64).repeat(64, 1)[None, None].repeat(1, 2, 1, 1)
    w = weight_map(x, WeightSpec("per_channel"))
    row = w[0, 0, 0]
    assert (row[1:] < row[:-1]).all()


def test_per_channel_uses_linear_power_of_each_channel():
    x = _batch(1)
    w = weight_map(x, WeightSpec("per_channel", 1.0))
    lin = 10 ** (x / 10)
    lo, hi = lin.amin(dim=(-2, -1), keepdim=True), lin.amax(dim=(-2, -1), keepdim=True)
    assert torch.allclose(w, torch.exp(1 - (lin - lo) / (hi - lo + 1e-6)), rtol=1e-5)
    # changing VV does not change the VH weights
    y = x.clone()
    y[:, 1] += 3
    assert torch.equal(weight_map(y, WeightSpec("per_channel"))[:, 0], w[:, 0])


def test_shared_avg_averages_linear_power_before_exponential():
    x = _batch(2)
    w = weight_map(x, WeightSpec("shared_avg"))
    lin = db_to_linear(x).mean(1, keepdim=True)
    expected = torch.exp(1 - (lin - lin.amin((-2, -1), keepdim=True))
                         / (lin.amax((-2, -1), keepdim=True) - lin.amin((-2, -1), keepdim=True) + 1e-6))
    assert torch.allclose(w[:, :1], expected, rtol=1e-5)
    assert torch.equal(w[:, 0], w[:, 1])


def test_none_is_all_ones():
    assert torch.equal(weight_map(_batch(), WeightSpec("none")), torch.ones(3, 2, 64, 64))


@pytest.mark.parametrize("value", [-300.0, -60.0, 0.0, 40.0])
def test_constant_and_extreme_images_give_no_nan(value):
    x = torch.full((2, 2, 32, 32), value)
    for mode in ("per_channel", "shared_avg"):
        w = weight_map(x, WeightSpec(mode))
        assert torch.isfinite(w).all()
    x[0, 0, 0, 0] = 60.0  # one huge outlier next to very dark pixels
    assert torch.isfinite(weight_map(x, WeightSpec("per_channel"))).all()


def test_raw_db_vs_zscore_compat_differ():
    x = _batch(3)
    mean, std = torch.tensor([-19.2309, -12.5951]), torch.tensor([3.1672, 2.9644])
    raw = weight_map(x, WeightSpec("per_channel"))
    compat = weight_map(x, WeightSpec("per_channel", zscore_compat=True), mean, std)
    assert not torch.allclose(raw, compat)
    z = (x - mean.view(1, 2, 1, 1)) / std.view(1, 2, 1, 1)
    assert torch.allclose(compat, weight_map(z, WeightSpec("per_channel")), rtol=1e-6)
    with pytest.raises(ValueError):
        weight_map(x, WeightSpec("per_channel", zscore_compat=True))


def test_token_granularity_is_patch_mean():
    x = _batch(4)
    pix = weight_map(x, WeightSpec("per_channel"))
    tok = weight_map(x, WeightSpec("per_channel", granularity="token", token_size=32))
    assert torch.allclose(tok[..., :32, :32].mean(), pix[..., :32, :32].mean(), rtol=1e-5)
    assert torch.allclose(tok[0, 0, :32, :32], pix[0, 0, :32, :32].mean().expand(32, 32), rtol=1e-5)
    assert torch.equal(token_average(torch.ones(1, 1, 64, 64), 32), torch.ones(1, 1, 64, 64))


def test_bad_weighting_or_granularity_is_refused_when_the_spec_is_built():
    with pytest.raises(ValueError, match="weighting must be one of"):
        WeightSpec("per_pixel")
    with pytest.raises(ValueError, match="weight granularity must be one of"):
        WeightSpec(granularity="patch")


@pytest.mark.parametrize("mode", ["per_channel", "shared_avg"])
def test_minmax_norm_is_the_published_map(mode):
    x = _batch(4)
    lin = db_to_linear(x)
    if mode == "shared_avg":
        lin = lin.mean(1, keepdim=True)
    lo, hi = lin.amin((-2, -1), keepdim=True), lin.amax((-2, -1), keepdim=True)
    expected = torch.exp(1 - (lin - lo) / (hi - lo + 1e-6)).expand_as(x)
    assert torch.equal(weight_map(x, WeightSpec(mode)), expected)
    assert torch.equal(weight_map(x, WeightSpec(mode, norm="minmax", low=5.0, high=95.0)), expected)


def test_percentile_matches_numpy():
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    x[0, 0, :4] = 0.5  # ties
    # Both ends of the selection (smallest or largest values) and the middle, where they meet.
    for q in (0.0, 1.0, 37.5, 49.9, 50.0, 50.1, 62.5, 99.0, 100.0):
        got = percentile(x, q)[..., 0, 0].numpy()
        assert got == pytest.approx(np.percentile(x.flatten(-2).numpy(), q, axis=-1), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", ["per_channel", "shared_avg"])
@pytest.mark.parametrize("s", [0.5, 2.0])
def test_percentile_weights_in_range_decreasing_and_not_minmax(mode, s):
    x = _batch(5)
    w = weight_map(x, WeightSpec(mode, s, norm="percentile", low=1.0, high=99.0))
    assert w.min() >= 1.0 - 1e-6 and w.max() <= math.exp(s) + 1e-5
    assert not torch.allclose(w, weight_map(x, WeightSpec(mode, s)))
    ramp = torch.linspace(-30, 0, 64).repeat(64, 1)[None, None].repeat(1, 2, 1, 1)
    row = weight_map(ramp, WeightSpec(mode, s, norm="percentile", low=5.0, high=95.0))[0, 0, 0]
    assert (row[1:] <= row[:-1]).all() and row[0] > row[-1]
    assert row[0] == pytest.approx(math.exp(s)) and row[-1] == pytest.approx(1.0)  # clipped at the ends


def test_percentile_norm_is_robust_to_one_bright_speckle_pixel():
    x = -20 + 10 * torch.rand(3, 2, 64, 64, generator=torch.Generator().manual_seed(6))  # -20..-10 dB
    bright = x.clone()
    bright[:, :, 10, 20] = 25.0  # one pixel 40 dB above the image
    for norm in ("minmax", "percentile"):
        a, b = weight_map(x, WeightSpec(norm=norm)), weight_map(bright, WeightSpec(norm=norm))
        keep = torch.ones_like(a, dtype=torch.bool)
        keep[:, :, 10, 20] = False
        change = (a - b).abs()[keep].mean()
        if norm == "minmax":
            assert change > 0.3  # the whole image's weights move towards e
        else:
            assert change < 0.01


def test_bad_weight_norm_is_refused():
    with pytest.raises(ValueError, match="percentiles"):
        WeightSpec(norm="percentile", low=99.0, high=1.0)
    with pytest.raises(ValueError, match="weight norm"):
        WeightSpec(norm="zscore")


def test_a_spec_is_read_whole_from_the_flags_and_frozen():
    flags = RunConfig({"weighting": "shared_avg", "weight_exp_scale": 2.0, "weight_granularity": "token",
                       "weight_zscore_compat": True, "weight_norm": "percentile", "weight_norm_low": 5.0,
                       "weight_norm_high": 95.0})
    spec = WeightSpec.of(flags, token_size=16)
    assert spec == WeightSpec("shared_avg", 2.0, "token", 16, True, "percentile", 5.0, 95.0)
    assert DEFAULT_WEIGHTS == WeightSpec("per_channel", 1.0, "pixel", 32, False, "minmax", 1.0, 99.0)
    assert WeightSpec("none").uniform and not spec.uniform
    with pytest.raises(AttributeError):
        spec.exp_scale = 3.0
