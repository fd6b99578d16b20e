"""The synthetic Sentinel-1 generator: determinism, labels, and realism against measurements of real patches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES, BEN_43_TO_19, DATASET_STATS
from sarwmix.data import synthetic_structured as S
from sarwmix.data.stats import patch_texture_stats
from sarwmix.data.synthetic import SCENES, SyntheticS1, generate_patch
from sarwmix.errors import ConfigError

# p10..p90 of per-patch measures on 30 real BigEarthNet-S1 patches, (VH band, VV band).
REAL_BANDS = {
    "std": ((2.7, 4.2), (2.6, 4.5)),
    "enl": ((4.0, 5.9), (4.0, 5.9)),
    "lag1": ((0.79, 0.90), (0.81, 0.92)),
    "lag4": ((0.20, 0.51), (0.21, 0.56)),
}


@pytest.fixture(scope="module", params=SCENES)
def measured(request) -> dict[str, np.ndarray]:
    rows = [patch_texture_stats(generate_patch(seed, scene=request.param)[0]) for seed in range(30)]
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def test_patch_shapes_dtypes_and_finite() -> None:
    sar_db, target, _ = generate_patch(7)
    assert sar_db.shape == (2, 120, 120) and sar_db.dtype == np.float32
    assert target.shape == (19,) and target.dtype == np.float32
    assert np.isfinite(sar_db).all()
    assert -50 < sar_db.min() and sar_db.max() < 20
    assert generate_patch(7, size=64)[0].shape == (2, 64, 64)


def test_same_seed_same_patch_other_seed_other_patch() -> None:
    a, ta, la = generate_patch(123)
    b, tb, lb = generate_patch(123)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta, tb)
    assert la == lb
    assert not np.array_equal(a, generate_patch(124)[0])


@pytest.mark.parametrize("scene", SCENES)
def test_labels_follow_the_43_to_19_mapping(scene: str) -> None:
    for seed in range(40):
        _, target, labels = generate_patch(seed, scene=scene)
        assert labels, "every patch carries at least one label"
        assert labels == sorted(labels, key=BEN_43_CLASSES.index)
        expected = np.zeros(len(BEN_19_CLASSES), np.float32)
        for name in labels:
            expected[BEN_43_TO_19[BEN_43_CLASSES.index(name)]] = 1
        np.testing.assert_array_equal(target, expected)


def test_medians_land_inside_real_p10_p90(measured: dict[str, np.ndarray]) -> None:
    for key, bands in REAL_BANDS.items():
        medians = np.median(measured[key], axis=0)
        for channel, (lo, hi) in enumerate(bands):
            assert lo <= medians[channel] <= hi, f"{key}[{channel}] median {medians[channel]:.3f}"
    # Gap and correlation: real medians 5.9 [5.4, 6.8] and 0.59 [0.35, 0.78].
    assert 5.4 <= np.median(measured["gap"]) <= 6.8
    assert 0.35 <= np.median(measured["corr"]) <= 0.78


def test_channel_means_near_benv1_statistics(measured: dict[str, np.ndarray]) -> None:
    # Per-patch means vary (VV ~ N(-12, 4)); the average over 30 patches should sit within 2 dB.
    means = measured["mean"].mean(axis=0)
    np.testing.assert_allclose(means, DATASET_STATS["benv1"]["mean"], atol=2.0)
    assert np.std(measured["mean"][:, 1]) > 1.5, "patch means must vary from patch to patch"


def test_speckle_is_spatially_correlated_not_iid() -> None:
    # Independent per-pixel speckle would give a dB lag-1 correlation far below the real 0.84.
    sar_db, _, _ = generate_patch(3)
    flat = patch_texture_stats(sar_db)
    assert min(flat["lag1"]) > 0.7


def test_dataset_items_are_deterministic_resized_and_selectable() -> None:
    full = SyntheticS1(n=4, input_size=128, seed=5)
    x, y = full[2]
    assert x.shape == (2, 128, 128) and x.dtype == torch.float32 and y.shape == (19,)
    x2, _ = SyntheticS1(n=4, input_size=128, seed=5)[2]
    torch.testing.assert_close(x, x2)
    native, target = SyntheticS1(n=4, input_size=120, seed=5)[2]
    sar_db, expected_target, _ = generate_patch(5 * 1_000_003 + 2)
    np.testing.assert_array_equal(native.numpy(), sar_db)
    np.testing.assert_array_equal(target.numpy(), expected_target)
    vv_only = SyntheticS1(n=4, input_size=128, seed=5, channels=("VV",))
    torch.testing.assert_close(vv_only[2][0], x[1:])
    assert vv_only.stats["mean"] == [DATASET_STATS["benv1"]["mean"][1]]
    assert full.num_classes == 19 and len(full) == 4
    with pytest.raises(IndexError):
        full[4]


def test_structured_scene_is_deterministic_and_differs_from_the_mosaic() -> None:
    a, ta, la = generate_patch(11, scene="structured")
    b, tb, lb = generate_patch(11, scene="structured")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta, tb)
    assert la == lb and a.shape == (2, 120, 120) and np.isfinite(a).all()
    assert not np.array_equal(a, generate_patch(11)[0])
    np.testing.assert_array_equal(generate_patch(11)[0], generate_patch(11, scene="mosaic")[0])
    x, _ = SyntheticS1(n=2, input_size=120, seed=3, scene="structured")[1]
    np.testing.assert_array_equal(x.numpy(), generate_patch(3 * 1_000_003 + 1, scene="structured")[0])


def test_unknown_scene_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="synthetic scene 'city'"):
        generate_patch(0, scene="city")
    with pytest.raises(ConfigError, match="synthetic scene 'city'"):
        SyntheticS1(n=2, scene="city")


def test_street_grid_and_rows_are_periodic_and_water_is_smooth() -> None:
    rng = np.random.default_rng(0)
    # Row texture: a parcel's stripes repeat with the drawn period; urban streets are the darkest pixels.
    rows = S.render_parcels(rng, 96, np.array([200, 1.0, 6, 6, 2.0, 0.0, 0], np.float32))
    spectrum = np.abs(np.fft.fft2(rows - rows.mean()))
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96), indexing="ij"))
    assert abs(1 / freq.ravel()[spectrum.argmax()] - 6) < 0.5
    urban = S.render_urban(rng, 96, np.array([10, 2, -6, 0.02, 9, 0.0], np.float32))
    assert 0.2 < (urban == -6).mean() < 0.6 and urban.max() >= 9
    # Water interiors are smooth: far less fine-scale variance than a coniferous canopy.
    water = S.render_smooth(rng, 96, np.array(S.STRUCTURE["Water bodies"][1], np.float32))
    conifer = S.render_canopy(rng, 96, np.array(S.STRUCTURE["Coniferous forest"][1], np.float32))
    assert np.diff(water, axis=1).std() < 0.2 * np.diff(conifer, axis=1).std()


def test_lakes_and_rivers_have_sharp_edges_inside_the_patch() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        river, lake = S.river_mask(rng, 120), S.lake_mask(rng, 120)
        assert 0.02 < river.mean() < 0.3 and 0.02 < lake.mean() < 0.6


def test_structured_covers_of_a_group_share_levels_and_structure_std() -> None:
    from sarwmix.data.synthetic import _COVER, _grouped_table

    names, own, table = [r[0] for r in _COVER], np.array([r[1:5] for r in _COVER]), _grouped_table()
    for members in S.LEVEL_GROUPS.values():
        rows = table[[names.index(m) for m in members]]
        np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape))
    alone = names.index("Beaches, dunes, sands")  # in no group: its own row
    np.testing.assert_array_equal(table[alone], own[alone])
    rng = np.random.default_rng(0)
    for name in ("Continuous urban fabric", "Industrial or commercial units"):
        kind, params, _, _ = S.STRUCTURE[name]
        out = S.matched_structure(S.RENDERERS[kind](rng, 120, np.array(params, np.float32)), name)
        assert abs(out.mean()) < 1e-4 and out.std() == pytest.approx(S.GROUP_STRUCTURE_STD["built-up"], rel=1e-3)
