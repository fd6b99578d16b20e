"""Polarisation-aware reconstruction weights (SAR-W-MixMAE).

The encoder sees dB; the weights come from **linear** backscatter ``lin = 10 ** (dB / 10)`` of the raw dB
batch, before any normalisation. With ``x~`` the min-max normalised linear power of one image,
``w = exp(s * (1 - x~))`` lies in ``[1, e^s]``: dark (low-backscatter) pixels weigh more.

- ``per_channel``: min-max per image and channel; each channel gets its own map.
- ``shared_avg``: average the linear power over channels, min-max that map, broadcast to all channels. The
  IGARSS text phrases it as the mean of the channel weights; the released code (and this module) averages
  the linear values before the exponential.
- ``none``: all ones.

``norm`` sets how ``x~`` is normalised: ``minmax`` (the published method) takes the minimum and maximum of
the image, so one bright speckle pixel sets the scale of the whole image and the other pixels all get
weights near ``e^s``; ``percentile`` takes the ``low`` and ``high`` percentiles of the image (of each
channel for ``per_channel``) instead and clips ``x~`` to [0, 1], so the weights stay in ``[1, e^s]``.

The released code applied the weights after ``Normalize(mean, std)`` (z-scores), so its "linear" domain
was ``lin ** (1/std)``. ``zscore_compat=True`` reproduces that for re-running the paper's recipe; it is
never the default.

These settings travel together as one frozen ``WeightSpec``, checked when it is built (``WeightSpec.of`` reads
them from a run's flags); ``weight_map(sar_db, spec)`` computes the map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sarwmix.sar.units import db_to_linear

WEIGHTINGS: tuple[str, ...] = ("none", "per_channel", "shared_avg")
GRANULARITIES: tuple[str, ...] = ("pixel", "token")
WEIGHT_NORMS: tuple[str, ...] = ("minmax", "percentile")
_EPS = 1e-6


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last two axes (H, W); a constant image maps to all zeros."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo + _EPS)


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0-100, linear interpolation as numpy's default) over the last two axes.

    Selects the two order statistics around the percentile with ``topk`` from the nearer end (for the 1st
    or 99th percentile of a 128 x 128 image, the 165 smallest or largest values), several times faster on
    a CPU than a full sort and exact; unlike ``torch.quantile`` it has no limit on the number of elements.
    Returns: (..., 1, 1).
    """
    flat = x.flatten(-2)
    n = flat.shape[-1]
    pos = (n - 1) * q / 100.0
    i = int(pos)
    j = min(i + 1, n - 1)
    if j + 1 <= n - i:  # the smallest j + 1 values, ascending: ranks i and j at positions i and j
        lowest = flat.topk(j + 1, dim=-1, largest=False, sorted=True).values
        a, b = lowest[..., i], lowest[..., j]
    else:  # the largest n - i values, descending: rank r at position n - 1 - r
        highest = flat.topk(n - i, dim=-1, largest=True, sorted=True).values
        a, b = highest[..., n - 1 - i], highest[..., n - 1 - j]
    value = a + (b - a) * (pos - i)
    return value[..., None, None]


def _percentile_norm(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Normalise between the ``low`` and ``high`` percentiles over (H, W), clipped to [0, 1]."""
    lo, hi = percentile(x, low), percentile(x, high)
    return ((x - lo) / (hi - lo + _EPS)).clamp(0.0, 1.0)


def check_weight_norm(norm: str, low: float, high: float) -> None:
    """ValueError unless ``norm`` is known and ``0 <= low < high <= 100``."""
    if norm not in WEIGHT_NORMS:
        raise ValueError(f"weight norm must be one of {WEIGHT_NORMS}, got {norm!r}")
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"weight norm percentiles low={low}, high={high}: expected 0 <= low < high <= 100")


@dataclass(frozen=True)
class WeightSpec:
    """How a run weighs its reconstruction error: every setting of ``weight_map``, checked once when built.

    Attributes:
        weighting: ``none | per_channel | shared_avg``.
        exp_scale: ``s`` in ``exp(s * (1 - x~))``; weights lie in ``[1, e^s]``.
        granularity: ``pixel`` (the released behaviour) or ``token``: the mean of each ``token_size`` x
            ``token_size`` cell, broadcast back to its pixels.
        token_size: the cell of ``token`` granularity in pixels (a SimMIM mask cell, a MixMIM target patch).
        zscore_compat: reproduce the released code's defect (weights from z-scores); ``weight_map`` then
            needs the data set's mean and std.
        norm: ``minmax`` or ``percentile`` (between the ``low`` and ``high`` percentiles, 0-100, of the linear
            power per image and channel, or per image for ``shared_avg``; clipped to [0, 1]).
    Raises:
        ValueError: an unknown weighting, granularity or norm, or percentiles outside ``0 <= low < high <= 100``.
    """

    weighting: str = "per_channel"
    exp_scale: float = 1.0
    granularity: str = "pixel"
    token_size: int = 32
    zscore_compat: bool = False
    norm: str = "minmax"
    low: float = 1.0
    high: float = 99.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"weight granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        check_weight_norm(self.norm, self.low, self.high)

    @classmethod
    def of(cls, config, token_size: int) -> WeightSpec:
        """The weighting flags of a run's configuration (``--weighting``, ``--weight_*``), with the cell of
        ``token`` granularity that the pretraining mode uses."""
        return cls(config.weighting, config.weight_exp_scale, config.weight_granularity, token_size,
                   config.weight_zscore_compat, config.weight_norm, config.weight_norm_low, config.weight_norm_high)

    @property
    def uniform(self) -> bool:
        """Every weight is 1 (``weighting none``): the loss is the plain one."""
        return self.weighting == "none"


DEFAULT_WEIGHTS = WeightSpec()  # the command line's defaults


def weight_map(sar_db: torch.Tensor, spec: WeightSpec = DEFAULT_WEIGHTS, mean: torch.Tensor | None = None,
               std: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel reconstruction weights from a raw dB batch.

    Args:
        sar_db: (B, C, H, W) raw backscatter in dB (not normalised), any float dtype, on any device.
        spec: the weighting, its scale, granularity and norm (``WeightSpec``).
        mean, std: (C,) of the data set in dB; needed by ``spec.zscore_compat`` only.
    Returns:
        (B, C, H, W) float32 weights.
    """
    if spec.uniform:
        return torch.ones_like(sar_db, dtype=torch.float32)
    x = sar_db.float()
    if spec.zscore_compat:
        if mean is None or std is None:
            raise ValueError("zscore_compat weighting needs the dataset mean and std")
        x = (x - mean.view(1, -1, 1, 1).to(x)) / std.view(1, -1, 1, 1).to(x)
    lin = db_to_linear(x)
    if spec.weighting == "shared_avg":
        lin = lin.mean(dim=1, keepdim=True)
    scaled = _minmax(lin) if spec.norm == "minmax" else _percentile_norm(lin, spec.low, spec.high)
    w = torch.exp(spec.exp_scale * (1.0 - scaled)).expand_as(x)
    if spec.granularity == "token":
        w = token_average(w, spec.token_size)
    return w.contiguous()


def token_average(w: torch.Tensor, size: int) -> torch.Tensor:
    """Replace each ``size`` x ``size`` cell of (B, C, H, W) by its mean (token-level weights)."""
    pooled = torch.nn.functional.avg_pool2d(w, size)
    return pooled.repeat_interleave(size, dim=-2).repeat_interleave(size, dim=-1)
