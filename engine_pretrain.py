"""The pretraining step (MixMIM and SimMIM) for the shared training loop (``engine.Trainer``), and the
reconstruction figure of a pretraining run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine import StepFn
from sarwmix.constants import CHANNELS
from sarwmix.sar.weighting import weight_map
from util.augment import check_finite, normalize, random_flips


def make_pretrain_step(device: torch.device, mean: list[float], std: list[float], weighting: str = "per_channel",
                       exp_scale: float = 1.0, granularity: str = "pixel", token_size: int = 32,
                       zscore_compat: bool = False, flips: bool = True, weight_norm: str = "minmax",
                       weight_norm_low: float = 1.0, weight_norm_high: float = 99.0) -> StepFn:
    """Pretraining step: flips, weight map from the raw dB batch, normalisation, model loss.

    ``weight_norm`` (``minmax | percentile``) and its percentiles go to ``sarwmix.sar.weighting.weight_map``.

    The weights are computed on the device from raw dB: cheap there, free for the loaders.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    def step(model: nn.Module, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict, int]:
        sar_db = batch[0].to(device, non_blocking=True).float()
        check_finite(sar_db, "the pretraining input")
        if flips:
            sar_db = random_flips(sar_db, gen)
        w = None
        if weighting != "none":
            w = weight_map(sar_db, weighting, exp_scale, granularity, token_size, zscore_compat, mean_t, std_t,
                           weight_norm, weight_norm_low, weight_norm_high)
        loss, _, mask = model(normalize(sar_db, mean_t, std_t), weights=w, generator=gen)
        extras = {"weight_mean": float(w.mean()) if w is not None else 1.0,
                  "mask_ratio": float(mask.float().mean())}
        terms = getattr(getattr(model, "module", model), "loss_terms", {})
        if "spectral_loss" in terms:  # the loss has two terms: log each (unweighted)
            extras.update({k: float(v) for k, v in terms.items()})
        return loss, extras, sar_db.shape[0]

    return step



@torch.no_grad()
def save_reconstructions(model: nn.Module, dataset, path, n: int = 4, weighting: str = "per_channel",
                         exp_scale: float = 1.0, seed: int = 0, granularity: str = "pixel", token_size: int = 32,
                         zscore_compat: bool = False, weight_norm: str = "minmax", weight_norm_low: float = 1.0,
                         weight_norm_high: float = 99.0) -> object:
    """PNG of the first ``n`` samples of a MixMIM or SimMIM model, every channel in dB (``util.visualize``):
    input, what the encoder saw, raw prediction, visible cells pasted back, weight map of the run."""
    from util import visualize  # matplotlib (pyplot): loaded only by the runs that draw

    n = min(n, len(dataset))
    sar_db = torch.stack([dataset[i][0] for i in range(n)]).float()
    mean, std = dataset.stats["mean"], dataset.stats["std"]  # of the dataset's channels, in order
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cols = model.reconstruct(normalize(sar_db, torch.tensor(mean), torch.tensor(std)).to(device),
                             generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    panels, mask, kind = visualize.reconstruction_panels({k: v.cpu() for k, v in cols.items()}, sar_db, mean, std)
    weights = weight_map(sar_db, weighting, exp_scale, granularity, token_size, zscore_compat,
                         torch.tensor(mean), torch.tensor(std), norm=weight_norm, low=weight_norm_low,
                         high=weight_norm_high)
    caption = visualize.reconstruction_caption(kind, weighting, exp_scale, getattr(model, "norm_pix_loss", False))
    names = tuple(getattr(dataset, "channels", CHANNELS[-sar_db.shape[1]:]))
    return visualize.save_reconstruction_figure(path, panels, mask, weights, visualize.weight_range(exp_scale),
                                                title=f"{kind} reconstructions (dB)", caption=caption,
                                                channel_names=names)
