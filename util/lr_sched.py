"""Per-iteration learning-rate schedule: linear warmup, then half-cycle cosine down to ``min_lr``."""
from __future__ import annotations

import math

import torch


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Learning rate at a fractional epoch (``epoch = e + i / iters_per_epoch``)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * lr_scale`` (layer-wise decay groups carry their own scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
