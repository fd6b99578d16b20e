"""The pretraining step (MixMIM and SimMIM) for the shared training loop (``engine.Trainer``), and the
reconstruction figure of a pretraining run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine import StepFn
from sarwmix.constants import CHANNELS
from sarwmix.sar.weighting import DEFAULT_WEIGHTS, WeightSpec, weight_map
from util.augment import check_finite, normalize, random_flips


def make_pretrain_step(device: torch.device, mean: list[float], std: list[float],
                       weights: WeightSpec = DEFAULT_WEIGHTS, flips: bool = True) -> StepFn:
    """Pretraining step: flips, weight map from the raw dB batch (``weights``), normalisation, model loss.

    The weights are computed on the device from raw dB: cheap there, free for the loaders. Logged with the
    loss: the mean weight, the masked fraction and, for a loss of several terms, each term (unweighted).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    def step(model: nn.Module, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict, int]:
        sar_db = batch[0].to(device, non_blocking=True).float()
        check_finite(sar_db, "the pretraining input")
        if flips:
            sar_db = random_flips(sar_db, gen)
        w = None if weights.uniform else weight_map(sar_db, weights, mean_t, std_t)
        out = model(normalize(sar_db, mean_t, std_t), weights=w, generator=gen)
        extras = {"weight_mean": float(w.mean()) if w is not None else 1.0,
                  "mask_ratio": float(out.mask.float().mean())}
        if len(out.terms) > 1:  # a loss of one term is the loss itself
            extras.update({k: float(v) for k, v in out.terms.items()})
        return out.loss, extras, sar_db.shape[0]

    return step


@torch.no_grad()
def save_reconstructions(model: nn.Module, dataset, path, weights: WeightSpec = DEFAULT_WEIGHTS, n: int = 4,
                         seed: int = 0) -> object:
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
    weight = weight_map(sar_db, weights, torch.tensor(mean), torch.tensor(std))
    caption = visualize.reconstruction_caption(kind, weights.weighting, weights.exp_scale,
                                               getattr(model, "norm_pix_loss", False))
    names = tuple(getattr(dataset, "channels", CHANNELS[-sar_db.shape[1]:]))
    return visualize.save_reconstruction_figure(path, panels, mask, weight, visualize.weight_range(weights.exp_scale),
                                                title=f"{kind} reconstructions (dB)", caption=caption,
                                                channel_names=names)
