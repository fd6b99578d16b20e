"""Masks of MixMIM and SimMIM as pure tensor functions.

A mask is a 0/1 float tensor over a square token grid, flattened row-major. MixMIM draws one mask for the
whole batch (shape (1, L)); SimMIM draws one per sample (shape (B, L)). All randomness goes through an
optional ``torch.Generator`` so runs and tests are reproducible.
"""
from __future__ import annotations

import math

import torch


def sample_mixing_mask(num_cells: int, mask_ratio: float, range_mask_ratio: float = 0.0,
                       device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """MixMIM mask shared by the batch: ``floor(L * r)`` random cells set to 1.

    ``r = mask_ratio + U(0, range_mask_ratio)``. Args: ``num_cells`` L on the encoder's final grid.
    Returns (1, L) float32 on ``device`` (drawn on the CPU so the sequence does not depend on the device).
    """
    ratio = mask_ratio
    if range_mask_ratio > 0:
        ratio += float(torch.rand((), generator=generator)) * range_mask_ratio
    n_masked = int(math.floor(num_cells * ratio + 1e-9))  # 0.29 * 100 is 28.999999999999996 in floats
    order = torch.rand(num_cells, generator=generator).argsort()
    mask = torch.zeros(num_cells)
    mask[order[:n_masked]] = 1.0
    return mask.unsqueeze(0).to(device)


def sample_simmim_mask(batch: int, num_cells: int, mask_ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM mask, one per sample: exactly ``ceil(L * r)`` cells set to 1 in every row. Returns (B, L)."""
    n_masked = int(math.ceil(num_cells * mask_ratio - 1e-9))  # 0.55 * 100 is 55.000000000000007 in floats
    order = torch.rand(batch, num_cells, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_cells)
    mask.scatter_(1, order[:, :n_masked], 1.0)
    return mask


def upsample_mask(mask: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """Nearest upsampling of (N, grid*grid) to (N, new_grid*new_grid); new_grid a multiple of grid."""
    if new_grid % grid:
        raise ValueError(f"cannot upsample a {grid}x{grid} mask to {new_grid}x{new_grid}")
    r = new_grid // grid
    m = mask.view(-1, grid, grid)
    return m.repeat_interleave(r, dim=1).repeat_interleave(r, dim=2).reshape(mask.shape[0], -1)


def flip_batch(x: torch.Tensor) -> torch.Tensor:
    """Image i takes the place of image B-1-i (MixMIM's partner; an odd batch pairs the middle with itself)."""
    return x.flip(0)


def pixel_mask(mask: torch.Tensor, grid: int, image_size: int) -> torch.Tensor:
    """(N, grid*grid) cell mask -> (N, 1, image_size, image_size) pixel mask."""
    return upsample_mask(mask, grid, image_size).view(mask.shape[0], 1, image_size, image_size)
