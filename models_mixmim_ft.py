"""Finetuning model for BigEarthNet: the pretrained Swin encoder, average pooling and a Linear head.

The encoder is ``models_swin.SwinEncoder`` used without a mixing mask (each image attends to itself
only). Parameter names follow the released finetuned checkpoints (``tests/data/compat``), so
``benv1_finetune_checkpoint_best.pth`` loads into ``build_mixmim_ft("mixmim_base", num_classes=19)`` with
``strict=True``.

Layer-wise learning-rate decay needs a depth id per parameter. Both finetune models expose it
through ``layer_id(name)`` and ``num_layers``, computed from the stage depths by ``swin_layer_id``, so the
rule lives in one place and ``util.lr_decay.param_groups`` never guesses from names itself.
"""
from __future__ import annotations

import torch
from torch import nn

from models_swin import SwinEncoder, encoder_kwargs, init_head

# Keyword arguments of SwinEncoder that a finetune factory forwards to ``encoder_kwargs``.
ENCODER_KEYS = frozenset({"img_size", "patch_size", "in_chans", "window_size", "drop_path_rate", "mlp_ratio"})


def swin_layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Depth id of a Swin parameter for layer-wise lr decay.

    Patch embedding and absolute position embedding get 0; block ``k`` (counted over all stages) gets
    ``k + 1``; a stage's downsampling takes the id of the next stage's first block; everything on top of
    the blocks (final norm, head) gets ``sum(depths) + 1``.

    Args:
        name: a parameter name of a finetune model, e.g. ``layers.2.blocks.5.attn.qkv.weight``.
        depths: blocks per stage, e.g. (2, 2, 18, 2).
    Returns:
        an id in ``0 .. sum(depths) + 1``.
    """
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        if parts[2] == "downsample":
            return sum(depths[: stage + 1]) + 1
        raise ValueError(f"unexpected Swin parameter name {name!r}")
    return sum(depths) + 1


class LayerDecayMixin:
    """The hook ``util.lr_decay.param_groups`` is driven by: ``layer_id(name)`` and ``num_layers``."""

    depths: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        """Largest depth id (final norm and head): ``sum(depths) + 1``."""
        return sum(self.depths) + 1

    def layer_id(self, name: str) -> int:
        return swin_layer_id(name, self.depths)

    def encoder_parameter_names(self) -> list[str]:
        """Names of every parameter except the head's (what ``--freeze_encoder`` freezes)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("head.")]


class MixMIMFT(LayerDecayMixin, SwinEncoder):
    """Swin encoder (no attention mask) + mean over the final tokens + Linear head.

    Args:
        num_classes: outputs of the head (19 or 43 for BigEarthNet).
        **encoder_kwargs: ``SwinEncoder`` arguments (``drop_path_rate`` is the stochastic depth).
    Shapes: ``forward`` maps (B, in_chans, S, S) normalised dB to (B, num_classes) logits.
    """

    def __init__(self, num_classes: int = 19, **encoder_kwargs) -> None:
        super().__init__(**encoder_kwargs)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        init_head(self.head)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, num_features): final-norm tokens averaged over the grid."""
        return self.forward_features(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) normalised dB -> (B, num_classes) logits."""
        return self.head(self.forward_pooled(x))


def split_kwargs(name: str, kwargs: dict) -> tuple[dict, dict]:
    """Split factory keyword arguments into (full SwinEncoder kwargs of ``name``, the rest)."""
    enc = encoder_kwargs(name, **{k: v for k, v in kwargs.items() if k in ENCODER_KEYS})
    return enc, {k: v for k, v in kwargs.items() if k not in ENCODER_KEYS}


def build_mixmim_ft(name: str, num_classes: int = 19, **kwargs) -> MixMIMFT:
    """Build a BigEarthNet finetune model by encoder name, e.g. ``build_mixmim_ft("mixmim_base", 19)``.

    Args:
        name: a key of ``models_swin.ENCODER_CONFIGS`` (ConfigError listing the choices otherwise).
        num_classes: head outputs.
        **kwargs: encoder overrides (``img_size``, ``in_chans``, ``drop_path_rate``, ...).
    """
    enc, rest = split_kwargs(name, kwargs)
    return MixMIMFT(num_classes=num_classes, **enc, **rest)
