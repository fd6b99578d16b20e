"""Reconstruction figures: input, mixed (or masked) input, reconstruction and weight map per sample."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sarwmix.constants import CHANNELS  # noqa: E402


def save_panels(path: Path, columns: dict[str, torch.Tensor], channel: int = 1, title: str = "",
                channel_names: tuple[str, ...] = CHANNELS) -> Path:
    """Write a grid PNG: one row per sample, one column per named (B, C, H, W) tensor (one channel shown).

    All image columns of a row share one colour scale (normalised dB); a column named ``weight`` gets its
    own scale and colour map.
    """
    names = list(columns)
    b = next(iter(columns.values())).shape[0]
    fig, axes = plt.subplots(b, len(names), figsize=(2.2 * len(names), 2.2 * b), squeeze=False)
    for r in range(b):
        ref = columns[names[0]][r, channel].float()
        lo, hi = float(ref.quantile(0.02)), float(ref.quantile(0.98))
        for c, name in enumerate(names):
            img = columns[name][r, min(channel, columns[name].shape[1] - 1)].float().cpu().numpy()
            ax = axes[r, c]
            if name.startswith("weight"):
                ax.imshow(img, cmap="magma", vmin=1.0, vmax=max(float(img.max()), 1.0 + 1e-3))
            else:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    ch = channel_names[channel] if channel < len(channel_names) else str(channel)
    fig.suptitle(title or f"channel {ch}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
