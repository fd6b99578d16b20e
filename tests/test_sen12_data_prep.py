"""SEN12-FLOOD pairing: hand-predicted pairs and labels, split, string booleans, bad input."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import rasterio
from _sen12_helpers import (
    EXPECTED_PAIRS,
    TEST_SEQUENCES,
    chronological_files,
    copy_tree,
    expected_pair_names,
    shared_aligned,
    shared_pairs,
)

from sarwmix.errors import ConfigError, DataError
from sarwmix.prep.sen12_data_prep import (
    S1Entry,
    choose_test_sequences,
    main,
    make_pairs,
    parse_bool,
    prepare_pairs,
    read_s1_image,
    resolve_test_sequences,
    sequence_entries,
)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return shared_aligned(tmp_path_factory)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return shared_pairs(tmp_path_factory)


def _entry(day: int, flooding: bool) -> S1Entry:
    return S1Entry(str(day), dt.date(2019, 1, day), f"f{day}", flooding)


def test_make_pairs_rule_from_the_spec():
    d1, d2, d3, d4 = _entry(1, False), _entry(2, False), _entry(3, True), _entry(4, True)
    got = [(a.filename, b.filename, label) for a, b, label in make_pairs([d1, d2, d3, d4])]
    assert got == [("f1", "f2", 0), ("f1", "f3", 1), ("f1", "f4", 1), ("f2", "f3", 1), ("f2", "f4", 1)]
    assert make_pairs([_entry(1, True), _entry(2, True)]) == []
    # Not monotone: the non-flood image still comes first, the label is the flood flag of the second.
    got = [(a.filename, b.filename, label) for a, b, label in make_pairs([_entry(1, True), _entry(2, False)])]
    assert got == [("f2", "f1", 1)]


def test_pairs_and_labels_match_the_hand_prediction(aligned, pairs):
    expected = expected_pair_names(aligned)
    assert len(expected) == sum(len(v) for v in EXPECTED_PAIRS.values()) == 10
    assert sorted(expected.values()).count(0) == 4
    written = {p.parent.name: sorted(q.name for q in p.parent.glob("*.npy")) for p in pairs.glob("*/*.npy")}
    assert sorted(written["train"] + written["test"]) == sorted(expected)
    assert all(name.split("__")[0] in TEST_SEQUENCES for name in written["test"])
    assert not any(name.split("__")[0] in TEST_SEQUENCES for name in written["train"])
    assert (pairs / "test").is_dir() and len(written["test"]) == len(EXPECTED_PAIRS["0003"])


def test_non_flood_pairs_are_chronological_even_when_keys_are_not(aligned):
    listing = json.loads((aligned / "S1list.json").read_text())["0002"]
    assert listing["1"]["date"] > listing["2"]["date"]  # the writer lists the last date first
    entries = sequence_entries(listing, "0002")
    assert [e.key for e in entries] == ["2", "3", "1"]
    for first, second, _ in make_pairs(entries):
        assert first.date < second.date


def test_pair_file_holds_both_dates_linear_vh_vv(aligned, pairs):
    files = chronological_files(aligned, "0001")
    path = pairs / "train" / f"0001__{files[0]}__{files[2]}__1.npy"
    pair = np.load(path)
    assert pair.shape == (2, 2, 512, 512) and pair.dtype == np.float32
    for date, name in enumerate((files[0], files[2])):
        for channel, pol in enumerate(("VH", "VV")):
            with rasterio.open(aligned / "0001" / f"{name}_corrected_{pol}.tif") as src:
                np.testing.assert_array_equal(pair[date, channel], src.read(1))
    assert 0 < float(np.median(pair)) < 1  # linear power, not dB


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("True", True), ("False", False),
                                             ("true", True), (" FALSE ", False), (1, True), (0, False),
                                             ("1", True), ("0", False)])
def test_parse_bool_accepts(value, expected):
    assert parse_bool(value, "x") is expected


@pytest.mark.parametrize("value", ["yes", "", 2, None, 0.5, "Flooded"])
def test_parse_bool_rejects(value):
    with pytest.raises(DataError, match="S1list.json sequence 0042 entry '3' field FLOODING"):
        sequence_entries({"3": {"date": "2019-01-01", "filename": "f", "FLOODING": value}}, "0042")


def test_bad_boolean_through_the_cli(aligned, tmp_path, capsys):
    listing = json.loads((aligned / "S1list.json").read_text())
    listing["0002"]["2"]["FLOODING"] = "maybe"
    (tmp_path / "S1list.json").write_text(json.dumps(listing))
    args = [str(aligned), str(tmp_path / "S1list.json"), str(tmp_path / "out"), "--test_fraction", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: S1list.json sequence 0002 entry '2'") and "'maybe'" in err
    assert main([*args, "--skip_bad", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "1 bad entries" in out and "train: 8 pairs" in out  # 0002 keeps one pair of its two dates


def test_bad_entries_and_missing_fields():
    with pytest.raises(DataError, match="entry '1': missing field"):
        sequence_entries({"1": {"date": "2019-01-01", "FLOODING": False}}, "0001")
    with pytest.raises(DataError, match="date '01/02/2019' is not YYYY-MM-DD"):
        sequence_entries({"1": {"date": "01/02/2019", "filename": "f", "FLOODING": False}}, "0001")
    twice = {k: {"date": "2019-01-0" + k, "filename": "f", "FLOODING": False} for k in ("1", "2")}
    with pytest.raises(DataError, match="already listed"):
        sequence_entries(twice, "0001")


def test_missing_aligned_file_names_sequence_and_file(aligned, tmp_path):
    root = copy_tree(aligned, tmp_path / "aligned")
    name = chronological_files(root, "0003")[1]
    (root / "0003" / f"{name}_corrected_VV.tif").unlink()
    with pytest.raises(DataError, match=rf"sequence 0003: S1 file .*{name}_corrected_VV.tif .*does not exist"):
        prepare_pairs(root, root / "S1list.json", tmp_path / "out", [])
    counts = prepare_pairs(root, root / "S1list.json", tmp_path / "out2", [], skip_bad=True)
    assert counts["skipped_bad_pairs"] == 1 and counts["train"] == 9


def test_non_finite_pixels_name_the_file(aligned, tmp_path):
    root = copy_tree(aligned, tmp_path / "aligned")
    path = root / "0002" / f"{chronological_files(root, '0002')[0]}_corrected_VH.tif"
    with rasterio.open(path, "r+") as dst:
        power = dst.read(1)
        power[0, 0] = np.inf
        dst.write(power, 1)
    with pytest.raises(DataError, match=rf"{path.name} holds non-finite"):
        read_s1_image(root / "0002", chronological_files(root, "0002")[0])
    with pytest.raises(DataError, match="non-finite"):
        prepare_pairs(root, root / "S1list.json", tmp_path / "out", [])


def test_pairs_not_512_are_skipped_and_counted(aligned, tmp_path):
    root = copy_tree(aligned, tmp_path / "aligned")
    name = chronological_files(root, "0002")[2]
    for pol in ("VH", "VV"):
        path = root / "0002" / f"{name}_corrected_{pol}.tif"
        with rasterio.open(path) as src:
            profile, power = src.profile, src.read(1)
        profile.update(height=500, width=500)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(power[:500, :500], 1)
    counts = prepare_pairs(root, root / "S1list.json", tmp_path / "out", [])
    assert counts["skipped_size"] == 2 and counts["train"] == 8
    assert not list((tmp_path / "out" / "train").glob(f"*{name}*"))


def test_split_options(aligned, tmp_path):
    seqs = [f"{i:04d}" for i in range(1, 21)]
    a = choose_test_sequences(seqs, 0.2, seed=1)
    assert len(a) == 4 and a == choose_test_sequences(seqs, 0.2, seed=1) != choose_test_sequences(seqs, 0.2, 2)
    assert len(choose_test_sequences(seqs[:2], 0.2, 0)) == 1
    with pytest.raises(ConfigError, match="test_fraction"):
        choose_test_sequences(seqs, 1.0, 0)
    listing = tmp_path / "test.csv"
    listing.write_text("# test sequences\n3,extra\n0004\n0999\n\n")
    assert resolve_test_sequences(["0001", "0003", "0004"], listing, 0.2, 0) == ["0003", "0004"]
    # Folders named without zero padding: the same list picks them by value.
    assert resolve_test_sequences(["1", "3", "4"], listing, 0.2, 0) == ["3", "4"]
    listing.write_text("0999\n")
    with pytest.raises(ConfigError, match="none of the 1 sequences"):
        resolve_test_sequences(["0001"], listing, 0.2, 0)


def test_cli_split_file_and_refusal_to_mix_runs(aligned, tmp_path, capsys):
    (tmp_path / "test.txt").write_text("0001\n")
    args = [str(aligned), str(aligned / "S1list.json"), str(tmp_path / "out"), "--test_sequences",
            str(tmp_path / "test.txt")]
    assert main(args) == 0
    assert "test: 5 pairs (4 flood, 1 no flood)" in capsys.readouterr().out
    assert (tmp_path / "out" / "test_sequences.txt").read_text() == "0001\n"
    assert main(args) == 2
    assert "already holds 5 pair files" in capsys.readouterr().err


def test_missing_inputs(aligned, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(aligned / "S1list.json"), str(tmp_path / "out")]) == 2
    assert "aligned root not found" in capsys.readouterr().err
    assert main([str(aligned), str(tmp_path / "S1list.json"), str(tmp_path / "out")]) == 2
    assert "SEN12-FLOOD listing not found" in capsys.readouterr().err
    (tmp_path / "S1list.json").write_text("[1, 2]")
    assert main([str(aligned), str(tmp_path / "S1list.json"), str(tmp_path / "out")]) == 2
    assert "expected an object mapping sequence folders" in capsys.readouterr().err
