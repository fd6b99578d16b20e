"""Reconstruction figures of MixMIM and SimMIM runs.

One row per sample and polarisation (VH, VV), in dB with a colour bar per row; columns: the input, what
the encoder saw (the mixed input, or the masked input with its hidden cells in blue), the raw prediction on
every cell, the visible cells of the input pasted back around the prediction, and the weight map with its
own colour bar over the run's range ``[1, e^s]``. The masked cells are outlined on every image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sarwmix.constants import CHANNELS  # noqa: E402

OUTLINE = "cyan"
HIDDEN = "#9cc3e6"  # colour of pixels the encoder did not see (NaN), distinct from any grey
NORM_PIX_NOTE = ("With --norm_pix_loss the prediction is shown de-normalised with each target patch's own "
                 "mean and std.")


def compose_visible(image: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input on visible pixels, the prediction on masked ones.

    Args:
        image, prediction: (B, C, H, W), same units.
        mask: (B, 1, H, W) or (1, 1, H, W), 1 = masked (hidden from the encoder), 0 = visible.

    Returns:
        (B, C, H, W).
    """
    return torch.where(mask.bool(), prediction, image)


def hide_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with the masked pixels set to NaN (drawn blank); ``mask`` as in ``compose_visible``."""
    return image.masked_fill(mask.bool(), float("nan"))


def to_db(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised (B, C, H, W) -> dB with the per-channel ``mean`` and ``std`` (C,) of the data set."""
    shape = (1, -1, 1, 1)
    return x.float() * torch.tensor(std).reshape(shape) + torch.tensor(mean).reshape(shape)


def weight_range(exp_scale: float) -> tuple[float, float]:
    """The range of the weight map ``exp(s * (1 - x~))``: ``[1, e^s]``."""
    return 1.0, math.exp(exp_scale)


def reconstruction_panels(cols: dict[str, torch.Tensor], sar_db: torch.Tensor, mean: Sequence[float],
                          std: Sequence[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """The figure's columns in dB from a model's ``reconstruct`` output.

    Args:
        cols: ``input``, ``mixed input`` (MixMIM) or ``masked input`` (SimMIM), ``prediction`` (B, C, H, W)
            in normalised dB, and ``mask`` (B or 1, 1, H, W), 1 = masked.
        sar_db: (B, C, H, W) the input in dB.
        mean, std: (C,) normalisation statistics in dB.

    Returns:
        (column title -> (B, C, H, W) dB, mask, ``"MixMIM"`` or ``"SimMIM"``).
    """
    mask = cols["mask"].float()
    prediction = to_db(cols["prediction"], mean, std)
    if "mixed input" in cols:
        kind, seen = "MixMIM", ("mixed input", to_db(cols["mixed input"], mean, std))
    else:
        kind, seen = "SimMIM", ("masked input (hidden cells blue)", hide_masked(sar_db, mask))
    panels = {"input": sar_db, seen[0]: seen[1], "prediction": prediction,
              "visible input + prediction": compose_visible(sar_db, prediction, mask)}
    return panels, mask, kind


def reconstruction_caption(kind: str, weighting: str, exp_scale: float, norm_pix_loss: bool) -> str:
    """What the figure shows, in words (the de-normalisation note only for ``norm_pix_loss`` runs)."""
    hidden = "cells taken from the partner image" if kind == "MixMIM" else "cells replaced by the mask token"
    caption = (f"Outlined: the masked {hidden}. 'prediction': the decoder's output on every cell; "
               f"'visible input + prediction': the input on visible cells, the prediction on masked ones.\n"
               f"dB scale per row: 2-98 % of the input. Weight map ({weighting}) over [1, e^s], s = {exp_scale:g}.")
    return f"{caption}\n{NORM_PIX_NOTE}" if norm_pix_loss else caption


def _draw_row(axes, panels: dict[str, torch.Tensor], weights: torch.Tensor, mask: torch.Tensor, i: int, c: int,
              w_range: tuple[float, float]):
    """Draw sample ``i``, channel ``c`` on one row of axes; returns the (dB, weight) images for colour bars."""
    ref = panels["input"][i, c]
    lo, hi = (float(q) for q in torch.quantile(ref.flatten(), torch.tensor([0.02, 0.98])))
    # Padded by one blank pixel so that a masked cell on the image border is outlined on that side too.
    edge = np.pad(mask[min(i, mask.shape[0] - 1), 0].numpy(), 1)
    span = np.arange(-1, edge.shape[0] - 1)
    gray = plt.get_cmap("gray").with_extremes(bad=HIDDEN)
    image = None
    for ax, tensor in zip(axes, panels.values(), strict=False):
        image = ax.imshow(tensor[i, c].numpy(), cmap=gray, vmin=lo, vmax=max(hi, lo + 1e-3))
        if edge.any():
            ax.contour(span, span, edge, levels=[0.5], colors=OUTLINE, linewidths=1.2)
            ax.set_xlim(-1, edge.shape[0] - 2)
            ax.set_ylim(edge.shape[0] - 2, -1)
    weight = axes[-1].imshow(weights[i, min(c, weights.shape[1] - 1)].numpy(), cmap="magma",
                             vmin=w_range[0], vmax=w_range[1])
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return image, weight


def save_reconstruction_figure(path: str | Path, panels: dict[str, torch.Tensor], mask: torch.Tensor,
                               weights: torch.Tensor, w_range: tuple[float, float], *, title: str = "",
                               caption: str = "", channel_names: Sequence[str] = CHANNELS) -> Path:
    """Write the figure as a PNG.

    Args:
        panels: column title -> (B, C, H, W) image in dB; the first is the input (it sets each row's scale).
        mask: (B or 1, 1, H, W), 1 = masked; outlined on every image.
        weights: (B, C, H, W) weight map (C may be 1), drawn over ``w_range``.
        title, caption: text above and below the grid.
        channel_names: names of the C channels, in order.
    """
    b, n_ch = panels["input"].shape[:2]
    n_col = len(panels) + 1
    fig, axes = plt.subplots(b * n_ch, n_col, figsize=(2.0 * n_col + 1.6, 2.0 * b * n_ch + 0.9),
                             squeeze=False, layout="constrained")
    panels = {name: tensor.float().cpu() for name, tensor in panels.items()}
    mask, weights = mask.float().cpu(), weights.float().cpu()
    for i in range(b):
        for c in range(n_ch):
            row = axes[i * n_ch + c]
            image, weight = _draw_row(row, panels, weights, mask, i, c, w_range)
            fig.colorbar(image, ax=list(row[:-1]), label="dB", fraction=0.03, pad=0.01)
            fig.colorbar(weight, ax=row[-1], label="weight", fraction=0.08, pad=0.02)
            row[0].set_ylabel(f"sample {i}, {channel_names[c]}", fontsize=9)
    for ax, name in zip(axes[0], [*panels, "weight map"], strict=True):
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=11)
    if caption:
        fig.supxlabel(caption, fontsize=8, wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
