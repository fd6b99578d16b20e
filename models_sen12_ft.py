"""Flood-change model for SEN12-FLOOD pairs: shared Swin encoder over tiles, |f1 - f2|, head.

Each image of a pair (512x512 in the released setting) is cut into tiles of the encoder's input size
(16 tiles of 128). All tiles of both dates go through the one encoder in a single batch; each tile gives
its average-pooled feature; the change signal of a tile is ``|f1 - f2|``; ``patch_op`` pools the tiles
(``avg`` or ``max``); a Linear head gives the 2 logits (no flood, flood). The encoder is imported from
``models_mixmim``; the state dict matches ``tests/data/compat/finetune_sen12flood_mixmim_base.json``.
"""
from __future__ import annotations

import torch
from torch import nn

from models_mixmim_ft import LayerDecayMixin, split_kwargs
from models_swin import SwinEncoder, init_head

PATCH_OPS: tuple[str, ...] = ("avg", "max")


def cut_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, C, tile, tile), tiles in row-major order, T = (H / tile) * (W / tile)."""
    n, c, h, w = x.shape
    if h % tile or w % tile:
        raise ValueError(f"image of {h}x{w} px cannot be cut into whole tiles of {tile} px")
    x = x.view(n, c, h // tile, tile, w // tile, tile).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // tile) * (w // tile), c, tile, tile)


class Sen12FloodFT(LayerDecayMixin, SwinEncoder):
    """Pairwise flood classifier on a shared Swin encoder.

    Args:
        num_classes: head outputs (2: no flood / flood).
        patch_op: ``avg`` or ``max`` pooling of the per-tile ``|f1 - f2|`` features.
        **encoder_kwargs: ``SwinEncoder`` arguments; ``img_size`` is the tile size (128 released).
    Shapes: ``forward`` maps a normalised dB pair (B, 2 dates, C, H, W), H and W multiples of
    ``img_size``, to (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 2, patch_op: str = "avg", **encoder_kwargs) -> None:
        if patch_op not in PATCH_OPS:
            raise ValueError(f"patch_op {patch_op!r}: expected one of {PATCH_OPS}")
        super().__init__(**encoder_kwargs)
        self.num_classes, self.patch_op = num_classes, patch_op
        self.head = nn.Linear(self.num_features, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        init_head(self.head)

    def tile_features(self, pair: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, H, W) -> (B, 2, T, num_features): average-pooled encoder feature of every tile."""
        b, dates, c, h, w = pair.shape
        tiles = cut_tiles(pair.reshape(b * dates, c, h, w), self.img_size)  # (B*2, T, C, s, s)
        t = tiles.shape[1]
        feats = self.forward_features(tiles.reshape(b * dates * t, c, self.img_size, self.img_size))
        return feats.mean(dim=1).view(b, dates, t, -1)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, H, W) normalised dB pair -> (B, num_classes) logits."""
        if pair.dim() != 5 or pair.shape[1] != 2:
            raise ValueError(f"expected a pair batch (B, 2, C, H, W), got shape {tuple(pair.shape)}")
        f = self.tile_features(pair)
        change = (f[:, 0] - f[:, 1]).abs()  # (B, T, D): per-tile change between the dates
        pooled = change.mean(dim=1) if self.patch_op == "avg" else change.amax(dim=1)
        return self.head(pooled)


def build_sen12_ft(name: str, num_classes: int = 2, patch_op: str = "avg", **kwargs) -> Sen12FloodFT:
    """Build the SEN12-FLOOD model by encoder name, e.g. ``build_sen12_ft("mixmim_base", img_size=128)``."""
    enc, rest = split_kwargs(name, kwargs)
    return Sen12FloodFT(num_classes=num_classes, patch_op=patch_op, **enc, **rest)
