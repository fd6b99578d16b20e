"""The synthetic SEN12-FLOOD writer produces the real layout, JSON structure, grids and flood flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from _sen12_helpers import N_SEQUENCES, chronological_files, shared_root
from rasterio.warp import transform_bounds

from sarwmix.data.sen12flood_synthetic import FLOOD_PATTERNS, S2_BANDS, write_sen12flood
from sarwmix.errors import ConfigError
from sarwmix.prep.sen12_data_prep import parse_bool


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def s1_list(root):
    return json.loads((root / "S1list.json").read_text())


def _numbered(listing: dict) -> list[dict]:
    return [v for k, v in listing.items() if k.isdigit()]


def test_layout_and_json_structure(root, s1_list):
    s2_list = json.loads((root / "S2list.json").read_text())
    seqs = [f"{i:04d}" for i in range(1, N_SEQUENCES + 1)]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == seqs
    assert list(s1_list) == seqs and list(s2_list) == seqs
    for seq in seqs:
        for listing, extra in ((s1_list[seq], {"orbit", "url"}), (s2_list[seq], set())):
            assert listing["folder"] == seq and listing["geo"]["type"] == "Polygon"
            entries = _numbered(listing)
            assert listing["count"] == len(entries) > 0
            for entry in entries:
                assert {"date", "filename", "FLOODING", "FULL-DATA-COVERAGE"} | extra <= set(entry)
        for entry in _numbered(s1_list[seq]):
            assert entry["filename"].startswith(("S1A_IW_GRDH_1SDV_", "S1B_IW_GRDH_1SDV_"))
            assert entry["orbit"] in ("ASCENDING", "DESCENDING")
            for pol in ("VV", "VH"):
                assert (root / seq / f"{entry['filename']}_corrected_{pol}.tif").is_file()
        for entry in _numbered(s2_list[seq]):
            assert entry["filename"] == f"S2_{entry['date']}"
            assert [b for b in S2_BANDS if (root / seq / f"{entry['filename']}_{b}.tif").is_file()] == list(S2_BANDS)
    assert "B8A" in S2_BANDS and len(S2_BANDS) == 12


def test_grids_s1_geographic_linear_s2_utm(root, s1_list):
    for seq in s1_list:
        s2_file = min((root / seq).glob("S2_*_B02.tif"))
        with rasterio.open(s2_file) as s2:
            assert s2.crs.to_epsg() // 100 in (326, 327)
            assert (s2.width, s2.height, s2.transform.a, s2.transform.e) == (512, 512, 10.0, -10.0)
            s2_box = transform_bounds(s2.crs, "EPSG:4326", *s2.bounds)
        for s1_file in (root / seq).glob("S1*_corrected_V?.tif"):
            with rasterio.open(s1_file) as s1:
                assert s1.crs.to_epsg() == 4326 and s1.dtypes[0] == "float32"
                assert 300 <= s1.width <= 700 and 300 <= s1.height <= 700 and s1.shape != (512, 512)
                w, s, e, n = s1.bounds
                power = s1.read(1)
            # The S1 chip covers the S2 tile (plus a margin), so alignment never runs off the data.
            assert w < s2_box[0] and s < s2_box[1] and e > s2_box[2] and n > s2_box[3]
            assert power.min() >= 0 and np.isfinite(power).all()
            # Linear power, not dB: VV/VH medians are small positive numbers.
            assert 1e-4 < np.median(power[power > 0]) < 0.5


def test_flood_flags_follow_patterns_and_are_monotone(root, s1_list):
    for i, seq in enumerate(s1_list):
        entries = sorted(_numbered(s1_list[seq]), key=lambda e: e["date"])
        flags = [parse_bool(e["FLOODING"], seq) for e in entries]
        assert tuple(flags) == FLOOD_PATTERNS[i % 4]
        assert flags == sorted(flags)
    raw = [e["FLOODING"] for seq in ("0002", "0003") for e in _numbered(s1_list[seq])]
    assert "False" in raw and "True" in raw
    assert all(isinstance(e["FLOODING"], bool) for e in _numbered(s1_list["0001"]))
    # Sequence 0002 lists its last date under key "1": readers must sort by date.
    keyed = _numbered(s1_list["0002"])
    assert keyed[0]["date"] > keyed[1]["date"]


def test_zero_borders_and_coverage_flags(root, s1_list):
    fractions = {}
    for seq in s1_list:
        for entry in _numbered(s1_list[seq]):
            with rasterio.open(root / seq / f"{entry['filename']}_corrected_VV.tif") as src:
                frac = float((src.read(1) == 0).mean())
            with rasterio.open(root / seq / f"{entry['filename']}_corrected_VH.tif") as src:
                assert float((src.read(1) == 0).mean()) == frac
            fractions[entry["filename"]] = frac
            assert entry["FULL-DATA-COVERAGE"] is (frac == 0.0)
    assert fractions[chronological_files(root, "0001")[1]] >= 0.4
    thin = [f for f in fractions.values() if 0 < f < 0.25]
    assert len(thin) == 2


def test_flooded_dates_are_darker(root, s1_list):
    for seq in ("0001", "0003"):
        entries = sorted(_numbered(s1_list[seq]), key=lambda e: e["date"])
        means = {}
        for entry in entries:
            with rasterio.open(root / seq / f"{entry['filename']}_corrected_VH.tif") as src:
                power = src.read(1)
            means.setdefault(parse_bool(entry["FLOODING"], seq), []).append(
                float(np.mean(10 * np.log10(power[power > 0]))))
        assert max(means[True]) < min(means[False]) - 2.0


def test_seeded_and_deterministic(tmp_path):
    a, b, c = (write_sen12flood(tmp_path / name, 1, seed) for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert (a / "S1list.json").read_text() == (b / "S1list.json").read_text()
    assert (a / "S1list.json").read_text() != (c / "S1list.json").read_text()
    name = min(p.name for p in (a / "0001").glob("*_VV.tif"))
    with rasterio.open(a / "0001" / name) as fa, rasterio.open(b / "0001" / name) as fb:
        np.testing.assert_array_equal(fa.read(1), fb.read(1))


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="n_sequences"):
        write_sen12flood(tmp_path, 0, 0)
    write_sen12flood(tmp_path, 1, 0)
    with pytest.raises(ConfigError, match="not empty"):
        write_sen12flood(tmp_path, 1, 0)
