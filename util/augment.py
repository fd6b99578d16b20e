"""Augmentation and normalisation applied on the device, batched.

Flips are drawn from a generator seeded by (seed, epoch, iteration), so a resumed run sees exactly the same
augmentation as an uninterrupted one, independent of the number of loader workers.
"""
from __future__ import annotations

import torch

from sarwmix.errors import DataError


def step_generator(seed: int, epoch: int, update: int, micro: int = 0) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, epoch, optimizer update, micro-batch index).

    Each factor exceeds the range of what it multiplies (micro-batches per update = ranks x accum_iter,
    updates per epoch), so no two (update, micro) pairs of a run share a stream.
    """
    g = torch.Generator()
    g.manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + update) * 1_000_037 + micro) % 2**63)
    return g


def random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Independent horizontal and vertical flips per sample (p=0.5 each) of (B, ..., H, W)."""
    b = x.shape[0]
    flips = torch.rand(b, 2, generator=generator) < 0.5
    hflip = flips[:, 0].to(x.device).view(b, *([1] * (x.dim() - 1)))
    vflip = flips[:, 1].to(x.device).view(b, *([1] * (x.dim() - 1)))
    x = torch.where(hflip, x.flip(-1), x)
    return torch.where(vflip, x.flip(-2), x)


def normalize(sar_db: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardise dB per channel: (B, ..., C, H, W) with mean/std of shape (C,)."""
    shape = (1,) * (sar_db.dim() - 3) + (-1, 1, 1)
    return (sar_db - mean.view(shape).to(sar_db)) / std.view(shape).to(sar_db)


def check_finite(sar_db: torch.Tensor, where: str) -> None:
    """Raise DataError naming the first sample of the batch with a NaN or Inf value."""
    bad = ~torch.isfinite(sar_db.flatten(1)).all(dim=1)
    if bad.any():
        idx = int(bad.nonzero()[0])
        raise DataError(f"non-finite value in sample {idx} of the batch at {where}; expected finite dB values")
