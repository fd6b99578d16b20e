"""Tiled prediction on whole scenes (predict.py, predictor.py, sarwmix/data/scene.py), on seeded synthetic GeoTIFFs.

The georeferencing of the output, the averaging of overlapping windows against the model applied to each
window alone, nodata, the equivalence of input layouts and units, resuming, the three kinds of checkpoint,
one line per bad input, and a finetuned model's map of a scene of two known covers.
"""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from _predict_helpers import (
    ORIGIN,
    finetuned_checkpoint,
    pretrain_checkpoint,
    read_map,
    scene_db,
    write_pol_files,
    write_scene,
)
from rasterio.transform import Affine

import main_finetune
import predict as P
from predictor import load_predictor
from sarwmix.constants import BEN_19_CLASSES
from sarwmix.data.scene import Scene, WindowGrid, detect_units
from sarwmix.data.synthetic import cover_patch
from sarwmix.errors import DataError
from util.config import run_cli


def predict(*argv: str) -> dict:
    return P.main(P.parse_args([*map(str, argv), "--no-progress", "--overwrite"]))


def model_alone(ckpt, windows: list[np.ndarray]) -> np.ndarray:
    """The checkpoint's model on windows cut by hand from the array: (N, bands)."""
    return load_predictor(ckpt, device="cpu")(np.stack(windows))


@pytest.fixture(scope="module")
def ben_ckpt(tmp_path_factory):
    return finetuned_checkpoint(tmp_path_factory.mktemp("ckpt") / "ben.pth")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 250 x 370 px scene (sizes no multiple of the stride) and its pixels."""
    db = scene_db(250, 370, seed=3)
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", db), db


# --- the grid and the georeferencing ------------------------------------------------------------------

@pytest.mark.parametrize("window, stride", [(120, 120), (120, 60), (120, 40)])
def test_output_crs_transform_and_size_follow_the_scene_and_stride(ben_ckpt, scene, tmp_path, window, stride):
    path, _ = scene
    result = predict(ben_ckpt, "--input", path, "--out", tmp_path / "map.tif", "--window", window,
                     "--stride", stride, "--class_map")
    values, prof = read_map(tmp_path / "map.tif")
    assert values.shape == (19, 250 // stride, 370 // stride)
    assert prof["crs"] == rasterio.crs.CRS.from_string("EPSG:32633")
    assert prof["transform"] == ORIGIN @ Affine.scale(stride)
    assert prof["transform"].a == 10.0 * stride and prof["transform"].c == ORIGIN.c
    assert list(prof["descriptions"]) == list(BEN_19_CLASSES) and np.isnan(prof["nodata"])
    assert np.isfinite(values).all() and (values > 0).all() and (values < 1).all()
    n = window // stride
    assert result["windows"] == ((250 - window) // stride + 1) * ((370 - window) // stride + 1)
    assert result["predicted"] == result["windows"] and n >= 1
    classes, cprof = read_map(tmp_path / "map_class.tif")
    np.testing.assert_array_equal(classes[0], values.argmax(0))
    assert cprof["transform"] == prof["transform"] and cprof["nodata"] == 255
    assert (tmp_path / "map.png").stat().st_size > 10_000
    assert not (tmp_path / "map.tif.progress.json").exists()


def test_each_cell_is_the_model_on_its_window_read_alone(ben_ckpt, scene, tmp_path):
    """stride = window: cell (i, j) is the model applied to pixels [i*w, (i+1)*w) x [j*w, (j+1)*w) cut from
    the array by hand; stride = window / 2: the mean of the (up to) four windows that cover it."""
    path, db = scene
    w = 120
    predict(ben_ckpt, "--input", path, "--out", tmp_path / "a.tif", "--window", w)
    a, _ = read_map(tmp_path / "a.tif")
    cut = {(r, c): db[None, :, r * 60:r * 60 + w, c * 60:c * 60 + w] for r in range(3) for c in range(5)}
    alone = dict(zip(cut, model_alone(ben_ckpt, list(cut.values()))))
    for i in range(a.shape[1]):
        for j in range(a.shape[2]):
            np.testing.assert_allclose(a[:, i, j], alone[(2 * i, 2 * j)], atol=1e-5)
    assert a.std(axis=(1, 2)).max() > 1e-3  # the cells differ: a misplaced window would show

    predict(ben_ckpt, "--input", path, "--out", tmp_path / "b.tif", "--window", w, "--stride", 60)
    b, _ = read_map(tmp_path / "b.tif")
    for i in range(b.shape[1]):
        for j in range(b.shape[2]):
            covering = [alone[(r, c)] for r in (i - 1, i) for c in (j - 1, j) if (r, c) in alone]
            np.testing.assert_allclose(b[:, i, j], np.mean(covering, axis=0), atol=1e-5)


def test_a_scene_shifted_by_the_stride_gives_the_same_cells_one_cell_further(ben_ckpt, scene, tmp_path):
    path, db = scene
    s = 40
    shifted = write_scene(tmp_path / "shifted.tif", db[:, s:, s:], transform=ORIGIN @ Affine.translation(s, s))
    for name, src in (("full", path), ("shifted", shifted)):
        predict(ben_ckpt, "--input", src, "--out", tmp_path / f"{name}.tif", "--window", 120, "--stride", s)
    full, fprof = read_map(tmp_path / "full.tif")
    part, pprof = read_map(tmp_path / "shifted.tif")
    assert pprof["transform"] == fprof["transform"] @ Affine.translation(1, 1)  # the same ground, one cell on
    n = 120 // s
    # A cell sees the same windows in both once every window covering it lies inside the shifted scene.
    np.testing.assert_allclose(part[:, n - 1:, n - 1:], full[:, n:, n:][:, :part.shape[1] - n + 1,
                                                                       :part.shape[2] - n + 1], atol=1e-5)


def test_windows_are_read_one_strip_at_a_time(ben_ckpt, tmp_path, monkeypatch):
    """Memory flat in the scene size: no read is larger than one window high and CHUNK_WINDOWS windows wide."""
    monkeypatch.setattr(P, "CHUNK_WINDOWS", 3)
    path = write_scene(tmp_path / "s.tif", scene_db(240, 600, seed=1))
    shapes = []
    read = Scene.read

    def spy(self, row, col, height, width):
        shapes.append((height, width))
        return read(self, row, col, height, width)

    monkeypatch.setattr(Scene, "read", spy)
    predict(ben_ckpt, "--input", path, "--out", tmp_path / "m.tif", "--stride", 60, "--no-quicklook")
    assert max(h for h, _ in shapes) == 120 and max(w for _, w in shapes) == 2 * 60 + 120
    assert len(shapes) == 3 * 3  # 3 rows of 8 windows, each row in chunks of 3, 3, 2


# --- nodata, input layouts, units ---------------------------------------------------------------------

def test_nodata_regions_stay_nodata(ben_ckpt, tmp_path):
    db = scene_db(240, 360, seed=2)
    db[:, :120, :180] = -9999.0  # declared nodata: the top-left 2 x 3 cells of 60 px
    db[:, 150:, 300:] = np.nan  # NaN: the bottom-right corner
    path = write_scene(tmp_path / "s.tif", db, nodata=-9999.0)
    result = predict(ben_ckpt, "--input", path, "--out", tmp_path / "m.tif", "--stride", 60, "--class_map")
    values, _ = read_map(tmp_path / "m.tif")
    classes, _ = read_map(tmp_path / "m_class.tif")
    blank = np.zeros(values.shape[1:], bool)
    blank[:2, :3] = True
    blank[3:, 5:] = True  # rows 180-240, cols 300-360: all NaN (rows 150-180 make row 2 half valid: kept)
    assert np.isnan(values[:, blank]).all() and (classes[0][blank] == 255).all()
    assert np.isfinite(values[:, ~blank]).all() and (classes[0][~blank] < 19).all()
    # windows (0, 0) and (0, 1) lie in the nodata block; (0, 2) is half in it (kept: at most 50 % nodata)
    assert result["skipped"] == 2 and result["predicted"] == result["windows"] - 2


def test_two_files_one_file_any_band_order_and_linear_power_give_the_same_map(ben_ckpt, tmp_path):
    db = scene_db(240, 240, seed=4)
    one = write_scene(tmp_path / "one.tif", db)
    swapped = write_scene(tmp_path / "swapped.tif", db, order=("VV", "VH"))  # described: read by name
    vv, vh = write_pol_files(tmp_path / "two", db)
    bare = write_scene(tmp_path / "bare.tif", db, order=("VV", "VH"), describe=False)
    linear = write_scene(tmp_path / "linear.tif", 10 ** (db / 10))
    runs = {"one": [one], "swapped": [swapped], "two": [vv, vh], "two_reversed": [vh, vv], "linear": [linear]}
    maps = {}
    for name, inputs in runs.items():
        predict(ben_ckpt, "--input", *inputs, "--out", tmp_path / f"{name}.tif", "--stride", 60)
        maps[name] = read_map(tmp_path / f"{name}.tif")[0]
    predict(ben_ckpt, "--input", bare, "--bands", "VV", "VH", "--out", tmp_path / "bare_out.tif", "--stride", 60)
    maps["bare"] = read_map(tmp_path / "bare_out.tif")[0]
    for name in ("swapped", "two", "two_reversed", "bare"):
        np.testing.assert_array_equal(maps[name], maps["one"], err_msg=name)
    np.testing.assert_allclose(maps["linear"], maps["one"], atol=1e-4)  # dB -> linear -> dB rounding only
    # and VV and VH do matter: the same bands declared the other way round give another map
    predict(ben_ckpt, "--input", bare, "--bands", "VH", "VV", "--out", tmp_path / "wrong.tif", "--stride", 60)
    assert np.abs(read_map(tmp_path / "wrong.tif")[0] - maps["one"]).max() > 1e-3


def test_units_are_detected_from_the_values():
    rng = np.random.default_rng(0)
    lin = rng.gamma(4.4, 0.05 / 4.4, 10_000)
    assert detect_units(lin, "x") == "linear"
    assert detect_units(10 * np.log10(lin), "x") == "db"
    with pytest.raises(DataError, match="cannot tell dB from linear power"):
        detect_units(lin * 1000 + 1, "x")
    with pytest.raises(DataError, match="no valid pixel"):
        detect_units(np.array([np.nan]), "x")


def test_window_grid_counts():
    g = WindowGrid(250, 370, 120, 40)
    assert g.n == 3 and g.shape == (6, 9) and g.windows == (4, 7)
    # every cell is covered: the last window ends at the last whole cell
    assert (g.windows[0] - 1) + g.n == g.shape[0] and (g.windows[1] - 1) + g.n == g.shape[1]


# --- restart, other checkpoints -----------------------------------------------------------------------

def test_an_interrupted_run_resumes_to_the_same_file(ben_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "BLOCK_ROWS", 2)
    path = write_scene(tmp_path / "s.tif", scene_db(360, 240, seed=5))
    common = ["--input", path, "--stride", 40, "--no-quicklook", "--class_map"]
    predict(ben_ckpt, *common, "--out", tmp_path / "whole.tif")
    write = P.Outputs.write

    def crash_at_row_5(self, row, values):
        if row == 5:
            raise KeyboardInterrupt
        write(self, row, values)

    monkeypatch.setattr(P.Outputs, "write", crash_at_row_5)
    with pytest.raises(KeyboardInterrupt):
        predict(ben_ckpt, *common, "--out", tmp_path / "cut.tif")
    assert (tmp_path / "cut.tif.progress.json").exists()
    monkeypatch.setattr(P.Outputs, "write", write)
    P.main(P.parse_args([str(ben_ckpt), *map(str, common), "--out", str(tmp_path / "cut.tif"), "--resume",
                         "--no-progress"]))
    for suffix in ("", "_class"):
        whole, cut = read_map(tmp_path / f"whole{suffix}.tif")[0], read_map(tmp_path / f"cut{suffix}.tif")[0]
        np.testing.assert_allclose(cut, whole, atol=1e-5)
    assert not (tmp_path / "cut.tif.progress.json").exists()


def test_sen12flood_model_gives_the_flood_probability_of_each_pair_of_windows(tmp_path):
    before, after = scene_db(128, 192, seed=6), scene_db(128, 192, seed=7)
    a, b = write_scene(tmp_path / "before.tif", before), write_scene(tmp_path / "after.tif", after)
    sen12 = finetuned_checkpoint(tmp_path / "sen12.pth", task="sen12flood", input_size=64, tile_size=32)
    predict(sen12, "--input", a, "--after", b, "--out", tmp_path / "flood.tif")
    flood, prof = read_map(tmp_path / "flood.tif")
    assert flood.shape == (2, 2, 3) and list(prof["descriptions"]) == ["no flood", "flood"]
    np.testing.assert_allclose(flood.sum(0), 1.0, atol=1e-5)
    pair = np.stack([before[:, 64:, 64:128], after[:, 64:, 64:128]])  # window (1, 1): rows 64-128, cols 64-128
    np.testing.assert_allclose(flood[:, 1, 1], model_alone(sen12, [pair])[0], atol=1e-5)

    assert (tmp_path / "flood.png").exists()


@pytest.mark.parametrize("mode, model, dim", [("mixmim", "mixmim_study", 256), ("simmim", "vit_tiny", 192)])
def test_a_pretraining_checkpoint_gives_the_pooled_embedding_of_each_window(tmp_path, mode, model, dim):
    db = scene_db(128, 192, seed=6)
    encoder = pretrain_checkpoint(tmp_path / "pretrain.pth", model=model, mode=mode)
    predict(encoder, "--input", write_scene(tmp_path / "s.tif", db), "--out", tmp_path / "emb.tif", "--window", 64)
    emb, prof = read_map(tmp_path / "emb.tif")
    assert emb.shape == (dim, 2, 3) and prof["descriptions"][0] == "embedding_0"
    assert prof["tags"]["task"] == "encoder" and (tmp_path / "emb.png").exists()
    np.testing.assert_allclose(emb[:, 1, 2], model_alone(encoder, [db[None, :, 64:, 128:]])[0], atol=1e-4)
    assert emb[:, 0, 0].std() > 0 and not np.allclose(emb[:, 0, 0], emb[:, 1, 2])


# --- bad input: one line each -------------------------------------------------------------------------

def _bad_inputs(tmp, ckpt):
    """name -> (argv, words the one error line must hold)."""
    db = scene_db(240, 240, seed=8)
    good = write_scene(tmp / "good.tif", db)
    vv, vh = write_pol_files(tmp / "pair", db)
    moved = write_scene(tmp / "moved" / "S1_VH.tif", db, order=("VH",), describe=False,
                        transform=ORIGIN @ Affine.translation(3, 0))
    other_crs = write_scene(tmp / "crs" / "S1_VH.tif", db, order=("VH",), describe=False, crs="EPSG:32632")
    smaller = write_scene(tmp / "small" / "S1_VH.tif", db[:, :200], order=("VH",), describe=False)
    three = write_scene(tmp / "three.tif", np.concatenate([db, db[:1]]), order=("VH", "VV", "VH"))
    good_moved = write_scene(tmp / "good_moved.tif", db, transform=ORIGIN @ Affine.translation(0, 5))
    bare = write_scene(tmp / "bare.tif", db, describe=False)
    ints = write_scene(tmp / "ints.tif", db, dtype="int16")
    no_crs = write_scene(tmp / "nocrs.tif", db, crs=None)
    bright = write_scene(tmp / "bright.tif", db + 60.0)
    tiny = write_scene(tmp / "tiny.tif", db[:, :100, :100])
    sen12 = finetuned_checkpoint(tmp / "sen12.pth", task="sen12flood")
    (tmp / "notes.pth").write_text("not a checkpoint")
    no_stats = tmp / "released.pth"
    torch.save({k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "stats"}, no_stats)
    out = ["--out", tmp / "out.tif"]
    return {
        "shifted grid": ([ckpt, "--input", vv, moved, *out], ["transform", "same grid"]),
        "other CRS": ([ckpt, "--input", vv, other_crs, *out], ["EPSG:32632", "same grid"]),
        "other size": ([ckpt, "--input", vv, smaller, *out], ["200 x 240", "same grid"]),
        "one band": ([ckpt, "--input", vv, *out], ["has 1 band(s), expected 2 bands"]),
        "three bands": ([ckpt, "--input", three, *out], ["has 3 band(s), expected 2 bands"]),
        "unnamed bands": ([ckpt, "--input", bare, *out], ["no VV/VH description", "--bands"]),
        "one polarisation twice": ([ckpt, "--input", vv, vv, *out], ["expected one VH and one VV"]),
        "integer pixels": ([ckpt, "--input", ints, *out], ["int16", "not digital numbers"]),
        "no CRS": ([ckpt, "--input", no_crs, *out], ["has no CRS"]),
        "unknown units": ([ckpt, "--input", bright, *out], ["cannot tell dB from linear", "--units"]),
        "missing file": ([ckpt, "--input", tmp / "nowhere.tif", *out], ["nowhere.tif: file not found"]),
        "scene under a window": ([ckpt, "--input", tiny, *out],
                                 ["tiny.tif: 100 x 100 px, smaller than one window of 120 px"]),
        "stride not dividing": ([ckpt, "--input", good, "--stride", 50, *out], ["multiple of the stride"]),
        "other task asked": ([ckpt, "--input", good, "--task", "sen12flood", *out],
                             ["a BigEarthNet checkpoint", "--task sen12flood"]),
        "pair model, one date": ([sen12, "--input", good, *out], ["compares two dates", "--after"]),
        "one-image model, two dates": ([ckpt, "--input", good, "--after", good, *out], ["takes no second date"]),
        "dates on two grids": ([sen12, "--input", good, "--after", good_moved, *out],
                               ["good_moved.tif: transform", "but", "good.tif has", "same grid"]),
        "not a checkpoint": ([tmp / "notes.pth", "--input", good, *out], ["not a readable torch checkpoint"]),
        "nodata fraction above 1": ([ckpt, "--input", good, "--max_nodata", 1.5, *out], ["--max_nodata 1.5"]),
        "no statistics": ([no_stats, "--input", good, *out], ["records no normalisation statistics", "--stats"]),
    }



def test_every_bad_input_is_one_line(ben_ckpt, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, ben_ckpt)
    assert len(cases) == 20
    for name, (argv, words) in cases.items():
        with pytest.raises(SystemExit) as exc:
            run_cli(P.main, lambda argv=argv: P.parse_args([*map(str, argv), "--no-progress"]))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert all(w in lines[0] for w in words), (name, lines[0])
    assert not (tmp_path / "out.tif").exists()


# --- a finetuned model on a scene of two known covers -------------------------------------------------

@pytest.fixture(scope="module")
def cover_model(tmp_path_factory):
    """checkpoint_best.pth of mixmim_study finetuned at 64 px on 512 synthetic patches for 8 epochs.

    One thread: on a machine whose cores other jobs share, two threads of small operations wait on each other
    (measured here: 8 minutes instead of 20 s); the suite's thread count is restored afterwards.
    """
    out, threads = tmp_path_factory.mktemp("finetune"), torch.get_num_threads()
    try:
        main_finetune.main(main_finetune.parse_args([
            "--model", "mixmim_study", "--input_size", "64", "--num_samples", "512", "--num_eval_samples", "16",
            "--batch_size", "16", "--epochs", "8", "--warmup_epochs", "1", "--blr", "2e-2", "--drop_path", "0",
            "--layer_decay", "1.0", "--num_workers", "0", "--num_threads", "1", "--no-progress", "--amp", "off",
            "--output_dir", str(out)]))
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoint_best.pth"


@pytest.mark.slow
def test_two_covers_side_by_side_come_out_where_they_are(cover_model, tmp_path):
    """Sea on the left half, coniferous forest on the right: each cover's class is more probable than the other
    cover's on its own side, cell by cell, and its probability is higher on its side than anywhere on the other."""
    db = np.concatenate([cover_patch("Sea and ocean", 11, 480), cover_patch("Coniferous forest", 12, 480)], axis=2)
    path = write_scene(tmp_path / "covers.tif", db)
    predict(cover_model, "--input", path, "--out", tmp_path / "covers_map.tif", "--stride", 60)
    probs, _ = read_map(tmp_path / "covers_map.tif")
    sea, forest = BEN_19_CLASSES.index("Marine waters"), BEN_19_CLASSES.index("Coniferous forest")
    # cells 0-6 lie on the sea, 9-15 on the forest (cells 7 and 8 have windows across the boundary)
    left, right = probs[:, :, :7], probs[:, :, 9:]
    assert (left[sea] > left[forest]).all() and (right[forest] > right[sea]).all()
    assert left[sea].min() > right[sea].max() and right[forest].min() > left[forest].max()
