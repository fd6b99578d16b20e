"""The one training loop of every run, whole: epochs (``Trainer``) and iterations (``train_one_epoch``).

``Trainer`` owns the data loader, the optimizer, resume, the evaluation hook and the checkpoints, and calls
``train_one_epoch`` once per epoch. ``train_one_epoch`` owns what every run needs (lr schedule per iteration,
autocast, gradient accumulation, DDP ``no_sync``, gradient norm, non-finite checks, per-iteration logs); a
*step function* owns what differs (how a batch becomes a loss): ``engine_pretrain.make_pretrain_step`` and
``engine_finetune.make_finetune_step``.

Logs (rank 0, JSON lines): ``train_log.json`` per iteration, ``log.txt`` per epoch and, for runs that
validate (a ``select_metric``), ``val_log.json`` per epoch (``epoch`` and the validation metrics).

Checkpoints (rank 0 only, each written atomically): ``checkpoint.pth`` after every epoch (resume point),
``checkpoint_<N>.pth`` every ``--save_freq`` epochs and at the last (or ``--stop_epoch``) epoch, and
``checkpoint_best.pth`` when an evaluation hook reports a better selection metric.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from sarwmix.errors import CheckpointError, ConfigError, TrainingError
from util import checkpoint as ckpt_io
from util.augment import step_generator
from util.config import RunConfig, plain_dict
from util.lr_decay import param_groups, regroup_optimizer_state
from util.lr_sched import apply_lr, lr_at
from util.misc import JsonLines, all_reduce_mean, check_replicas, truncate_jsonl
from util.runner import Run
from util.sampler import BlockShardSampler, micro_index

# step(model, batch, generator) -> (loss, extra scalars to log, number of images)
StepFn = Callable[[nn.Module, object, torch.Generator], tuple[torch.Tensor, dict, int]]


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



# --- the epoch loop ---

log = logging.getLogger("sarwmix")

# evaluate(raw_model, epoch) -> metrics (plain floats), e.g. {"mAP_macro": 0.61, ...}
EvalFn = Callable[[nn.Module, int], dict]
# on_epoch_end(epoch, is_last_epoch) -> scalars logged as they are named (e.g. {"probe_knn_mAP_macro": 0.4})
EpochEndFn = Callable[[int, bool], dict]


@dataclass(frozen=True)
class TrainSettings:
    """What the loop reads of a run's configuration (the flags of the same names)."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    accum_iter: int = 1
    stop_epoch: int | None = None
    clip_grad: float | None = None
    weight_decay: float = 0.05
    save_freq: int = 0
    resume: str = ""
    start_epoch: int = 0
    num_workers: int = 0
    pin_mem: bool = True
    progress: bool = True
    compile: bool = False
    grad_ckpt: bool = False

    @classmethod
    def of(cls, config: RunConfig) -> TrainSettings:
        """The settings of a settled run configuration (absent optional flags keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: getattr(config, k) for k in names if k in config})


class Trainer:
    """Owns the loop; the caller owns the model, the data set and the step.

    Args:
        args: the loop's flags (``TrainSettings.of(run.config)``), not the whole configuration.
        record: what checkpoints store under ``"args"``: the run's settled configuration as plain values
            (default: ``run.config``).
        groups: optimizer parameter groups (default: weight-decay groups of the model).
        betas: AdamW betas ((0.9, 0.95) for pretraining, as the released recipe).
        evaluate / select_metric: optional per-epoch evaluation and the metric (higher is better) that
            selects ``checkpoint_best.pth``.
        on_iteration: passed to the engine (e.g. a token-keep schedule stepped per update).
        on_epoch_end: called on every rank after each epoch's evaluation (e.g. the representation probe);
            its scalars go into the epoch's ``log.txt`` record under their own names and into TensorBoard
            as ``<prefix>/<rest>`` (``probe_knn_mAP_macro`` -> ``probe/knn_mAP_macro``).
        extra_state: objects with ``state_dict``/``load_state_dict`` stored under ``"extra"``.
    """

    def __init__(self, args: TrainSettings, run: Run, model: nn.Module, dataset, step: StepFn, *,
                 record: Mapping | None = None, groups: list[dict] | None = None,
                 betas: tuple[float, float] = (0.9, 0.95), evaluate: EvalFn | None = None,
                 select_metric: str | None = None, on_iteration: Callable[[int], dict] | None = None,
                 on_epoch_end: EpochEndFn | None = None, extra_state: dict[str, object] | None = None) -> None:
        self.args, self.run, self.dataset, self.step = args, run, dataset, step
        self.record = plain_dict(record if record is not None else run.config or {})
        self.evaluate, self.select_metric, self.on_iteration = evaluate, select_metric, on_iteration
        self.on_epoch_end = on_epoch_end
        self.extra_state = extra_state or {}
        self.raw_model = model
        if args.grad_ckpt and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        self.model = _wrap(model, args, run)
        try:
            self.sampler = BlockShardSampler(len(dataset), args.batch_size, run.info.world_size, run.info.rank,
                                             args.accum_iter, args.seed)
        except ValueError as e:  # a user error: too little data for the batch, one line instead of a traceback
            raise ConfigError(f"{e}; use a smaller --batch_size / --accum_iter or more data") from None
        self.loader = _loader(dataset, self.sampler, args, run)
        groups = groups if groups is not None else param_groups(model, args.weight_decay)
        self.optimizer = adamw(groups, args.lr, betas, run.device)
        fp16_cuda = run.amp_dtype == torch.float16 and run.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        self.start_epoch, self.best = args.start_epoch, float("-inf")
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.resume:
            self._resume()

    def lr_fn(self, epoch: float) -> float:
        a = self.args
        return lr_at(epoch, a.lr, a.min_lr, a.warmup_epochs, a.epochs)

    @property
    def end_epoch(self) -> int:
        stop = self.args.stop_epoch
        return min(self.args.epochs, stop) if stop is not None else self.args.epochs

    def fit(self) -> dict:
        """Train from ``start_epoch`` to the end (or ``--stop_epoch``); return the last epoch's record."""
        run, args = self.run, self.args
        self._open_logs()
        record, t_start = {}, time.time()
        for epoch in range(self.start_epoch, self.end_epoch):
            self.sampler.set_epoch(epoch)
            # drop path etc.: one stream per (seed, epoch, rank), resumable; 65,537 > any world size, so no rank
            # of one epoch reuses the stream of another rank in another epoch
            torch.manual_seed((args.seed * 1_000_003 + epoch) * 65_537 + run.info.rank)
            stats = train_one_epoch(
                self.model, self.loader, self.optimizer, self.step, epoch=epoch, lr_fn=self.lr_fn,
                device=run.device, amp_dtype=run.amp_dtype, scaler=self.scaler, accum_iter=args.accum_iter,
                clip_grad=args.clip_grad, seed=args.seed, rank=run.info.rank, step_log=run.step_log,
                tb_writer=run.tb, progress=args.progress and run.info.is_main, t_start=t_start,
                on_iteration=self.on_iteration)
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items() if k not in
                                        ("epoch_time_s", "img_per_s")},
                      "epoch_time_s": stats["epoch_time_s"], "img_per_s": stats["img_per_s"],
                      "n_parameters": self.n_parameters}
            metrics = self.evaluate(self.raw_model, epoch) if self.evaluate else {}
            record.update({f"val_{k}": v for k, v in metrics.items()})
            if metrics:
                self.val_log.write({"epoch": epoch, **metrics})
            record.update(self._epoch_end(epoch))
            # Log first: a kill between the two leaves a record that resume drops and redoes, whereas a
            # checkpoint without its record would be resumed past, losing that epoch's line for good.
            run.epoch_log.write(record)
            self._save(epoch, metrics)
            log.info("epoch %d: %s", epoch, {k: float(f"{v:.5g}") if isinstance(v, float) else v
                                             for k, v in record.items()})
        self.val_log.close()
        check_replicas(self.raw_model, run.device)
        return record

    def _epoch_end(self, epoch: int) -> dict:
        """The ``on_epoch_end`` scalars of this epoch, also written to TensorBoard (rank 0)."""
        if self.on_epoch_end is None:
            return {}
        scalars = self.on_epoch_end(epoch, epoch + 1 == self.end_epoch)
        if self.run.tb is not None:
            for key, value in scalars.items():
                self.run.tb.add_scalar(key.replace("_", "/", 1), value, epoch)
        return scalars

    def _open_logs(self) -> None:
        run = self.run
        self.val_log = JsonLines(None)
        if not run.info.is_main:
            return
        for name in ("log.txt", "train_log.json", "val_log.json"):  # drop records of epochs to be redone
            truncate_jsonl(run.output_dir / name, lambda r: r.get("epoch", -1) < self.start_epoch)
        run.epoch_log = JsonLines(run.output_dir / "log.txt")
        run.step_log = JsonLines(run.output_dir / "train_log.json")
        if self.select_metric is not None:  # runs that validate: one JSON line of metrics per epoch
            self.val_log = JsonLines(run.output_dir / "val_log.json")

    def state(self, epoch: int) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": epoch, "scaler": self.scaler.state_dict() if self.scaler else None,
                "args": self.record, "stats": dict(self.dataset.stats), "best": self.best,
                "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
                "format_version": ckpt_io.FORMAT_VERSION}

    def _save(self, epoch: int, metrics: dict) -> None:
        if not self.run.info.is_main:
            return
        out, n = self.run.output_dir, epoch + 1
        state = self.state(epoch)
        improved = self.select_metric is not None and metrics.get(self.select_metric, float("-inf")) > self.best
        # One write; the other names are hard links (copies where links fail). checkpoint.pth is replaced by
        # the next epoch's file, never written in place, so a link keeps this epoch's bytes. The best one
        # comes first: a kill before checkpoint.pth names this epoch makes the resumed run redo the epoch.
        names = [out / "checkpoint.pth"]
        if improved:
            self.best = state["best"] = float(metrics[self.select_metric])
            names.insert(0, out / "checkpoint_best.pth")
        freq = self.args.save_freq
        if (freq and n % freq == 0) or n == self.end_epoch:
            names.append(out / f"checkpoint_{n}.pth")
        ckpt_io.save_linked(state, *names)

    def _resume(self) -> None:
        path = Path(self.run.output_dir / "checkpoint.pth" if self.args.resume == "auto" else self.args.resume)
        if self.args.resume == "auto" and not path.exists():
            log.info("--resume auto: no %s yet, starting fresh", path)
            return
        ckpt = ckpt_io.load_checkpoint(path)
        state = ckpt_io.model_state(ckpt, path)
        ckpt_io.check_shapes(self.raw_model, state, path)
        ckpt_io.check_keys(self.raw_model, state, path)
        self.raw_model.load_state_dict(state, strict=True)
        saved = ckpt.get("optimizer")
        if not saved or not saved.get("param_groups"):
            log.warning("%s holds no optimizer state: AdamW's moments start from zero", path)
        else:
            try:
                self.optimizer.load_state_dict(saved)
            except (ValueError, KeyError) as e:
                # Another group layout (e.g. a released checkpoint_64.pth): match the parameters by name.
                regrouped = regroup_optimizer_state(self.optimizer, self.raw_model, saved, list(state))
                if regrouped is None:
                    raise CheckpointError(f"{path}: its optimizer state does not fit this run's parameter "
                                          f"groups ({str(e).splitlines()[0][:160]}), and its groups could not "
                                          f"be matched to the parameters by name; resume needs the same "
                                          f"--model and --mode") from None
                self.optimizer.load_state_dict(regrouped)
                log.info("%s: optimizer state of another group layout, matched to the parameters by name", path)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for k, obj in self.extra_state.items():
            if k in ckpt.get("extra", {}):
                obj.load_state_dict(ckpt["extra"][k])
        self.best = float(ckpt.get("best", float("-inf")))
        self.start_epoch = int(ckpt["epoch"]) + 1
        log.info("resumed from %s at epoch %d", path, self.start_epoch)


def _wrap(model: nn.Module, args: TrainSettings, run: Run) -> nn.Module:
    """Optional torch.compile, then DDP when distributed. The raw model stays reachable for saving."""
    wrapped = model
    if args.compile:
        try:
            import torch._dynamo as dynamo

            # A backend that fails at the first call (no C++ compiler, unsupported op) runs that code eagerly.
            dynamo.config.suppress_errors = True
            wrapped = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            log.warning("torch.compile unavailable (%s); running eager", str(e).splitlines()[0][:120])
    if run.info.distributed:
        ids = [run.device.index] if run.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids, **_no_forward_buffer_sync())
    return wrapped


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the re-broadcast of buffers from rank 0 before each forward.

    Every buffer is a constant (relative-position indices; no BatchNorm), so there is nothing to re-broadcast;
    rank 0's initial buffers still reach every rank at construction. torch 2.14 renamed the flag
    ``broadcast_buffers`` to ``forward_sync_buffers`` and warns (FutureWarning) on the old name.
    """
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _loader(dataset, sampler, args: TrainSettings, run: Run) -> DataLoader:
    return make_loader(dataset, sampler, args.batch_size, args.num_workers, args.pin_mem and run.device.type == "cuda")


def make_loader(dataset, sampler, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """The training loader: persistent workers, 4 batches prefetched per worker, incomplete batch dropped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device):
    """AdamW, fused where the build supports it on this device, else the multi-tensor (foreach) path."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
