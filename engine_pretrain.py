"""The training-step loop shared by pretraining and finetuning, and the pretraining step.

``train_one_epoch`` owns what every run needs (lr schedule per iteration, autocast, gradient accumulation,
DDP ``no_sync``, gradient norm, non-finite checks, per-iteration logs); a *step function* owns what differs
(how a batch becomes a loss). The finetuning engine reuses this loop with its own step.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from sarwmix.constants import CHANNELS
from sarwmix.errors import TrainingError
from sarwmix.weighting import weight_map
from util.augment import check_finite, normalize, random_flips, step_generator
from util.lr_sched import apply_lr
from util.misc import JsonLines, all_reduce_mean
from util.sampler import micro_index

# step(model, batch, generator) -> (loss, extra scalars to log, number of images)
StepFn = Callable[[nn.Module, object, torch.Generator], tuple[torch.Tensor, dict, int]]


def make_pretrain_step(device: torch.device, mean: list[float], std: list[float], weighting: str = "per_channel",
                       exp_scale: float = 1.0, granularity: str = "pixel", token_size: int = 32,
                       zscore_compat: bool = False, flips: bool = True, weight_norm: str = "minmax",
                       weight_norm_low: float = 1.0, weight_norm_high: float = 99.0) -> StepFn:
    """Pretraining step: flips, weight map from the raw dB batch, normalisation, model loss.

    ``weight_norm`` (``minmax | percentile``) and its percentiles go to ``sarwmix.weighting.weight_map``.

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
        return loss, extras, sar_db.shape[0]

    return step


def _sync_context(model: nn.Module, boundary: bool):
    return model.no_sync() if (not boundary and hasattr(model, "no_sync")) else contextlib.nullcontext()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, step: StepFn, *,
                    epoch: int, lr_fn: Callable[[float], float], device: torch.device,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    accum_iter: int = 1, clip_grad: float | None = None, seed: int = 0, rank: int = 0,
                    step_log: JsonLines | None = None, tb_writer=None, progress: bool = True,
                    t_start: float | None = None, on_iteration: Callable[[int], dict] | None = None) -> dict:
    """Run one epoch and return its averaged statistics.

    Args:
        step: the step function (see ``StepFn``).
        lr_fn: learning rate at a fractional epoch (``epoch + i / len(loader)``).
        on_iteration: called after each optimizer update with the global iteration; may return extra
            scalars to log (e.g. a token-keep schedule).
    Raises:
        TrainingError on a non-finite loss, or a non-finite gradient norm without the fp16 GradScaler
        (the last good checkpoint on disk is left untouched).
    """
    model.train()
    n_iter = len(loader)
    t0, t_start = time.time(), t_start or time.time()
    sums: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0}
    n_images, n_norms, grad_norm = 0, 0, float("nan")
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, total=n_iter, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for i, batch in enumerate(bar):
        it = epoch * n_iter + i
        boundary = (i + 1) % accum_iter == 0 or i + 1 == n_iter
        if i % accum_iter == 0:
            lr = lr_fn(epoch + i / n_iter)
            apply_lr(optimizer, lr)
        gen = step_generator(seed, epoch, i // accum_iter, micro_index(rank, accum_iter, i))
        with _sync_context(model, boundary):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, extras, b = step(model, batch, gen)
            loss_value = all_reduce_mean(float(loss.detach()), device)
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss ({loss_value}) at epoch {epoch}, iteration {i}; "
                                    f"stopped without saving: the last good checkpoint is kept")
            (scaler.scale(loss / accum_iter) if scaler else loss / accum_iter).backward()
        extra_log = {}
        if boundary:
            grad_norm = _optimizer_step(model, optimizer, scaler, clip_grad, f"epoch {epoch}, iteration {i}")
            if math.isfinite(grad_norm):  # inf/nan: an fp16 step the GradScaler skipped
                sums["grad_norm"] += grad_norm
                n_norms += 1
            if on_iteration is not None:
                extra_log = on_iteration(it) or {}
        n_images += b
        for k, v in {"loss": loss_value, **extras}.items():
            sums[k] = sums.get(k, 0.0) + v
        record = {"epoch": epoch, "iter": it, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "time_s": round(time.time() - t_start, 3), **extras, **extra_log}
        if step_log is not None:
            step_log.write(record)
        if tb_writer is not None:
            for k in ("loss", "lr", "grad_norm", *extras, *extra_log):
                tb_writer.add_scalar(f"train/{k}", record[k], it)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    elapsed = time.time() - t0
    stats = {k: v / max(n_iter, 1) for k, v in sums.items()}
    # the mean over the updates taken (micro-batches that only accumulate measure nothing)
    stats["grad_norm"] = sums["grad_norm"] / n_norms if n_norms else float("nan")
    stats.update(lr=lr, epoch_time_s=elapsed, img_per_s=n_images / max(elapsed, 1e-9))
    if tb_writer is not None:
        tb_writer.add_scalar("train/img_per_s", stats["img_per_s"], epoch)
    return stats


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, clip_grad: float | None, where: str) -> float:
    """Unscale, measure (and optionally clip) the gradient norm, step, zero the gradients.

    A non-finite norm with the fp16 GradScaler is a step it skips (lowering its scale); without a scaler it
    raises TrainingError before the step, so no NaN weights reach a checkpoint.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf")))
    if scaler is None and not math.isfinite(norm):
        raise TrainingError(f"non-finite gradient norm ({norm}) at {where}; stopped before the optimizer "
                            f"step: the last good checkpoint is kept")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def save_reconstructions(model: nn.Module, dataset, path, n: int = 4, weighting: str = "per_channel",
                         exp_scale: float = 1.0, seed: int = 0, granularity: str = "pixel", token_size: int = 32,
                         zscore_compat: bool = False, weight_norm: str = "minmax", weight_norm_low: float = 1.0,
                         weight_norm_high: float = 99.0) -> object:
    """PNG of the first ``n`` samples of a MixMIM or SimMIM model, every channel in dB (``util.visualize``):
    input, what the encoder saw, raw prediction, visible cells pasted back, weight map of the run."""
    from util import visualize

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
