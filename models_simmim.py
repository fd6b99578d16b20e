"""SimMIM pretraining (``--mode simmim``) over several backbones.

One wrapper, three backbone families:
- the project's Swin (``mixmim_*``): ``SwinEncoder.embed`` + ``forward_tokens``, the code MixMIM uses;
- timm Swin v1 / v2 (``swin_tiny`` ... ``swinv2_small_w16``), ``timm.create_model(pretrained=False)``;
- the plain ViT of ``models_vit`` (``vit_tiny`` ...), whose light head predicts masked patches only.

A mask is drawn per sample on a grid of ``mask_patch_size`` cells (``ceil(L * r)`` cells), upsampled to the
patch-token grid; masked patch embeddings are replaced by one learnable token **before** the position
embedding, and the whole sequence is encoded. The Swins decode with a 1x1 conv to ``stride^2 * C`` channels
and ``PixelShuffle(stride)``. Loss (L1, or MSE with ``loss="mse"``) on masked pixels only:
``sum(|x - rec| * m_pix * w) / (sum(m_pix) + 1e-5) / C``.
"""
from __future__ import annotations

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from models_mixmim import PretrainOutput, unpatchify
from models_swin import SwinEncoder, encoder_kwargs
from models_vit import MaskedPatchHead, build_vit
from sarwmix.errors import ConfigError
from util.masking import pixel_mask, sample_simmim_mask, upsample_mask

LOSSES: tuple[str, ...] = ("l1", "mse")


class SimMIM(nn.Module):
    """Masking, mask token, decoder, masked loss. Subclasses provide ``embed`` and ``encode``.

    ``forward(x, weights, mask, generator)`` returns ``PretrainOutput(loss, rec, mask, terms)``: ``rec``
    (B, C, S, S) the reconstruction in normalised dB, ``mask`` (B, (S/mask_patch_size)^2) 0/1 with 1 = masked,
    ``terms`` the loss's one term (``pixel_loss``).
    """

    def __init__(self, encoder: nn.Module, *, img_size: int, in_chans: int, patch_size: int, embed_dim: int,
                 num_features: int, encoder_stride: int, mask_ratio: float = 0.6, mask_patch_size: int = 32,
                 loss: str = "l1") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"SimMIM loss {loss!r}: expected one of {LOSSES}")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio {mask_ratio}: expected a value in (0, 1)")
        check_mask_grid(img_size, patch_size, mask_patch_size)
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.encoder_stride, self.loss = encoder_stride, loss
        self.mask_ratio, self.mask_patch_size = mask_ratio, mask_patch_size
        self.mask_grid, self.token_grid = img_size // mask_patch_size, img_size // patch_size
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = self.build_decoder(num_features)

    def build_decoder(self, num_features: int) -> nn.Module:
        """SimMIM's decoder: one feature pixel -> its stride x stride x C patch."""
        s = self.encoder_stride
        conv = nn.Conv2d(num_features, s * s * self.in_chans, kernel_size=1)
        return nn.Sequential(conv, nn.PixelShuffle(s))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, L_tok, embed_dim) patch embeddings before any position signal."""
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L_tok, embed_dim) -> encoder output (B, num_features, S/stride, S/stride)."""
        raise NotImplementedError

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the masked patch embeddings by the mask token, encode the full sequence."""
        tokens = self.embed(x)
        m = upsample_mask(mask, self.mask_grid, self.token_grid).unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m
        return self.encode(tokens)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, F, g, g) -> (B, C, S, S) reconstruction."""
        return self.decoder(z)

    def forward_loss(self, x: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean (weighted) L1 or squared error per masked pixel and channel; visible pixels do not count.
        Returns (loss, terms): ``terms`` holds the loss detached as ``pixel_loss``."""
        m_pix = pixel_mask(mask, self.mask_grid, self.img_size).float()  # (B, 1, S, S)
        diff = rec.float() - x.float()
        err = diff.abs() if self.loss == "l1" else diff * diff
        if weights is not None:
            err = err * weights.float()
        # SimMIM's normalisation: per masked pixel (the 1e-5 guards an empty mask), then per channel.
        loss = (err * m_pix).sum() / (m_pix.sum() + 1e-5) / self.in_chans
        return loss, {"pixel_loss": loss.detach()}

    def sample_mask(self, batch: int, device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, mask_grid^2) per-sample mask, drawn on the CPU so the sequence is device independent."""
        return sample_simmim_mask(batch, self.mask_grid**2, self.mask_ratio, generator).to(device)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> PretrainOutput:
        """x: (B, C, S, S) normalised dB; weights: (B, C, S, S) or None; mask: (B, mask_grid^2) or None."""
        if mask is None:
            mask = self.sample_mask(x.shape[0], x.device, generator)
        elif mask.shape != (x.shape[0], self.mask_grid**2):
            raise ValueError(f"mask of shape {tuple(mask.shape)}: expected "
                             f"({x.shape[0]}, {self.mask_grid**2})")
        rec = self.forward_decoder(self.forward_encoder(x, mask), mask)
        loss, terms = self.forward_loss(x, rec, mask, weights)
        return PretrainOutput(loss, rec, mask, terms)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images for inspection, (B, C, S, S) normalised dB: ``input``, ``masked input`` (masked cells 0),
        ``prediction`` (the decoder's output on every cell), and ``mask`` (B, 1, S, S), 1 = masked."""
        _, rec, mask, _ = self.forward(x, mask=mask, generator=generator)
        m_pix = pixel_mask(mask, self.mask_grid, self.img_size).to(x)
        return {"input": x, "masked input": x * (1 - m_pix), "prediction": rec.float().to(x.dtype),
                "mask": m_pix}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {"mask_token", *(f"encoder.{n}" for n in inner)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


class SimMIMSwin(SimMIM):
    """SimMIM on the project's Swin encoder (the MixMIM encoder, no mixing and no masked attention)."""

    def __init__(self, name: str, img_size: int, in_chans: int, **kwargs) -> None:
        enc = SwinEncoder(**encoder_kwargs(name, img_size=img_size, in_chans=in_chans))
        enc.init_weights()
        super().__init__(enc, img_size=img_size, in_chans=in_chans, patch_size=enc.patch_size,
                         embed_dim=enc.embed_dim, num_features=enc.num_features,
                         encoder_stride=enc.encoder_stride, **kwargs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.encoder.forward_tokens(tokens)  # (B, Lf, F), position added inside
        g = self.img_size // self.encoder_stride
        return z.transpose(1, 2).reshape(z.shape[0], -1, g, g)


class SimMIMTimmSwin(SimMIM):
    """SimMIM on a timm Swin v1/v2 built with ``pretrained=False`` (nothing is downloaded).

    timm >= 0.9 Swins keep tokens NHWC: ``patch_embed`` (conv + LayerNorm) gives (B, H, W, D), ``layers``
    and ``norm`` keep that layout. They have no absolute position embedding, so the mask token goes in
    right after ``patch_embed``; if an older build has one, it is added after the replacement.
    """

    def __init__(self, timm_name: str, img_size: int, in_chans: int, **kwargs) -> None:
        # drop_path 0 for pretraining (SimMIM's recipe; timm's Swin default is 0.1).
        enc = timm.create_model(timm_name, pretrained=False, in_chans=in_chans, img_size=img_size,
                                num_classes=0, drop_path_rate=0.0)
        patch = enc.patch_embed.patch_size[0]
        super().__init__(enc, img_size=img_size, in_chans=in_chans, patch_size=patch, embed_dim=enc.embed_dim,
                         num_features=enc.num_features, encoder_stride=patch * 2 ** (len(enc.layers) - 1),
                         **kwargs)
        self.timm_name = timm_name

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.encoder.patch_embed(x)
        assert t.ndim == 4, "timm >= 0.9 Swin patch_embed returns NHWC"
        return t.flatten(1, 2)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.token_grid
        x = tokens.view(tokens.shape[0], g, g, -1)
        pos = getattr(self.encoder, "absolute_pos_embed", None)
        if pos is not None:
            x = x + pos.view(1, g, g, -1)
        x = self.encoder.norm(self.encoder.layers(x))  # (B, g/8, g/8, F)
        return x.permute(0, 3, 1, 2)


class SimMIMViT(SimMIM):
    """SimMIM on the plain ViT: mask token before the position signal, MLP head on masked tokens only."""

    def __init__(self, name: str, img_size: int, in_chans: int, **kwargs) -> None:
        enc = build_vit(name, img_size=img_size, in_chans=in_chans)
        super().__init__(enc, img_size=img_size, in_chans=in_chans, patch_size=enc.patch_size,
                         embed_dim=enc.embed_dim, num_features=enc.num_features,
                         encoder_stride=enc.encoder_stride, **kwargs)

    def build_decoder(self, num_features: int) -> nn.Module:
        return MaskedPatchHead(num_features, self.patch_size, self.in_chans)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.encoder.forward_tokens(tokens)  # (B, L, D)
        g = self.token_grid
        return z.transpose(1, 2).reshape(z.shape[0], -1, g, g)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        token_mask = upsample_mask(mask, self.mask_grid, self.token_grid)
        pred = self.decoder(z.flatten(2).transpose(1, 2), token_mask)  # (B, L, p*p*C), 0 where visible
        return unpatchify(pred, self.patch_size, self.in_chans)


def check_mask_grid(img_size: int, patch_size: int, mask_patch_size: int) -> None:
    """The mask cells must be whole patches and tile the image."""
    if mask_patch_size % patch_size or img_size % mask_patch_size:
        raise ConfigError(f"--mask_patch_size {mask_patch_size} must be a multiple of the patch size "
                          f"{patch_size} and divide --input_size {img_size}")
