"""Fixed 2-D sin-cos position embeddings (MAE layout), Swin's relative-position index, and resizing of
position tables.

Used by the Swin encoder (absolute embedding on the patch grid), the MixMIM decoder (final grid) and the
ViT backbone. Resizing is needed when a checkpoint trained at one input or window size is loaded into a
model built for another.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def relative_position_index(w: int) -> torch.Tensor:
    """Swin's (w*w, w*w) index into a ((2w-1)^2, heads) relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos code of 1-D positions.

    Args:
        dim: output width, even.
        positions: any shape, flattened to (M,).
    Returns:
        (M, dim) float64: first half sines, second half cosines, frequencies 1 / 10000^(k / (dim/2)).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    freqs = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), freqs)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """2-D sin-cos embedding of a grid, row-major, in MAE's layout.

    MAE builds ``meshgrid(w, h)`` and encodes its first plane (the column index) into the first half of
    the channels and the row index into the second half; released checkpoints depend on this order.

    Returns:
        (gh * gw, dim) float32.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def resize_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a (1, H*W, C) square-grid position embedding to ``new_grid``."""
    n = pos.shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if (side, side) == tuple(new_grid):
        return pos
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos.dtype)


def resize_rel_pos_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """Adapt a relative-position bias table ((2w-1)^2, heads) of window ``w`` to ``new_window``.

    A smaller window (a stage grid clamped by a smaller input) keeps the centre of the table: the tokens
    are as large as in pretraining, so every offset the new window holds keeps its learned bias exactly.
    A larger window has offsets never trained: the table is resampled bicubically, as Swin does.
    """
    n, heads = table.shape
    side = int(round(n**0.5))
    new_side = 2 * new_window - 1
    if side == new_side:
        return table
    if new_side < side:
        lo = (side - new_side) // 2
        grid = table.reshape(side, side, heads)[lo:lo + new_side, lo:lo + new_side]
        return grid.reshape(new_side * new_side, heads).contiguous()
    grid = table.T.reshape(1, heads, side, side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)
