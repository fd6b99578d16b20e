"""Alignment of SEN12-FLOOD S1 images onto the S2 grid: grid, zeros, skipped sequences, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from _sen12_helpers import chronological_files, mostly_zero_filename, shared_aligned, shared_root

from sarwmix.data.sen12flood_synthetic import write_sen12flood
from sarwmix.errors import ConfigError, DataError
from sarwmix.prep.sen12_align_s1_to_s2 import align_dataset, main, reference_band
from sarwmix.prep.sen12_data_prep import prepare_pairs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return shared_aligned(tmp_path_factory)


@pytest.fixture
def small_root(tmp_path):
    """A private one-sequence root (pattern F, F, T, T) that tests may damage."""
    return write_sen12flood(tmp_path / "raw", 1, seed=11)


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.crs, src.transform, src.shape


def test_aligned_images_have_the_s2_grid(root, aligned):
    report = json.loads((aligned / "align_report.json").read_text())
    assert report["aligned_images"] == 13 and report["skipped_no_s2"] == []
    for seq in ("0001", "0002", "0003", "0004"):
        s2 = reference_band(root / seq)
        assert report["reference_bands"][seq] == s2.name and s2.name.endswith("_B02.tif")
        _, s2_crs, s2_transform, s2_shape = _read(s2)
        originals = sorted((root / seq).glob("S1*_corrected_V?.tif"))
        assert len(originals) == len(list((aligned / seq).glob("*.tif"))) > 0
        for original in originals:
            power, crs, transform, shape = _read(aligned / seq / original.name)
            assert (crs, transform, shape) == (s2_crs, s2_transform, s2_shape) and shape == (512, 512)
            assert power.dtype == np.float32 and np.isfinite(power).all()
            # Nearest resampling copies source values: no new values, and no-data stays exactly 0.
            source = _read(original)[0]
            assert np.isin(power[power > 0], source).all()
    for name in ("S1list.json", "S2list.json"):
        assert (aligned / name).read_bytes() == (root / name).read_bytes()


def test_zero_fractions_after_alignment(root, aligned):
    heavy = mostly_zero_filename(root)
    fractions = {p.name: float((_read(p)[0] == 0).mean()) for p in aligned.glob("*/*_corrected_V?.tif")}
    heavy_fracs = [f for name, f in fractions.items() if name.startswith(heavy)]
    assert len(heavy_fracs) == 2 and min(heavy_fracs) >= 0.3
    others = [f for name, f in fractions.items() if not name.startswith(heavy)]
    assert max(others) < 0.25 and sum(f > 0 for f in others) >= 2


def test_bilinear_keeps_zeros_out_of_valid_pixels(small_root, tmp_path):
    near = align_dataset(small_root, tmp_path / "near")
    bil = align_dataset(small_root, tmp_path / "bil", resampling="bilinear")
    assert near["aligned_images"] == bil["aligned_images"] == 4
    for path in sorted((tmp_path / "near" / "0001").glob("*.tif")):
        a, b = _read(path)[0], _read(tmp_path / "bil" / "0001" / path.name)[0]
        assert np.isfinite(b).all() and b.min() >= 0
        # Declaring 0 as no-data: the zero area keeps its size (within the one-pixel warp edge).
        assert abs(float((a == 0).mean()) - float((b == 0).mean())) < 0.01
    with pytest.raises(ConfigError, match="resampling"):
        align_dataset(small_root, tmp_path / "x", resampling="cubic")


def test_sequence_without_s2_is_reported_and_skipped(small_root, tmp_path, capsys):
    for band in small_root.glob("0001/S2_*.tif"):
        band.unlink()
    assert main([str(small_root), str(tmp_path / "al")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 sequences without any S2 band: ['0001']" in out
    report = json.loads((tmp_path / "al" / "align_report.json").read_text())
    assert report["skipped_no_s2"] == ["0001"] and report["aligned_images"] == 0
    counts = prepare_pairs(tmp_path / "al", tmp_path / "al" / "S1list.json", tmp_path / "pairs", [])
    assert counts["skipped_sequences"] == 1 and counts["train"] == counts["test"] == 0


def test_missing_s1_file_is_an_error_naming_sequence_and_file(small_root, tmp_path, capsys):
    # The last date is flooded: without it the sequence is F, F, T, which gives 3 pairs.
    victim = small_root / "0001" / f"{chronological_files(small_root, '0001')[-1]}_corrected_VH.tif"
    victim.unlink()
    with pytest.raises(DataError, match=rf"sequence 0001: S1 file .*{victim.name} .*does not exist"):
        align_dataset(small_root, tmp_path / "a")
    assert main([str(small_root), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sequence 0001") and victim.name in err and err.count("\n") == 1
    report = align_dataset(small_root, tmp_path / "c", skip_bad=True)
    prefix = victim.name.removesuffix("_corrected_VH.tif")
    assert report["aligned_images"] == 3
    assert [(e["sequence"], e["filename"]) for e in report["skipped_entries"]] == [("0001", prefix)]
    # The pairing step leaves the skipped acquisition out instead of failing on it.
    counts = prepare_pairs(tmp_path / "c", tmp_path / "c" / "S1list.json", tmp_path / "pairs", [])
    assert counts["skipped_bad_entries"] == 1 and counts["train"] == 3


def test_missing_sequence_folder(small_root, tmp_path):
    listing = json.loads((small_root / "S1list.json").read_text())
    listing["0999"] = dict(listing["0001"], folder="0999")
    (small_root / "S1list.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match="sequence 0999 .*has no folder"):
        align_dataset(small_root, tmp_path / "a")
    report = align_dataset(small_root, tmp_path / "b", skip_bad=True)
    assert report["skipped_missing_folder"] == ["0999"] and report["aligned_images"] == 4


def test_non_finite_source_is_an_error(small_root, tmp_path):
    victim = sorted(small_root.glob("0001/S1*_corrected_VV.tif"))[1]
    with rasterio.open(victim, "r+") as dst:
        power = dst.read(1)
        power[10, 10] = np.nan
        dst.write(power, 1)
    with pytest.raises(DataError, match=rf"{victim.name} holds non-finite"):
        align_dataset(small_root, tmp_path / "a")


def test_out_must_differ_from_root(small_root):
    with pytest.raises(ConfigError, match="must differ"):
        align_dataset(small_root, small_root)
