"""Which patches a PSS-finetuned ViT keeps at a given rho, for a few samples: JSON and a PNG overlay.

Usage::

    python -m analysis.image_patches output_pss/checkpoint_best.pth --rho 0.5 --n 4
    python -m analysis.image_patches CKPT --rho 0.3 --n 8 --split test --out figures/

Tokens are ranked as in training and evaluation (``util.pss``: L2 norm of the patch embedding, before the
position embedding) and the ``ceil(rho * N)`` largest are kept. Writes ``image_patches.json``::

    {"checkpoint", "model", "split", "rho", "score", "patch_size", "grid", "input_size", "tokens_total",
     "tokens_kept", "samples": [{"index", "kept": [row-major token indices], "scores": [N floats]}]}

and ``image_patches.png``: per sample the VH channel in grey (dB, 2-98 % stretch; VV when VH is not among
the channels), dropped patches darkened and hatched. Outputs go next to the checkpoint unless ``--out``.
Data and model flags are ``main_finetune.py``'s; those not given default to the checkpoint's stored args.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.finetuned import Finetuned, load_finetuned, script_parser
from analysis.logs import run_main
from sarwmix.cli import count
from sarwmix.errors import ConfigError
from util.pss import TOKEN_SCORE, keep_count, select_tokens, token_scores

DISPLAY_CHANNEL = "VH"


def get_parser():
    p = script_parser(__doc__)
    g = p.add_argument_group("patches")
    g.add_argument("--rho", type=float, default=0.5, help="kept fraction of the patch tokens")
    g.add_argument("--n", type=count(1), default=4, help="number of samples (the first n of the split)")
    p.set_defaults(name="image_patches")
    return p


@torch.no_grad()
def kept_patches(ft: Finetuned, indices: list[int], rho: float) -> list[dict]:
    """Per sample: its data-set index, the kept token indices (ascending) and every token's score."""
    tokens = ft.model.embed(ft.batch(indices))
    scores = token_scores(tokens).cpu()
    keep = select_tokens(tokens, rho)
    kept = keep.cpu().tolist() if keep is not None else [list(range(tokens.shape[1]))] * len(indices)
    return [{"index": i, "kept": k, "scores": [round(float(v), 5) for v in s]}
            for i, k, s in zip(indices, kept, scores, strict=True)]


def display_channel(channels: list[str]) -> int:
    return channels.index(DISPLAY_CHANNEL) if DISPLAY_CHANNEL in channels else 0


def overlay(ft: Finetuned, samples: list[dict], rho: float) -> Figure:
    """One panel per sample: the display channel in grey, dropped patches darkened and hatched."""
    m = ft.model
    p, g, n_tok = m.patch_size, m.grid, m.num_tokens
    ch = display_channel(list(ft.args.channels))
    cols = min(len(samples), 4)
    rows = math.ceil(len(samples) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, sample in zip(axes, samples, strict=False):
        img = ft.raw(sample["index"])[ch].numpy()
        lo, hi = np.percentile(img, [2, 98])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
        kept = set(sample["kept"])
        for t in range(n_tok):
            if t not in kept:
                r, c = divmod(t, g)
                ax.add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, facecolor=(0, 0, 0, 0.6),
                                       edgecolor=(1, 0.4, 0.2, 0.8), hatch="///", linewidth=0.4))
        ax.set_title(f"#{sample['index']} {ft.args.channels[ch]}: {len(kept)}/{n_tok} kept", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(samples):]:
        ax.set_axis_off()
    fig.suptitle(f"{ft.args.model}, rho = {rho}: kept patches (clear) by {TOKEN_SCORE}", fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    def job() -> list[Path]:
        ft = load_finetuned(get_parser(), argv)
        a = ft.args
        if not 0.0 < a.rho <= 1.0:
            raise ConfigError(f"--rho {a.rho}: expected 0 < rho <= 1")
        indices = list(range(min(a.n, len(ft.dataset))))
        samples = kept_patches(ft, indices, a.rho)
        m = ft.model
        record = {"checkpoint": str(a.checkpoint), "model": a.model, "split": a.split, "rho": a.rho,
                  "score": TOKEN_SCORE, "patch_size": m.patch_size, "grid": m.grid, "input_size": a.input_size,
                  "tokens_total": m.num_tokens, "tokens_kept": keep_count(m.num_tokens, a.rho),
                  "samples": samples}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        js, png = out / f"{a.name}.json", out / f"{a.name}.png"
        js.write_text(json.dumps(record, indent=1) + "\n")
        fig = overlay(ft, samples, a.rho)
        if a.title:
            fig.suptitle(a.title)
        fig.savefig(png, dpi=a.dpi)
        return [js, png]

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
