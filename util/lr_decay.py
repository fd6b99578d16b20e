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


def regroup_optimizer_state(optimizer, model: nn.Module, saved: dict, saved_order: list[str]) -> dict | None:
    """``saved`` (an optimizer state of another group layout) re-indexed for ``optimizer``, or None.

    A checkpoint of another code base (the released pretraining files) may split the same parameters into
    weight-decay groups in another order or by another rule. Its groups number the parameters in the saving
    model's registration order (``saved_order``, the order of its state dict). Each candidate rule (1-D,
    bias and the model's no-weight-decay names exempt, or only 1-D and bias) assigns every name to the saved
    group of the matching ``weight_decay``; a rule is taken only when it reproduces every group's size and
    every moment's shape, so a wrong guess is refused rather than loaded onto the wrong parameters.
    """
    groups = saved.get("param_groups") or []
    decays = [g.get("weight_decay") for g in groups]
    if not groups or len(set(decays)) != len(decays):  # two groups with the same decay: not separable
        return None
    params = dict(model.named_parameters())
    names = [n for n in saved_order if n in params and params[n].requires_grad]
    if len(names) != sum(len(g["params"]) for g in groups):
        return None
    skips = {frozenset(getattr(model, "no_weight_decay", lambda: set())()), frozenset()}
    for skip in skips:
        if len(groups) == 1:
            members = [names]
        else:
            members = [[n for n in names if no_decay(n, params[n], skip) == (g["weight_decay"] == 0)]
                       for g in groups]
        if [len(m) for m in members] != [len(g["params"]) for g in groups]:
            continue
        name_of = {i: n for g, m in zip(groups, members) for i, n in zip(g["params"], m)}
        state = saved.get("state", {})
        if any(tuple(s["exp_avg"].shape) != tuple(params[name_of[i]].shape)
               for i, s in state.items() if i in name_of and "exp_avg" in s):
            continue
        index_of = {n: i for i, n in name_of.items()}
        by_id = {id(p): n for n, p in params.items()}
        ours = optimizer.state_dict()
        regrouped = {}
        for group, indexed in zip(optimizer.param_groups, ours["param_groups"]):
            for p, i in zip(group["params"], indexed["params"]):
                j = index_of.get(by_id.get(id(p)))
                if j in state:
                    regrouped[i] = state[j]
        return {"state": regrouped, "param_groups": ours["param_groups"]}
    return None
