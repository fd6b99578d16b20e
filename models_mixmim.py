"""The MixMIM (MixMAE) pretraining model for Sentinel-1 SAR, on the shared Swin encoder (``models_swin``).

MixMIM mixes two images token-wise and, inside every window, lets a token attend only to tokens of its own
source image, so the encoder sees two disjoint half-images per sample. The decoder unmixes and reconstructs
both images.

Parameter names, shapes and numerics follow the released SAR-W-MixMAE checkpoints, so
``checkpoint_64.pth`` loads with ``strict=True``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block as ViTBlock

from models_swin import SwinEncoder, encoder_kwargs
from sarwmix.errors import ConfigError
from sarwmix.sar import spectra
from util.masking import flip_batch, pixel_mask, sample_mixing_mask, upsample_mask
from util.pos_embed import sincos_2d


class PretrainOutput(NamedTuple):
    """What a pretraining model's ``forward`` returns (MixMIM and SimMIM alike).

    ``loss``: the scalar to minimise; ``pred``: the reconstruction, in the model's layout; ``mask``: the mask
    it used (1 = hidden); ``terms``: each term of ``loss``, detached and unweighted, by name (``pixel_loss``,
    ``spectral_loss``, ...), for the logs. A new term of a model's loss is added to its ``forward_loss`` alone.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    terms: dict[str, torch.Tensor]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), pixel-major then channel (MAE's layout)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def denorm_patches(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Undo per-patch standardisation (norm_pix_loss) with the target's own mean and std: (B, L, P)."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    return rec * std + mean


def unmix(pred: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The two decoder branches (2B, L, D) -> (B, L, D): each cell of image i from the branch where it was
    hidden, the first branch of i where ``m`` (1, L, 1) is 1, the second branch of its partner elsewhere."""
    first, second = pred.chunk(2, dim=0)
    return first * m + flip_batch(second) * (1 - m)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); inverse of ``patchify`` for a square grid."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    x = x.reshape(b, g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)


class MixMIM(SwinEncoder):
    """MixMIM pretraining model: mixed input, masked window attention, unmixing decoder.

    ``forward(x, weights, mask)`` returns ``PretrainOutput(loss, pred, mask, terms)``: ``pred``
    (B, L, stride^2*C) is the unmixed reconstruction of every cell of every image, ``mask`` (1, L) the mixing
    mask on the final grid, ``terms`` the loss's terms (``pixel_loss``, and ``spectral_loss`` with
    ``spectral_weight``).

    ``spectral_weight`` > 0 adds a phase-free texture target (``sarwmix.sar.spectra``): a linear head on the
    decoder predicts each hidden cell's standardised log power spectrum in ``spectral_bins`` (radial,
    angular) bins, and ``spectral_weight`` times its mean squared error is added to the pixel loss. At 0 (the
    published recipe) the head does not exist and the state dict is the released one.
    """

    def __init__(self, decoder_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 norm_pix_loss: bool = True, mask_ratio: float = 0.5, range_mask_ratio: float = 0.0,
                 spectral_weight: float = 0.0, spectral_bins: tuple[int, int] = (8, 4), **encoder_kwargs) -> None:
        super().__init__(**encoder_kwargs)
        if not (0.0 < mask_ratio < 1.0 and range_mask_ratio >= 0.0 and mask_ratio + range_mask_ratio <= 1.0):
            raise ConfigError(f"mask_ratio {mask_ratio} with range_mask_ratio {range_mask_ratio}: expected "
                              f"0 < mask_ratio < 1, range_mask_ratio >= 0 and their sum <= 1")
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio, self.range_mask_ratio = mask_ratio, range_mask_ratio
        n_final = self.stage_grids[-1] ** 2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_final, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        self.decoder_blocks = nn.ModuleList([
            ViTBlock(decoder_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride**2 * self.in_chans)
        n_bins = spectra.check_settings(spectral_weight, spectral_bins)
        self.spectral_weight = spectral_weight
        self.decoder_spec = None
        if spectral_weight > 0:
            bins = spectra.spectral_bins(self.encoder_stride, *n_bins)
            self.register_buffer("spectral_bin_matrix", bins, persistent=False)
            self.decoder_spec = nn.Linear(decoder_dim, bins.shape[1] * self.in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        grid = self.img_size // self.encoder_stride
        self.decoder_pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], grid)))
        trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed", "decoder_pos_embed", "mask_token"}

    def stage_masks(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Nearest upsampling of the final-grid mask (1, L) to every stage grid."""
        final = self.img_size // self.encoder_stride
        return [upsample_mask(mask, final, g) for g in self.stage_grids]

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` (B, C, S, S) with its batch-flip where the mask is 1 and encode: (B, L, num_features)."""
        masks = self.stage_masks(mask)
        tokens = self.embed(x)
        m0 = masks[0].unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - m0) + flip_batch(tokens) * m0
        return self.forward_tokens(tokens, masks)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unmix into two branches and decode: (B, L, D) -> pixels (2B, L, stride^2 * C), and the log spectra
        (2B, L, C * K) with ``spectral_weight`` (else None)."""
        z = self.decoder_embed(z)
        m = mask.unsqueeze(-1).to(z.dtype)
        tok = self.mask_token.to(z.dtype)
        x = torch.cat([z * (1 - m) + tok * m, z * m + tok * (1 - m)], dim=0) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x), (self.decoder_spec(x) if self.decoder_spec is not None else None)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None = None, spec_pred: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted MSE over every pixel of every image, plus ``spectral_weight`` times the MSE of the
        predicted log spectra of every cell. Returns (loss, unmixed reconstruction, terms): ``terms`` holds
        each term detached and unweighted (``pixel_loss``, and ``spectral_loss`` with ``spec_pred``)."""
        target = patchify(x, self.encoder_stride)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        m = mask.unsqueeze(-1).float()
        rec = unmix(pred.float(), m)
        err = (rec - target) ** 2
        if weights is not None:
            err = err * patchify(weights.float(), self.encoder_stride)
        loss = err.mean()
        terms = {"pixel_loss": loss.detach()}
        if spec_pred is not None:
            spec_target = spectra.standardise(spectra.cell_log_spectra(x, self.encoder_stride,
                                                                       self.spectral_bin_matrix))
            spec_loss = ((unmix(spec_pred.float(), m) - spec_target) ** 2).mean()
            terms["spectral_loss"] = spec_loss.detach()
            loss = loss + self.spectral_weight * spec_loss
        return loss, rec, terms

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> PretrainOutput:
        """x: (B, C, S, S) normalised dB; weights: (B, C, S, S) or None; mask: (1, L) 0/1 or None."""
        n_cells = (self.img_size // self.encoder_stride) ** 2
        if mask is None:
            mask = sample_mixing_mask(n_cells, self.mask_ratio, self.range_mask_ratio, device=x.device,
                                      generator=generator)
        elif mask.shape != (1, n_cells):
            raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (1, {n_cells}), one mixing mask "
                             f"shared by the batch")
        z = self.forward_encoder(x, mask)
        pred, spec_pred = self.forward_decoder(z, mask)
        loss, rec, terms = self.forward_loss(x, pred, mask, weights, spec_pred)
        return PretrainOutput(loss, rec, mask, terms)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images for inspection, (B, C, S, S) in normalised dB: ``input``, ``mixed input`` and ``prediction``
        (the unmixed reconstruction of every cell; with ``norm_pix_loss`` de-normalised with each target
        patch's own mean and std), and ``mask`` (1, 1, S, S), 1 on the cells taken from the partner image."""
        _, rec, mask, _ = self.forward(x, mask=mask, generator=generator)
        p, g = self.encoder_stride, self.img_size // self.encoder_stride
        if self.norm_pix_loss:
            rec = denorm_patches(rec, patchify(x, p))
        m_pix = pixel_mask(mask, g, self.img_size).to(x)
        return {"input": x, "mixed input": x * (1 - m_pix) + flip_batch(x) * m_pix,
                "prediction": unpatchify(rec, p, self.in_chans), "mask": m_pix}


# MixMIM decoder per model name; names not listed get MixMIM's decoder (512 wide, 8 blocks, 16 heads).
DECODER_CONFIGS: dict[str, dict] = {
    "mixmim_study": dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
}


def build_mixmim(name: str, **kwargs) -> MixMIM:
    """Build a MixMIM pretraining model by name, e.g. ``build_mixmim("mixmim_base", img_size=128)``."""
    enc_keys = {"img_size", "patch_size", "in_chans", "window_size", "drop_path_rate", "mlp_ratio"}
    enc = encoder_kwargs(name, **{k: v for k, v in kwargs.items() if k in enc_keys})
    rest = {**DECODER_CONFIGS.get(name, {}), **{k: v for k, v in kwargs.items() if k not in enc_keys}}
    return MixMIM(**enc, **rest)


mixmim_tiny = partial(build_mixmim, "mixmim_tiny")
mixmim_small = partial(build_mixmim, "mixmim_small")
mixmim_base = partial(build_mixmim, "mixmim_base")
mixmim_large = partial(build_mixmim, "mixmim_large")
mixmim_huge = partial(build_mixmim, "mixmim_huge")
mixmim_study = partial(build_mixmim, "mixmim_study")
