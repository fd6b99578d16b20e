"""Optimizer parameter groups: weight-decay exemptions and layer-wise learning-rate decay."""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn


def no_decay(name: str, param, skip: set[str]) -> bool:
    """1-D tensors (norms, biases), position embeddings and the mask token get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: nn.Module, weight_decay: float, layer_id: Callable[[str], int] | None = None,
                 num_layers: int = 0, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups.

    Args:
        layer_id: maps a parameter name to its depth id 0..num_layers (the model's hook); with
            ``layer_decay < 1`` group ``i`` gets ``lr_scale = layer_decay ** (num_layers - i)``.
    Returns:
        groups with ``params``, ``weight_decay`` and ``lr_scale``; frozen parameters are left out.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name) if layer_id is not None else num_layers
        nd = no_decay(name, p, skip)
        g = groups.setdefault((lid, nd), {
            "params": [], "weight_decay": 0.0 if nd else weight_decay,
            "lr_scale": layer_decay ** (num_layers - lid), "layer_id": lid,
        })
        g["params"].append(p)
    return list(groups.values())
