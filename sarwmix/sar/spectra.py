"""Phase-free texture of image cells: log power spectra pooled in radial x orientation bins.

The pixel loss of masked image modelling rewards the conditional mean of a hidden cell. Under speckle and
fine texture (crop rows, canopy) the phase of that texture cannot be predicted from the visible cells, so the
mean is what the model learns to predict, and covers that share a backscatter level but differ in texture
look alike to it. The power spectrum of a cell drops the phase and keeps what the texture is: how rough, at
which scale, along which direction. ``MixMIM`` can predict it for every hidden cell besides the pixels
(``--spectral_weight``), in the spirit of predicting hand-made descriptors of masked regions (MaskFeat's HOG).

Bins: the DC term is left out (each cell's mean is removed first); radial frequency in ``n_radial``
log-spaced bins from one cycle per cell (1/p) to the corner of the spectrum (sqrt(1/2) cycles per pixel),
orientation (defined modulo pi) in ``n_angular`` equal bins of [0, pi), starting at frequencies along the
vertical axis. Bins that hold no frequency of a p x p grid (the lowest radial bins are sparse) are dropped, so
every returned feature is informative.
"""
from __future__ import annotations

import math

import torch

from sarwmix.errors import ConfigError


def check_settings(weight: float, bins) -> tuple[int, int]:
    """The (radial, angular) bin counts of a spectral target of ``weight`` (0: off), validated: ConfigError
    naming the bad value otherwise. The one check of ``MixMIM`` and of ``main_pretrain.py``'s flags."""
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ConfigError(f"spectral_weight {weight}: expected a finite number >= 0 (0: off)")
    try:
        n_radial, n_angular = (int(b) for b in bins)
    except (TypeError, ValueError):
        raise ConfigError(f"spectral_bins {bins!r}: expected two integers (radial, angular)") from None
    if n_radial < 1 or n_angular < 1:
        raise ConfigError(f"spectral_bins {bins!r}: expected at least one bin each way")
    return n_radial, n_angular


def spectral_bins(p: int, n_radial: int, n_angular: int) -> torch.Tensor:
    """Averaging matrix (p * (p // 2 + 1), K) from the half-plane power spectrum of ``torch.fft.rfft2`` of a
    p x p cell to its K non-empty bins (each column sums to 1)."""
    if p < 2 or n_radial < 1 or n_angular < 1:
        raise ConfigError(f"spectral bins of {p} px cells, {n_radial} radial x {n_angular} angular: expected a "
                          f"cell of at least 2 px and at least one bin each way")
    fy = torch.fft.fftfreq(p, dtype=torch.float64)[:, None].expand(p, p // 2 + 1)
    fx = torch.fft.rfftfreq(p, dtype=torch.float64)[None, :].expand(p, p // 2 + 1)
    radius = (fy**2 + fx**2).sqrt().flatten()
    # orientation is defined modulo pi: +pi/2 (fx = 0, fy > 0) is the same direction as -pi/2
    angle = torch.remainder(torch.atan2(fy, fx).flatten() + math.pi / 2, math.pi)  # [0, pi)
    edges = torch.logspace(math.log10(1.0 / p), math.log10(math.sqrt(0.5)), n_radial + 1, dtype=torch.float64)
    r_bin = torch.bucketize(radius, edges[1:-1], right=True)
    a_bin = (angle / math.pi * n_angular).long().clamp(0, n_angular - 1)
    onehot = torch.nn.functional.one_hot(r_bin * n_angular + a_bin, n_radial * n_angular).double()
    onehot[radius == 0] = 0.0  # DC
    counts = onehot.sum(0)
    onehot = onehot[:, counts > 0]
    return (onehot / onehot.sum(0, keepdim=True)).float()


def cell_log_spectra(x: torch.Tensor, p: int, bins: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) images -> (B, L, C * K) log mean power of every p x p cell (row-major cells, as
    ``patchify``) in the K bins of ``bins`` (from ``spectral_bins``), channel by channel. Float32 whatever
    the autocast state: bf16 would round the logarithms of small powers."""
    b, c, s, _ = x.shape
    g = s // p
    with torch.autocast(x.device.type, enabled=False):
        cells = x.float().reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, p, p)
        cells = cells - cells.mean(dim=(-2, -1), keepdim=True)
        power = torch.fft.rfft2(cells, norm="ortho").abs().square().flatten(-2)
        binned = power @ bins.to(device=x.device, dtype=torch.float32)
        return torch.log(binned + 1.0e-6).reshape(b, g * g, -1)


def standardise(t: torch.Tensor) -> torch.Tensor:
    """Each feature (last dim) to zero mean and unit variance over the batch and the cells: the log spectra of
    different bins differ in level and spread by orders of magnitude."""
    mean = t.mean(dim=(0, 1), keepdim=True)
    std = t.std(dim=(0, 1), keepdim=True)
    return (t - mean) / (std + 1.0e-6)
