"""Finetuning: the step for the shared training loop, distributed evaluation, results.

Training runs in ``engine.train_one_epoch`` (through ``engine.Trainer``); this file only
says how a batch becomes a loss (``make_finetune_step``) and how a split is scored (``evaluate``). What
differs between tasks (loss, target dtype, metrics) is asked of the task object (``tasks``), given as
the object or by name.

Evaluation is sharded with ``StridedEvalSampler`` (rank r takes samples r, r + W, ...; no padding), and
the predictions of all ranks are gathered with their sample indices and put back in data-set order, so
every sample counts exactly once whatever the number of processes.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine import StepFn
from sarwmix.data.bad_patches import BadPatch, Collate, GuardedBatch, GuardedData, stop_message, unpack
from sarwmix.errors import DataError
from tasks import Task, get_task
from util.augment import check_finite, normalize, random_flips
from util.files import write_text_atomic
from util.logs import json_safe
from util.pss import keep_count
from util.sampler import StridedEvalSampler
from util.watchdog import heartbeat

log = logging.getLogger("sarwmix")


def prepare_input(x: torch.Tensor, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
                  input_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw dB batch -> normalised model input on the device.

    Args:
        x: (B, C, S, S) patches or (B, 2, C, H, W) SEN12-FLOOD pairs, raw dB.
        input_size: resize the last two axes to this side first (pairs only; patches come sized).
        generator: draw random flips (training); None for evaluation.
    """
    x = x.to(device, non_blocking=True).float()
    check_finite(x, "the finetuning input")
    if input_size is not None and x.shape[-1] != input_size:
        lead = x.shape[:-3]
        x = F.interpolate(x.flatten(0, x.dim() - 4), size=(input_size, input_size), mode="bilinear",
                          align_corners=False).view(*lead, x.shape[-3], input_size, input_size)
    if generator is not None:
        x = random_flips(x, generator)  # the same flips for both dates of a pair
    return normalize(x, mean, std)


def make_finetune_step(device: torch.device, mean: Sequence[float], std: Sequence[float], task: Task | str,
                       input_size: int | None = None, flips: bool = True,
                       rho_fn: Callable[[], float] | None = None, n_tokens: int = 0) -> StepFn:
    """Step for ``train_one_epoch``: flips, normalisation, forward, task loss.

    Args:
        mean, std: per-channel dB statistics of the data set (``dataset.stats``).
        task: the task (or its name), whose criterion takes the loader's targets as they come.
        input_size: SEN12-FLOOD only: side the pair images are resized to (None: as stored).
        rho_fn: ViT with a Patch Sampling Schedule: the kept-token fraction of this update (read each
            micro-batch; the schedule moves only between updates). The model is called as
            ``model(x, rho=rho)`` and ``rho`` and ``tokens_kept`` (of ``n_tokens`` per image) are logged.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    criterion = get_task(task).criterion()

    def step(model: nn.Module, batch, gen: torch.Generator) -> tuple[torch.Tensor, dict, int]:
        x = prepare_input(batch[0], device, mean_t, std_t, input_size, gen if flips else None)
        target = batch[1].to(device, non_blocking=True)
        if rho_fn is None:
            return criterion(model(x).float(), target), {}, x.shape[0]
        rho = rho_fn()
        logits = model(x, rho=rho).float()
        return criterion(logits, target), {"rho": rho, "tokens_kept": keep_count(n_tokens, rho)}, x.shape[0]

    return step


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, world_size: int = 1, rank: int = 0,
                pin_memory: bool = False, skip_bad: bool = False) -> DataLoader:
    """Loader over this rank's share of ``dataset`` (every sample once over all ranks, in index order).

    A bad patch stops the evaluation with one line naming it; with ``skip_bad`` it is left out (a
    replacement would count another sample twice) and counted as ``n_bad``.
    """
    sampler = StridedEvalSampler(len(dataset), world_size, rank)
    mode = "drop" if skip_bad else "stop"
    return DataLoader(GuardedData(dataset, mode), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=Collate(mode))


def gather_predictions(indices: Sequence[int], logits: torch.Tensor, targets: torch.Tensor,
                       bad: Sequence[BadPatch] = ()) -> tuple[torch.Tensor, torch.Tensor, list[BadPatch]]:
    """Collect (logits, targets) of every rank and sort them by sample index; the bad patches of every rank.

    Args:
        indices: the data-set index of each local row (in loader order).
        logits, targets: local rows, CPU tensors.
        bad: the patches this rank could not read.
    Returns:
        all rows of all ranks in index order, and all ranks' bad patches.
    """
    bad = list(bad)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (list(indices), logits.numpy(), targets.numpy(), bad))
        bad = [b for p in parts for b in p[3]]
        parts = [p for p in parts if len(p[0])] or parts[:1]  # ranks left without samples (W > N)
        indices = [i for p in parts for i in p[0]]
        logits = torch.cat([torch.from_numpy(p[1]) for p in parts])
        targets = torch.cat([torch.from_numpy(p[2]) for p in parts])
    assert len(set(indices)) == len(indices), "evaluation sample seen twice"
    order = torch.argsort(torch.tensor(list(indices), dtype=torch.int64))
    return logits[order], targets[order], bad


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, task: Task | str, mean: Sequence[float],
             std: Sequence[float], amp_dtype: torch.dtype | None = None, input_size: int | None = None,
             gather: bool = True, rho: float | None = None) -> dict[str, float | int]:
    """Score a split: loss and the task's metrics over all ranks' predictions.

    Args:
        task: the task (or its name): its loss and ``scores``.
        loader: from ``eval_loader`` (this rank's share of the split).
        gather: collect the predictions of every rank (sharded evaluation); False when each process
            scores the whole split itself.
        rho: ViT only: keep this fraction of the patch tokens (``util.pss``); None: the model as is.
    Returns:
        ``{"loss": ..., **metrics, "n_samples": N}`` (the same on every rank; counts are ints), and
        ``n_bad`` when bad patches were left out (``eval_loader(skip_bad=True)``).
    Raises:
        DataError: a bad patch, unless the loader skips them (on every rank, naming the patch).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    outs, tgts, indices, bad = [], [], [], []
    for k, batch in enumerate(loader):
        heartbeat(f"evaluation batch {k} of {len(loader)}")
        data, met, fatal = unpack(batch)
        bad += met
        if fatal is not None:
            break  # the other ranks still reach the gather below, and stop with this one
        if data is None:  # every item of the batch was left out
            continue
        x, y = data
        indices += batch.indices if isinstance(batch, GuardedBatch) else range(len(indices), len(indices) + len(y))
        x = prepare_input(x, device, mean_t, std_t, input_size)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outs.append((model(x) if rho is None else model(x, rho=rho)).float().cpu())
        tgts.append(y)
    model.train(was_training)
    task = get_task(task)
    empty_logits, empty_targets = task.empty_predictions()
    logits = torch.cat(outs) if outs else empty_logits
    targets = torch.cat(tgts) if tgts else empty_targets
    if not isinstance(loader.dataset, GuardedData):
        indices = getattr(loader.sampler, "indices", range(len(logits)))
    if gather:
        logits, targets, bad = gather_predictions(indices, logits, targets, bad)
    if bad and getattr(loader.dataset, "mode", "stop") != "drop":
        raise DataError(stop_message(bad[0]))
    scores = {"loss": task.loss(logits, targets), **task.scores(logits, targets), "n_samples": len(targets)}
    if bad:
        log.warning("evaluation: %d bad patches left out (--skip_bad): %s", len(bad),
                    "; ".join(b.line() for b in bad[:3]) + (" ..." if len(bad) > 3 else ""))
        scores["n_bad"] = len(bad)
    return scores


# --- results --------------------------------------------------------------------------------------


def write_results(path: Path, results: dict) -> Path:
    """Write ``results.json`` (NaN metrics become null, so the file stays valid JSON)."""
    return write_text_atomic(path, json.dumps(json_safe(results), indent=2) + "\n")


def format_table(results: dict) -> str:
    """A plain-text table of the val and test metrics of ``results``."""
    names = [k for k in results["test"] if k not in ("n_samples", "n_classes_present")]
    lines = [f"{'metric':<18}{'val':>10}{'test':>10}"]
    for k in names:
        row = [results[s].get(k, float("nan")) for s in ("val", "test")]
        lines.append(f"{k:<18}" + "".join(f"{v:>10.4f}" for v in row))
    lines.append(f"{'samples':<18}" + "".join(f"{int(results[s].get('n_samples', 0)):>10d}"
                                                for s in ("val", "test")))
    return "\n".join(lines)
