"""The one way to put pretrained (or finetuned) weights into a model: filter, resize, check, load.

``load_pretrained`` works for any model of the project built on ``SwinEncoder`` or on ``models_vit``:

1. keys of a DDP-wrapped save lose their ``module.`` prefix;
2. the pretraining-only keys are dropped (``mask_token``, ``decoder_*``) and, unless ``keep_head``, the
   checkpoint's own head, which belongs to another task;
3. tensors that depend on the input or window size are adapted to the model: the absolute position
   embedding is resampled to the model's grid, every relative-position bias table to the model's window
   (the ViT's to its token grid), ``relative_position_index`` is rebuilt for that window, and the ViT's
   fixed sin-cos ``pos_embed`` is the model's own;
4. the remaining keys must fit exactly: no unexpected key, no shape mismatch, and the missing keys must
   be exactly the head's (none with ``keep_head``). Any other difference is a CheckpointError naming the
   offending keys.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from sarwmix.errors import CheckpointError
from util.checkpoint import check_shapes, checkpoint_args, load_checkpoint, model_state
from util.pos_embed import relative_position_index, resize_pos_embed, resize_rel_pos_table

log = logging.getLogger("sarwmix")

# Keys that exist only in pretraining models (MixMIM decoder and mask token, SimMIM decoder).
PRETRAIN_ONLY = re.compile(r"^(mask_token$|decoder[._])")
HEAD_PREFIX = "head."
VIT_POS_EMBED = "pos_embed"  # models_vit: fixed (not trained) sin-cos embedding of the token grid
REL_TABLES = ("relative_position_bias_table", "rel_pos.table")  # Swin's per window, the ViT's per grid


def filter_state(state: dict[str, torch.Tensor], keep_head: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop ``module.`` prefixes, pretraining-only keys and (unless ``keep_head``) the head.

    A SimMIM pretraining state (``mask_token``, ``encoder.*``, ``decoder.*``) loses the ``encoder.`` prefix,
    so a SimMIM run's ``checkpoint.pth`` finetunes like its exported backbone.

    Returns:
        (kept state, sorted dropped key names).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    body = [k for k in state if not PRETRAIN_ONLY.match(k)]
    if body and all(k.startswith("encoder.") for k in body):
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
    kept, dropped = {}, []
    for key, value in state.items():
        if PRETRAIN_ONLY.match(key) or (not keep_head and key.startswith(HEAD_PREFIX)):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, sorted(dropped)


def _side(n: int, key: str, source: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{source}: {key!r} has {n} rows, not a square grid")
    return side


def adapt_to_model(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Resize size-dependent tensors of ``state`` in place to the shapes of ``model``.

    Returns:
        names of the keys that were resized or rebuilt, each with its old and new shape.
    """
    own = model.state_dict()
    changed = []
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        target = own[key].shape
        if key.endswith("absolute_pos_embed") and value.shape[-1] == target[-1]:
            side = _side(target[1], key, source)
            state[key] = resize_pos_embed(value, (side, side))
        elif key == VIT_POS_EMBED and value.shape[-1] == target[-1]:
            state[key] = own[key].clone()  # the ViT's sin-cos table is fixed: the model's own grid is exact
        elif key.endswith(REL_TABLES) and value.shape[1] == target[1]:
            _side(value.shape[0], key, source)
            state[key] = resize_rel_pos_table(value, (_side(target[0], key, source) + 1) // 2)
        elif key.endswith("relative_position_index"):
            state[key] = relative_position_index(_side(target[0], key, source))
        else:
            continue  # a real mismatch: reported by check_shapes
        changed.append(f"{key} {tuple(value.shape)}->{tuple(target)}")
    return changed


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "checkpoint", *,
                    keep_head: bool = False) -> dict:
    """Load ``state`` into ``model`` after filtering and resizing, with an exact key check.

    Args:
        model: a finetune model (head under ``head.``) or any encoder-based model.
        state: a checkpoint's model state dict (pretraining or finetuned).
        source: the file the state came from (named in messages).
        keep_head: load the head too and require every model key (``--eval`` of a finetuned checkpoint);
            otherwise the head is dropped and its keys must be the only missing ones.
    Returns:
        report ``{"dropped": [...], "resized": [...], "missing": [...], "loaded": int}``.
    Raises:
        CheckpointError naming unexpected keys, missing non-head keys or mismatching shapes.
    """
    source = str(source)
    kept, dropped = filter_state(state, keep_head)
    resized = adapt_to_model(model, kept, source)
    own_keys = set(model.state_dict())
    unexpected = sorted(set(kept) - own_keys)
    if unexpected:
        raise CheckpointError(f"{source}: keys not in the model: {_few(unexpected)}; wrong --model or a "
                              f"checkpoint of another architecture?")
    expected_missing = set() if keep_head else {k for k in own_keys if k.startswith(HEAD_PREFIX)}
    missing = own_keys - set(kept)
    if keep_head and missing and missing <= {k for k in own_keys if k.startswith(HEAD_PREFIX)}:
        raise CheckpointError(f"{source}: has no classification head ({_few(sorted(missing))} missing): a "
                              f"pretraining checkpoint? Evaluation needs a finetuned one (*_best.pth); to train "
                              f"a head from a pretraining checkpoint pass it as --finetune")
    check_head(model, kept, source)
    if missing != expected_missing:
        extra = sorted(missing - expected_missing)
        absent = sorted(expected_missing - missing)
        detail = f"missing from the checkpoint: {_few(extra)}" if extra else f"unexpected head keys: {absent}"
        raise CheckpointError(f"{source}: only the head may be missing, but {detail}")
    check_shapes(model, kept, source)
    result = model.load_state_dict(kept, strict=False)
    assert set(result.missing_keys) == missing and not result.unexpected_keys
    report = {"dropped": dropped, "resized": resized, "missing": sorted(missing), "loaded": len(kept)}
    log.info("loaded %d tensors from %s; dropped %d (%s); resized %s; left for training: %s", len(kept),
             source, len(dropped), _few(dropped, 4), resized or "none", sorted(missing) or "none")
    return report


def check_head(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a head whose number of outputs differs from the model's, naming both counts."""
    own = model.state_dict().get(f"{HEAD_PREFIX}weight")
    theirs = state.get(f"{HEAD_PREFIX}weight")
    if own is not None and theirs is not None and theirs.shape[0] != own.shape[0]:
        raise CheckpointError(f"{source}: its head has {theirs.shape[0]} classes, the model's has {own.shape[0]}: "
                              f"a checkpoint of another task or label set (--dataset, --label_set, --nb_classes)?")


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def checkpoint_epoch(path: str | Path, ckpt: dict) -> int | None:
    """Epochs of training behind a checkpoint: N of a ``checkpoint_<N>.pth`` name, else stored epoch + 1."""
    m = re.search(r"checkpoint_(\d+)\.pth$", Path(path).name)
    if m:
        return int(m.group(1))
    epoch = ckpt.get("epoch")
    return int(epoch) + 1 if isinstance(epoch, int) else None


def read_pretrained(path: str | Path, sha256: str | None = None,
                    channels: tuple[str, ...] | None = None) -> dict:
    """Read a checkpoint safely (hash verified when known), checking its recorded channels.

    Args:
        channels: this run's input channels; when the checkpoint records its own (``args.channels``), they
            must be the same, in the same order (a swapped order has the same shapes and would load silently).
    """
    ckpt = load_checkpoint(path, sha256=sha256)
    theirs = checkpoint_args(ckpt).channels
    if channels is not None and theirs is not None and theirs != tuple(channels):
        raise CheckpointError(f"{path}: trained on channels {' '.join(theirs)}, but this run reads "
                              f"{' '.join(channels)}; pass --channels {' '.join(theirs)}")
    return ckpt


def load_pretrained_file(model: nn.Module, path: str | Path, sha256: str | None = None, *,
                         keep_head: bool = False, channels: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """``read_pretrained`` then ``load_pretrained`` its model state.

    Returns:
        (the checkpoint dict, the load report).
    """
    ckpt = read_pretrained(path, sha256, channels)
    report = load_pretrained(model, model_state(ckpt, path), path, keep_head=keep_head)
    return ckpt, report
