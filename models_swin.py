"""The Swin encoder every model of the project shares: MixMIM pretraining, SimMIM with the project's Swin,
and the BigEarthNet and SEN12-FLOOD classifiers.

A hierarchical Swin with plain (non-shifted) window attention and a fixed sin-cos absolute position
embedding. Its attention takes an optional mixing mask: inside every window, a token attends only to tokens
of its own source image (MixMIM), which costs nothing when no mask is given. Parameter names, shapes and
numerics follow the released SAR-W-MixMAE checkpoints, so their encoders load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch.utils.checkpoint import checkpoint

from sarwmix.errors import ConfigError
from util.pos_embed import relative_position_index, sincos_2d

# Per-stage attention windows of every mixmim_* encoder (a window larger than its stage grid is clamped).
SWIN_WINDOWS: tuple[int, ...] = (8, 8, 8, 4)
# Large negative logit for token pairs from different source images (exp() underflows to exactly 0).
MASKED_LOGIT = -1e30


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).transpose(2, 3)
    return x.reshape(b, (h // w) * (wd // w), w * w, c)


def window_reverse(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """(B, nW, w*w, C) -> (B, H, W, C); inverse of ``window_partition``."""
    b, _, _, c = x.shape
    x = x.view(b, h // w, wd // w, w, w, c).transpose(2, 3)
    return x.reshape(b, h, wd, c)


def window_mixing_bias(mask: torch.Tensor, grid: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias that keeps each token inside its own source image.

    Args:
        mask: (1, grid*grid) 0/1 mixing mask of this stage, shared by the batch.
    Returns:
        (nW, 1, w*w, w*w): 0 where both tokens share a source, ``MASKED_LOGIT`` elsewhere.
    """
    m = window_partition(mask.view(1, grid, grid, 1).float(), w)[0, :, :, 0]  # (nW, N)
    same = m[:, :, None] == m[:, None, :]
    bias = torch.zeros(same.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~same, MASKED_LOGIT if dtype != torch.float16 else -6e4).unsqueeze(1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window, self.num_heads = window, num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        # "auto": scaled_dot_product_attention, except when training on the CPU: its CPU kernels cannot
        # differentiate the additive bias and fall back to a generic path that is 2-4x slower than the
        # explicit product (measured by benchmarks/bench_pretrain.py). "math" is the plain softmax oracle.
        self.attn_impl = "auto"

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) relative-position bias, N = window^2."""
        n = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1)

    def _use_sdpa(self, q: torch.Tensor, bias: torch.Tensor) -> bool:
        if self.attn_impl != "auto":
            return self.attn_impl == "sdpa"
        return q.device.type != "cpu" or not (torch.is_grad_enabled() and bias.requires_grad)

    def forward(self, x: torch.Tensor, mix_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, nW, N, C); mix_bias: (nW, 1, N, N) or None. Returns (B, nW, N, C)."""
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # 3,B,nW,h,N,d
        q, k, v = qkv.unbind(0)
        bias = self.position_bias().unsqueeze(0)  # (1, h, N, N)
        if mix_bias is not None:
            bias = bias + mix_bias  # (nW, h, N, N)
        bias = bias.to(q.dtype).expand(nw, h, n, n)
        if self._use_sdpa(q, bias):
            # Fold windows and heads into one axis so the bias broadcasts over the batch only.
            out = F.scaled_dot_product_attention(
                q.reshape(b, nw * h, n, -1), k.reshape(b, nw * h, n, -1), v.reshape(b, nw * h, n, -1),
                attn_mask=bias.reshape(1, nw * h, n, n))
            out = out.view(b, nw, h, n, -1)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on a (B, H*W, C) sequence with non-shifted windows."""

    def __init__(self, dim: int, grid: int, window: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.grid, self.window = grid, window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, mix_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        g, w = self.grid, self.window
        win = window_partition(self.norm1(x).view(b, g, g, c), w)
        y = window_reverse(self.attn(win, mix_bias), w, g, g).reshape(b, n, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x downsampling: concatenate each 2x2 neighbourhood, LayerNorm(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c)
        # (row, col) offsets (0,0), (1,0), (0,1), (1,1): the order of the released checkpoints.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """A stack of Swin blocks at one resolution, then optional PatchMerging."""

    def __init__(self, dim: int, grid: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: list[float], downsample: bool) -> None:
        super().__init__()
        self.grid, self.window = grid, window
        self.blocks = nn.ModuleList([
            SwinBlock(dim, grid, window, num_heads, mlp_ratio, qkv_bias, drop_path[i]) for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, grid) if downsample else None
        self.grad_ckpt = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, grid^2, C); mask: (1, grid^2) mixing mask of this stage or None."""
        # The mask is shared by the batch, so its bias is built once here for every block of the stage.
        bias = None if mask is None else window_mixing_bias(mask, self.grid, self.window, torch.float32)
        for blk in self.blocks:
            if self.grad_ckpt and x.requires_grad:
                x = checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, bias)
        return x if self.downsample is None else self.downsample(x)


def valid_input_sizes(windows: tuple[int, ...], limit: int = 1024) -> list[int]:
    """Input sizes (multiples of 32 up to ``limit``) whose every stage grid is tiled by its window."""
    return [s for s in range(32, limit + 1, 32) if _fits(s, windows)]


def _fits(size: int, windows: tuple[int, ...]) -> bool:
    if size % 32:
        return False
    for i, w in enumerate(windows):
        g = size // 4 // 2**i
        if g % min(w, g):
            return False
    return True


def check_input_size(size: int, windows: tuple[int, ...]) -> None:
    """Raise ConfigError naming the valid sizes when ``size`` does not fit the encoder."""
    if not _fits(size, windows):
        raise ConfigError(f"input_size {size} does not fit windows {list(windows)} (must be a multiple of 32 "
                          f"and each stage grid divisible by its window); valid sizes: "
                          f"{valid_input_sizes(windows, 512)}")


class SwinEncoder(nn.Module):
    """Hierarchical Swin encoder: 4x4 patch embedding, fixed sin-cos absolute position, 4 stages.

    Args:
        img_size: input side in pixels (multiple of 32, see ``check_input_size``).
        in_chans: input channels (2 for VH/VV, 1 for single polarisation).
        window_size: per-stage window; a window larger than its stage grid is clamped to the grid.
    Shapes: ``forward_features`` maps (B, in_chans, S, S) to (B, (S/32)^2, 8*embed_dim).
    """

    def __init__(self, img_size: int = 128, patch_size: int = 4, in_chans: int = 2, embed_dim: int = 128,
                 depths: tuple[int, ...] = (2, 2, 18, 2), num_heads: tuple[int, ...] = (4, 8, 16, 32),
                 window_size: tuple[int, ...] = SWIN_WINDOWS, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        check_input_size(img_size, tuple(window_size))
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.encoder_stride = patch_size * 2 ** (len(depths) - 1)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        grid0 = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid0 * grid0, embed_dim), requires_grad=False)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # stochastic depth rule
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            grid = grid0 // 2**i
            self.layers.append(SwinStage(
                embed_dim * 2**i, grid, depth, num_heads[i], min(window_size[i], grid), mlp_ratio, qkv_bias,
                dpr[sum(depths[:i]):sum(depths[: i + 1])], downsample=i < len(depths) - 1))
        self.norm = nn.LayerNorm(self.num_features)

    @property
    def stage_grids(self) -> list[int]:
        return [layer.grid for layer in self.layers]

    def init_weights(self) -> None:
        """Linear/conv xavier-uniform, zero bias; LayerNorm 1/0; bias tables trunc-normal(0.02)."""
        self.absolute_pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.embed_dim, self.stage_grids[0])))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.apply(_init_module)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, (S/4)^2, embed_dim) patch tokens (conv + LayerNorm), before position."""
        return self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))

    def forward_tokens(self, tokens: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Add the position embedding, run the stages (with per-stage mixing masks) and the final norm."""
        x = tokens + self.absolute_pos_embed
        for i, layer in enumerate(self.layers):
            x = layer(x, None if masks is None else masks[i])
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, (S/32)^2, num_features), no masking."""
        return self.forward_tokens(self.embed(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_ckpt = enable

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}


def init_linear_and_norm(m: nn.Module) -> None:
    """MAE's init of one module: xavier-uniform Linear weight, zero bias; LayerNorm weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_head(head: nn.Linear) -> None:
    """A small classification head keeps the first logits near 0 (sigmoid 0.5), as in timm's Swin."""
    trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


def _init_module(m: nn.Module) -> None:
    init_linear_and_norm(m)
    if isinstance(m, WindowAttention):
        trunc_normal_(m.relative_position_bias_table, std=0.02)


# Encoder configurations users type as --model. The paper's are base/large/huge at 128 px.
ENCODER_CONFIGS: dict[str, dict] = {
    "mixmim_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "mixmim_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "mixmim_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "mixmim_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "mixmim_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    # A narrow, shallow encoder for CPU-scale studies (analysis.study): same patch, windows and 4x4 final
    # grid at 128 px as the paper's models, ~1/60 of mixmim_base's compute.
    "mixmim_study": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
}
MODEL_NAMES: tuple[str, ...] = tuple(ENCODER_CONFIGS)


def encoder_kwargs(name: str, **overrides) -> dict:
    """Keyword arguments of ``SwinEncoder`` for a model name; ConfigError listing choices if unknown."""
    if name not in ENCODER_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; choices: {', '.join(MODEL_NAMES)}")
    base = dict(img_size=128, patch_size=4, in_chans=2, window_size=SWIN_WINDOWS, mlp_ratio=4.0, qkv_bias=True)
    return {**base, **ENCODER_CONFIGS[name], **overrides}
