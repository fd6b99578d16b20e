"""sarwmix/sar/spectra.py and MixMIM's spectral (phase-free texture) target."""
import math

import pytest
import torch

import models_mixmim as M
from sarwmix.errors import ConfigError
from sarwmix.sar import spectra

P = 32


def _stripes(period: float, vertical: bool, phase: float = 0.0, size: int = P) -> torch.Tensor:
    """(1, 1, size, size) cosine stripes of ``period`` px varying along x (vertical stripes) or y."""
    r = torch.arange(size, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * r / period + phase)
    img = wave[None, :].expand(size, size) if vertical else wave[:, None].expand(size, size)
    return img.float()[None, None]


def _bin_of(period: float, vertical: bool, n_radial: int, n_angular: int) -> int:
    """Column of ``spectral_bins`` holding frequency 1 / period along x (vertical stripes) or y."""
    bins = spectra.spectral_bins(P, n_radial, n_angular)
    fy, fx = (0.0, 1.0 / period) if vertical else (1.0 / period, 0.0)
    col = round(fy * P) % P * (P // 2 + 1) + round(fx * P)
    return int(bins[col].argmax())


def test_bins_average_every_frequency_but_dc_and_drop_empty_bins():
    bins = spectra.spectral_bins(P, 8, 4)
    assert bins.shape[0] == P * (P // 2 + 1)
    torch.testing.assert_close(bins.sum(0), torch.ones(bins.shape[1]))
    assert (bins > 0).sum(0).min() >= 1 and bins.shape[1] <= 8 * 4
    assert bins[0].sum() == 0  # the DC term belongs to no bin
    assert ((bins > 0).sum(1)[1:] == 1).all()  # every other frequency to exactly one bin
    # 1 cycle per cell along x and along y: the lowest radius, different orientations
    assert _bin_of(P, True, 8, 4) != _bin_of(P, False, 8, 4)
    with pytest.raises(ConfigError, match="at least one bin"):
        spectra.spectral_bins(P, 0, 4)


@pytest.mark.parametrize("period", [4.0, 8.0, 16.0])
def test_stripes_put_their_power_in_their_radius_and_orientation(period):
    for vertical in (True, False):
        x = _stripes(period, vertical)
        logs = spectra.cell_log_spectra(x, P, spectra.spectral_bins(P, 8, 4))
        assert logs.shape == (1, 1, spectra.spectral_bins(P, 8, 4).shape[1])
        assert int(logs[0, 0].argmax()) == _bin_of(period, vertical, 8, 4)


def test_spectra_are_phase_free_and_per_cell():
    bins = spectra.spectral_bins(P, 8, 4)
    a = spectra.cell_log_spectra(_stripes(8.0, True), P, bins)
    shifted = spectra.cell_log_spectra(_stripes(8.0, True, phase=1.3), P, bins)
    torch.testing.assert_close(a, shifted, atol=1e-4, rtol=0)
    # two cells side by side, row-major as patchify: each keeps its own texture
    img = torch.cat([_stripes(8.0, True), _stripes(8.0, False)], dim=-1)
    img = torch.cat([img, img.flip(-1)], dim=-2)  # (1, 1, 64, 64): cells v, h / h, v
    two = spectra.cell_log_spectra(img, P, bins)
    horizontal = spectra.cell_log_spectra(_stripes(8.0, False), P, bins)
    torch.testing.assert_close(two[0, [0, 3]], a[0].expand(2, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(two[0, [1, 2]], horizontal[0].expand(2, -1), atol=1e-4, rtol=0)
    # a brighter cell of the same texture: the same spectrum shifted by the log of the power ratio
    torch.testing.assert_close(spectra.cell_log_spectra(3 * _stripes(8.0, True), P, bins)[0, 0].max(),
                               a[0, 0].max() + math.log(9), atol=1e-4, rtol=0)


def test_spectra_stay_float32_under_bf16_autocast():
    x = torch.randn(2, 2, 64, 64)
    bins = spectra.spectral_bins(P, 8, 4)
    plain = spectra.cell_log_spectra(x, P, bins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = spectra.cell_log_spectra(x, P, bins)
    assert cast.dtype == torch.float32 and plain.shape == (2, 4, 2 * bins.shape[1])
    torch.testing.assert_close(cast, plain)


def _model(**kw):
    torch.manual_seed(0)
    return M.mixmim_tiny(img_size=64, norm_pix_loss=False, **kw)


def test_spectral_target_off_keeps_the_released_layout_and_loss():
    plain, off = _model(), _model(spectral_weight=0.0)
    assert not any("spec" in k for k in off.state_dict())
    assert list(plain.state_dict()) == list(off.state_dict())
    x, mask = torch.randn(4, 2, 64, 64), torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    out = off(x, mask=mask)
    assert torch.equal(out.loss, plain(x, mask=mask).loss) and set(out.terms) == {"pixel_loss"}


def test_spectral_loss_adds_to_the_pixel_loss_and_unmixes_like_the_pixels():
    m = _model(spectral_weight=0.5, spectral_bins=(6, 2))
    assert {"decoder_spec.weight", "decoder_spec.bias"} <= set(m.state_dict())
    assert "spectral_bin_matrix" not in m.state_dict()  # rebuilt from the flags, not saved
    x, mask = torch.randn(4, 2, 64, 64), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss, _, _, terms = m(x, mask=mask)
    assert list(terms) == ["pixel_loss", "spectral_loss"] and not any(t.requires_grad for t in terms.values())
    torch.testing.assert_close(loss, terms["pixel_loss"] + 0.5 * terms["spectral_loss"])
    # each image's target in branch 1, its partner's in branch 2 (as the pixels): spectral loss 0
    target = spectra.standardise(spectra.cell_log_spectra(x, 32, m.spectral_bin_matrix))
    pixels = M.patchify(x, 32)
    perfect = torch.cat([target, target.flip(0)])
    terms = m.forward_loss(x, torch.cat([pixels, pixels.flip(0)]), mask, spec_pred=perfect)[2]
    assert terms["spectral_loss"].item() < 1e-10 and terms["pixel_loss"].item() == 0.0
    terms = m.forward_loss(x, torch.cat([pixels, pixels]), mask, spec_pred=torch.cat([target, target]))[2]
    assert terms["spectral_loss"].item() > 0.1


def test_spectral_head_and_encoder_get_gradients():
    m = _model(spectral_weight=1.0).train()
    x = torch.randn(4, 2, 64, 64)
    m(x, generator=torch.Generator().manual_seed(0))[0].backward()
    assert m.decoder_spec.weight.grad.abs().sum() > 0 and m.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, match", [({"spectral_weight": -1.0}, "expected a finite number >= 0"),
                                       ({"spectral_weight": float("nan")}, "expected a finite number >= 0"),
                                       ({"spectral_weight": 1.0, "spectral_bins": (8,)}, "two integers")])
def test_bad_spectral_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        _model(**kw)
