"""Plain ViT backbone for SimMIM pretraining and token-dropping (Patch Sampling Schedule) finetuning.

- Patch embedding: ``nn.Unfold`` (p x p patches, channel-major ``(c, i, j)`` per patch) followed by one
  ``Linear`` -- the seed's layout; it computes the same function as a stride-p convolution.
- No CLS token: pretraining encodes the patch tokens only; a classifier pools by the token mean.
- Position: a fixed 2-D sin-cos absolute embedding (``abs_pos``, default) and/or a learned relative-position
  bias per block (``rel_pos``, BEiT style; the PSS work reports it helps token dropping, because a bias indexed
  by relative offsets stays meaningful for any subset of kept tokens).
- ``forward_features(x, keep_idx)`` encodes only the tokens at ``keep_idx``; ``forward(x, rho=r)`` keeps the
  ``ceil(r * N)`` tokens of largest patch-embedding norm (``util.pss``; the Patch Sampling Schedule of
  PSS sets ``r`` per iteration). ``rho=None`` or 1.0 is the plain ViT, bit for bit.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from models_swin import init_head, init_linear_and_norm
from sarwmix.errors import ConfigError
from util.pos_embed import relative_position_index, sincos_2d
from util.pss import select_tokens


class UnfoldPatchEmbed(nn.Module):
    """(B, C, S, S) -> (B, (S/p)^2, D): cut p x p patches with Unfold, project each with one Linear."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.unfold = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self.proj = nn.Linear(in_chans * patch_size * patch_size, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.unfold(x).transpose(1, 2))


class RelativePositionBias(nn.Module):
    """Learned bias per head and relative offset on a g x g token grid: a ((2g-1)^2, heads) table."""

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        # Not persistent: it is a function of the grid, rebuilt when a checkpoint is loaded at another size.
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(1, heads, L, L) bias, or (B, heads, K, K) between the kept tokens ``keep_idx`` (B, K)."""
        n = self.grid * self.grid
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (heads, L, L)
        if keep_idx is None:
            return bias.unsqueeze(0)
        return bias[:, keep_idx[:, :, None], keep_idx[:, None, :]].transpose(0, 1)


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive bias (the relative-position bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C); bias: broadcastable to (B, heads, N, N) or None."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block; with ``rel_grid`` it owns a relative-position bias for that grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, rel_grid: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.rel_pos = RelativePositionBias(rel_grid, num_heads) if rel_grid else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        bias = None if self.rel_pos is None else self.rel_pos(keep_idx)
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT without CLS token.

    Args:
        img_size: input side in pixels, a multiple of ``patch_size``.
        abs_pos / rel_pos: fixed sin-cos absolute embedding / learned relative bias per block.
        num_classes: 0 for a backbone (``head`` is Identity), else a Linear head on the mean token
            (trunc-normal 0.02, zero bias: the first logits start near 0, as the Swin finetune head).
    Shapes: ``forward_features`` maps (B, C, S, S) to (B, K, embed_dim), K = (S/p)^2 or ``keep_idx``'s K.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 2, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, abs_pos: bool = True, rel_pos: bool = False,
                 num_classes: int = 0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"input_size {img_size} is not a multiple of the ViT patch size {patch_size}")
        if not (abs_pos or rel_pos):
            raise ConfigError("a ViT needs a position signal: abs_pos, rel_pos or both")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = self.num_features = embed_dim
        self.encoder_stride = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = UnfoldPatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.grid**2, embed_dim), requires_grad=False)
                          if abs_pos else None)
        # On the CPU even under a meta default device (util.export_backbone builds its reference there).
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], self.grid if rel_pos else None)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.grad_ckpt = False
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's init: xavier-uniform Linear, zero bias, LayerNorm 1/0; bias tables trunc-normal(0.02)."""
        if self.pos_embed is not None:
            self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.embed_dim, self.grid)))
        for m in self.modules():
            init_linear_and_norm(m)
            if isinstance(m, RelativePositionBias):
                trunc_normal_(m.table, std=0.02)
        if isinstance(self.head, nn.Linear):
            init_head(self.head)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, L, D) patch tokens, before any position signal."""
        return self.patch_embed(x)

    def forward_tokens(self, tokens: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Add position, keep the tokens at ``keep_idx`` (B, K) if given, run the blocks, final norm."""
        x = tokens if self.pos_embed is None else tokens + self.pos_embed
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            if self.grad_ckpt and x.requires_grad:
                x = checkpoint(blk, x, keep_idx, use_reentrant=False)
            else:
                x = blk(x, keep_idx)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None,
                         rho: float | None = None) -> torch.Tensor:
        """(B, C, S, S) -> (B, K, D).

        Args:
            keep_idx: (B, K) long indices into the (S/p)^2 token grid, or None.
            rho: keep the ``ceil(rho * N)`` tokens of largest patch-embedding norm (``util.pss``); ignored
                when ``keep_idx`` is given; None or 1.0 keeps all.
        """
        tokens = self.embed(x)
        if keep_idx is None and rho is not None:
            keep_idx = select_tokens(tokens, rho)
        return self.forward_tokens(tokens, keep_idx)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Mean over the (kept) tokens, then the head: (B, K, D) -> (B, num_classes) (or (B, D))."""
        return self.head(feats.mean(dim=1))

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None,
                rho: float | None = None) -> torch.Tensor:
        """(B, C, S, S) -> (B, num_classes) logits (or (B, D) pooled features for a backbone)."""
        return self.forward_head(self.forward_features(x, keep_idx, rho))

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_layers(self) -> int:
        """Largest layer-decay id (final norm and head): ``depth + 1``."""
        return len(self.blocks) + 1

    def layer_id(self, name: str) -> int:
        """Layer-decay id of a parameter (``vit_layer_id``); the hook ``util.lr_decay.param_groups`` uses."""
        return vit_layer_id(name, len(self.blocks))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_ckpt = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", *(f"blocks.{i}.rel_pos.table" for i, b in enumerate(self.blocks) if b.rel_pos)}


def vit_layer_id(name: str, depth: int) -> int:
    """Depth id for layer-wise lr decay: embeddings 0, ``blocks.i`` i+1, final norm and head ``depth + 1``."""
    if name.startswith(("patch_embed", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class MaskedPatchHead(nn.Module):
    """The seed's light head: an MLP (D -> D -> p*p*C) applied to the masked tokens only.

    Returns (B, L, p*p*C) in ``models_mixmim.patchify``'s layout with zeros at visible tokens, so that a
    masked loss sees exactly the predictions of the masked patches.
    """

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int) -> None:
        super().__init__()
        self.mlp = Mlp(embed_dim, embed_dim, patch_size * patch_size * in_chans, act_layer=nn.GELU)

    def forward(self, z: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """z: (B, L, D) encoded tokens; token_mask: (B, L) 0/1, 1 = masked."""
        sel = token_mask.bool()
        pred = self.mlp(z[sel])  # (n_masked_total, p*p*C)
        out = pred.new_zeros(*z.shape[:2], pred.shape[-1])
        return out.index_put((sel,), pred)


# Sizes users type as --model (patch 16). Tiny/small suit CPU work at 64-128 px; ViT-S is DeiT-S's shape and
# ViT-B the seed-003 model. ``_rel``: relative-position bias instead of the absolute sin-cos embedding.
VIT_CONFIGS: dict[str, dict] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_tiny_rel": {"embed_dim": 192, "depth": 12, "num_heads": 3, "abs_pos": False, "rel_pos": True},
    "vit_small_rel": {"embed_dim": 384, "depth": 12, "num_heads": 6, "abs_pos": False, "rel_pos": True},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_base_rel": {"embed_dim": 768, "depth": 12, "num_heads": 12, "abs_pos": False, "rel_pos": True},
}


def build_vit(name: str, **kwargs) -> VisionTransformer:
    """A ViT by name, e.g. ``build_vit("vit_small", img_size=128, in_chans=2, num_classes=19)``."""
    if name not in VIT_CONFIGS:
        raise ConfigError(f"unknown ViT {name!r}; choices: {', '.join(VIT_CONFIGS)}")
    return VisionTransformer(**{"patch_size": 16, **VIT_CONFIGS[name], **kwargs})


vit_tiny = partial(build_vit, "vit_tiny")
vit_small = partial(build_vit, "vit_small")
vit_base = partial(build_vit, "vit_base")
