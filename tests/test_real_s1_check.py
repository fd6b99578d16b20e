"""analysis.real_s1_check: masked reconstruction error of checkpoints against the mean and random-init baselines."""
from pathlib import Path

import numpy as np
import pytest
import torch

import pretraining
from analysis import real_s1_check as R
from modes import MODES
from sarwmix.data.geotiff import utm_transform, write_band
from util.config import plain_dict
from util.masking import pixel_mask

TINY = ["--model", "mixmim_tiny", "--input_size", "64"]


def _checkpoint(tmp_path: Path, *extra: str) -> Path:
    args = pretraining.parse_args([*TINY, *extra])
    torch.manual_seed(1)
    model = MODES[args.mode].model(args)
    path = tmp_path / f"checkpoint_{args.mode}.pth"
    torch.save({"model": model.state_dict(), "args": plain_dict(args), "epoch": 0,
                "stats": {"name": "benv1", "mean": [-19.2309, -12.5951], "std": [3.2, 2.9]}}, path)
    return path


def _fake_real_data(root: Path) -> Path:
    """Two BigEarthNet v2 patch folders and one 264 px SSL4EO acquisition, in their layouts."""
    rng = np.random.default_rng(0)
    for k in range(2):
        folder = root / "BigEarthNet-S1" / "S1A_X" / f"S1A_X_33UUP_{k}_0"
        for pol, level in (("VH", -18.0), ("VV", -11.0)):
            band = (level + 3 * rng.standard_normal((120, 120))).astype(np.float32)
            write_band(folder / f"{folder.name}_{pol}.tif", band)
    product = root / "ssl4eo" / "0000001" / "S1A_Y"
    for pol, level in (("VH", -17.0), ("VV", -10.0)):
        band = (level + 3 * rng.standard_normal((264, 264))).astype(np.float32)
        write_band(product / f"{pol}.tif", band, crs="EPSG:4326", transform=utm_transform(0.0, 0.0, 1e-4))
    return root


def test_reads_both_layouts_and_crops(tmp_path):
    patches, names = R.read_real_patches(_fake_real_data(tmp_path))
    assert patches.shape == (2 + 4, 2, 120, 120) and len(names) == 6
    assert (patches[:, 0].mean((1, 2)) < patches[:, 1].mean((1, 2))).all()  # VH darker than VV


def test_mixmim_rows_and_the_norm_pix_mean_baseline(tmp_path):
    patches, _ = R.read_real_patches(_fake_real_data(tmp_path / "data"))
    rows = {r["predictor"]: r for r in R.check_checkpoint(_checkpoint(tmp_path), patches)}
    assert set(rows) == set(R.PREDICTORS) and rows["model"]["n_patches"] == 6  # even: MixMIM pairs images
    # per-patch standardised targets: the constant 0 scores their mean square, (P-1)/P with the unbiased var
    assert rows["mean"]["loss_unweighted"] == pytest.approx(1.0, abs=1e-3)
    assert rows["mean"]["loss_weighted"] > rows["mean"]["loss_unweighted"]  # weights >= 1
    assert rows["model"]["loss_unweighted"] != rows["random_init"]["loss_unweighted"]
    assert all(np.isfinite([r["loss_unweighted"], r["loss_weighted"]]).all() for r in rows.values())


def test_a_spectral_checkpoint_is_scored_on_its_pixel_loss(tmp_path):
    patches, _ = R.read_real_patches(_fake_real_data(tmp_path / "data"))
    path = _checkpoint(tmp_path, "--spectral_weight", "100", "--spectral_bins", "4", "2")
    rows = {r["predictor"]: r for r in R.check_checkpoint(path, patches)}
    # its own model, rebuilt from the recorded flags, with the spectral head; the pixel term alone is reported
    model, _, stats = R.build_from_checkpoint(path)
    assert model.decoder_spec is not None
    x = R.normalize(torch.stack([R.resize_db(torch.from_numpy(p), 64) for p in patches]),
                    torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    with torch.no_grad():
        full, _, _, terms = model(x, mask=model(x, generator=torch.Generator().manual_seed(0)).mask)
    assert rows["model"]["loss_unweighted"] == pytest.approx(float(terms["pixel_loss"]), rel=1e-5)
    assert float(full) > rows["model"]["loss_unweighted"] + 1.0  # the weight-100 spectral term left out
    assert rows["mean"]["loss_unweighted"] == pytest.approx(1.0, abs=1e-3)  # the same scale as the model's


def test_simmim_mean_baseline_is_the_visible_mean(tmp_path):
    ckpt = _checkpoint(tmp_path, "--mode", "simmim", "--loss", "l1")
    model, config, stats = R.build_from_checkpoint(ckpt)
    assert (config.mode, config.loss, config.spectral_weight) == ("simmim", "l1", 0.0)  # recorded, and defaults
    x = torch.randn(3, 2, 64, 64)
    mask = model.sample_mask(3, torch.device("cpu"), torch.Generator().manual_seed(0))
    m = pixel_mask(mask, model.mask_grid, 64).float()
    vis_mean = (x * (1 - m)).sum((-2, -1), keepdim=True) / (1 - m).sum((-2, -1), keepdim=True)
    expected = ((x - vis_mean).abs() * m).sum() / m.sum() / 2
    got = model.forward_loss(x, R.mean_prediction(model, x, mask), mask)[0]
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


def test_cli_writes_csv_and_markdown(tmp_path):
    data = _fake_real_data(tmp_path / "data")
    assert R.main([str(_checkpoint(tmp_path)), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "real_s1_check.csv").read_text().startswith("checkpoint,mode,model,predictor")
    assert "| random_init |" in (tmp_path / "out" / "real_s1_check.md").read_text()
    assert R.main([str(_checkpoint(tmp_path)), "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


def test_on_the_real_patches(tmp_path, real_s1):
    patches, _ = R.read_real_patches(real_s1)
    rows = R.check_checkpoint(_checkpoint(tmp_path), patches)
    assert len(rows) == 3 and rows[0]["n_patches"] % 2 == 0
