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

from sarwmix.data.bad_patches import Collate, GuardedData, unpack
from sarwmix.errors import CheckpointError, ConfigError, TrainingError
from util import checkpoint as ckpt_io
from util.augment import step_generator
from util.config import RunConfig, plain_dict
from util.distributed import check_replicas
from util.logs import JsonLines, truncate_jsonl, truncate_lines
from util.lr_decay import param_groups, regroup_optimizer_state
from util.lr_sched import apply_lr, lr_at
from util.preemption import Preempted, PreemptionSignal
from util.run_control import EpochProgress, RunControl, barrier, gather_bad, gather_objects, rng_state
from util.runner import Run
from util.sampler import BlockShardSampler, micro_index
from util.watchdog import StallWatchdog, collective_failed

# step(model, batch, generator) -> (loss, extra scalars to log, number of images)
StepFn = Callable[[nn.Module, object, torch.Generator], tuple[torch.Tensor, dict, int]]


def _sync_context(model: nn.Module, boundary: bool):
    return model.no_sync() if (not boundary and hasattr(model, "no_sync")) else contextlib.nullcontext()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, step: StepFn, *,
                    epoch: int, lr_fn: Callable[[float], float], device: torch.device,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    accum_iter: int = 1, clip_grad: float | None = None, seed: int = 0, rank: int = 0,
                    step_log: JsonLines | None = None, tb_writer=None, progress: bool = True,
                    t_start: float | None = None, on_iteration: Callable[[int], dict] | None = None,
                    control: RunControl | None = None, position: EpochProgress | None = None,
                    n_iter: int | None = None) -> dict:
    """Run one epoch (or the rest of one) and return its averaged statistics.

    Args:
        step: the step function (see ``StepFn``).
        lr_fn: learning rate at a fractional epoch (``epoch + i / n_iter``).
        on_iteration: called after each optimizer update with the global iteration; may return extra
            scalars to log (e.g. a token-keep schedule).
        control: what the ranks agree on at every step (``util.run_control``): the mean loss, bad patches,
            periodic saves and preemption; default: one process, no saves, no signals.
        position: where the epoch stands (a mid-epoch resume; the loader then starts at that micro-batch);
            default: its start.
        n_iter: micro-batches of the whole epoch (default ``len(loader)``).
    Raises:
        TrainingError on a non-finite loss, or a non-finite gradient norm without the fp16 GradScaler
        (the last good checkpoint on disk is left untouched); DataError on a bad patch (stop mode) or too
        many (skip mode); ``Preempted`` after the checkpoint of a stop request.
    """
    model.train()
    n_iter = len(loader) if n_iter is None else n_iter
    control = control or RunControl(device)
    pos = position or EpochProgress(epoch)
    t0, t_start = time.time(), t_start or time.time()
    n_images, grad_norm, lr = 0, float("nan"), lr_fn(epoch + pos.next_iter / n_iter)
    optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)  # may draw the loader's base seed from the global RNG: restore after it
    control.restore_rng()
    bar = tqdm(total=n_iter, initial=pos.next_iter, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for i in range(pos.next_iter, n_iter):
        control.at(f"loading batch {i} of epoch {epoch}")
        batch, bad, fatal = unpack(next(batches))
        it = epoch * n_iter + i
        boundary = (i + 1) % accum_iter == 0 or i + 1 == n_iter
        if i % accum_iter == 0:
            lr = lr_fn(epoch + i / n_iter)
            apply_lr(optimizer, lr)
        gen = step_generator(seed, epoch, i // accum_iter, micro_index(rank, accum_iter, i))
        with _sync_context(model, boundary):
            loss, extras, b = torch.zeros(()), {}, 0
            if fatal is None:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, extras, b = step(model, batch, gen)
            control.at(f"the all-reduce of the loss at epoch {epoch}, iteration {i}", collective=True)
            loss_value = control.sync(float(loss.detach()), bad, fatal, pos)
            if not math.isfinite(loss_value):
                raise TrainingError(f"non-finite loss ({loss_value}) at epoch {epoch}, iteration {i}; "
                                    f"stopped without saving: the last good checkpoint is kept")
            control.at(f"the backward pass (gradient all-reduce) at epoch {epoch}, iteration {i}", collective=True)
            (scaler.scale(loss / accum_iter) if scaler else loss / accum_iter).backward()
        extra_log = {}
        if boundary:
            grad_norm = _optimizer_step(model, optimizer, scaler, clip_grad, f"epoch {epoch}, iteration {i}")
            if math.isfinite(grad_norm):  # inf/nan: an fp16 step the GradScaler skipped
                pos.sums["grad_norm"] += grad_norm
                pos.n_norms += 1
            if on_iteration is not None:
                extra_log = on_iteration(it) or {}
        n_images += b
        pos.n_images += b
        for k, v in {"loss": loss_value, **extras}.items():
            pos.sums[k] = pos.sums.get(k, 0.0) + v
        record = {"epoch": epoch, "iter": it, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "time_s": round(time.time() - t_start, 3), **extras, **extra_log}
        if step_log is not None:
            step_log.write(record)
        if tb_writer is not None:
            for k in ("loss", "lr", "grad_norm", *extras, *extra_log):
                tb_writer.add_scalar(f"train/{k}", record[k], it)
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if boundary:
            pos.next_iter = i + 1
            control.beat(f"epoch {epoch}, iteration {i} done")
            # a periodic save, or the checkpoint of a stop request (raises Preempted)
            control.after_update(pos, (it + 1) // accum_iter, last=i + 1 == n_iter)
    bar.close()
    elapsed = time.time() - t0
    stats = {k: v / max(n_iter, 1) for k, v in pos.sums.items()}
    # the mean over the updates taken (micro-batches that only accumulate measure nothing)
    stats["grad_norm"] = pos.sums["grad_norm"] / pos.n_norms if pos.n_norms else float("nan")
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
BAD_PATCHES_FILE = "bad_patches.txt"  # epoch <TAB> patch <TAB> reason, one line per bad patch and epoch

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
    skip_bad: bool = False
    max_bad: float = 0.001
    save_every_minutes: float = 0.0
    save_every_steps: int = 0
    dist_timeout: float = 300.0

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
        mode = "skip" if args.skip_bad else "stop"
        self.loader = make_loader(GuardedData(dataset, mode), self.sampler, args.batch_size, args.num_workers,
                                  args.pin_mem and run.device.type == "cuda", collate_fn=Collate(mode))
        groups = groups if groups is not None else param_groups(model, args.weight_decay)
        self.optimizer = adamw(groups, args.lr, betas, run.device)
        fp16_cuda = run.amp_dtype == torch.float16 and run.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        self.start_epoch, self.best = args.start_epoch, float("-inf")
        self.position: EpochProgress | None = None  # where a mid-epoch checkpoint left the epoch it resumes
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.control = RunControl(run.device, save_every_s=60 * args.save_every_minutes,
                                  save_every_steps=args.save_every_steps, max_bad=args.max_bad,
                                  epoch_samples=len(self.sampler) * run.info.world_size, save=self._save_position)
        if args.resume:
            self._resume()
        if run.info.is_main:
            self._check_output_folder()

    def lr_fn(self, epoch: float) -> float:
        a = self.args
        return lr_at(epoch, a.lr, a.min_lr, a.warmup_epochs, a.epochs)

    @property
    def end_epoch(self) -> int:
        stop = self.args.stop_epoch
        return min(self.args.epochs, stop) if stop is not None else self.args.epochs

    def fit(self) -> dict:
        """Train from ``start_epoch`` to the end (or ``--stop_epoch``); return the last epoch's record.

        SIGTERM / SIGUSR1 stop the run after the step in flight with a checkpoint (``Preempted``); a rank
        whose steps stall, or whose collective fails, reports where and ends the process
        (``util.watchdog``).
        """
        self._open_logs()
        own_handler = self.run.preemption is None  # a Run from util.runner.start has installed one already
        self.control.preemption = PreemptionSignal().install() if own_handler else self.run.preemption
        self.control.watchdog = StallWatchdog(self.args.dist_timeout, self.run.info.rank).start()
        try:
            return self._epochs()
        except RuntimeError as err:
            if not self.run.info.distributed or not self.control.in_collective:
                raise
            collective_failed(self.control.watchdog, err)  # ends the process
            raise
        finally:
            self.control.watchdog.stop()
            if own_handler:
                self.control.preemption.restore()
            self.val_log.close()
            if self.run.tb is not None:
                self.run.tb.flush()

    def _epochs(self) -> dict:
        run, args = self.run, self.args
        record, t_start = {}, time.time()
        for epoch in range(self.start_epoch, self.end_epoch):
            position, self.position = self.position or EpochProgress(epoch), None
            self.sampler.set_epoch(epoch, start=position.next_iter)
            # drop path etc.: one stream per (seed, epoch, rank), resumable; 65,537 > any world size, so no rank
            # of one epoch reuses the stream of another rank in another epoch
            torch.manual_seed((args.seed * 1_000_003 + epoch) * 65_537 + run.info.rank)
            stats = train_one_epoch(
                self.model, self.loader, self.optimizer, self.step, epoch=epoch, lr_fn=self.lr_fn,
                device=run.device, amp_dtype=run.amp_dtype, scaler=self.scaler, accum_iter=args.accum_iter,
                clip_grad=args.clip_grad, seed=args.seed, rank=run.info.rank, step_log=run.step_log,
                tb_writer=run.tb, progress=args.progress and run.info.is_main, t_start=t_start,
                on_iteration=self.on_iteration, control=self.control, position=position,
                n_iter=self.iters_per_epoch)
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items() if k not in
                                        ("epoch_time_s", "img_per_s")},
                      "epoch_time_s": stats["epoch_time_s"], "img_per_s": stats["img_per_s"],
                      "n_parameters": self.n_parameters, **self._bad_patches(position)}
            self.control.at(f"the evaluation after epoch {epoch}", collective=run.info.distributed)
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
            self.control.beat(f"the end of epoch {epoch}")
            if epoch + 1 < self.end_epoch and self.control.poll_stop():
                raise Preempted(f"{self.control.stop_reason}: stopped after epoch {epoch}")
        check_replicas(self.raw_model, run.device)
        return record

    @property
    def iters_per_epoch(self) -> int:
        return len(self.loader)

    def _bad_patches(self, position: EpochProgress) -> dict:
        """The epoch's bad patches (all ranks): counted in the log record and TensorBoard, listed in
        ``bad_patches.txt``; nothing unless --skip_bad."""
        if not self.args.skip_bad:
            return {}
        self.control.at(f"the gathering of bad patches after epoch {position.epoch}", collective=True)
        gather_bad(position)
        if self.run.info.is_main:
            if self.run.tb is not None:
                self.run.tb.add_scalar("train/bad_patches", len(position.bad), position.epoch)
            if position.bad:
                with open(self.run.output_dir / BAD_PATCHES_FILE, "a", encoding="utf-8") as fh:
                    fh.writelines(f"{position.epoch}\t{name}\t{reason}\n" for name, reason in position.bad.items())
                log.warning("epoch %d: %d bad patches skipped (--skip_bad), listed in %s", position.epoch,
                            len(position.bad), self.run.output_dir / BAD_PATCHES_FILE)
        return {"bad_patches": len(position.bad)}

    def _epoch_end(self, epoch: int) -> dict:
        """The ``on_epoch_end`` scalars of this epoch, also written to TensorBoard (rank 0)."""
        if self.on_epoch_end is None:
            return {}
        self.control.at(f"the end-of-epoch hook after epoch {epoch}", collective=self.run.info.distributed)
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
        start, done = self.start_epoch, (self.position.next_iter if self.position else 0)
        first_iter = start * self.iters_per_epoch + done
        # drop the records of the steps and epochs to be redone
        for name in ("log.txt", "val_log.json"):
            truncate_jsonl(run.output_dir / name, lambda r: r.get("epoch", -1) < start)
        truncate_jsonl(run.output_dir / "train_log.json", lambda r: r.get("iter", first_iter) < first_iter)
        truncate_lines(run.output_dir / BAD_PATCHES_FILE, lambda line: int(line.split("\t", 1)[0]) < start)
        run.epoch_log = JsonLines(run.output_dir / "log.txt")
        run.step_log = JsonLines(run.output_dir / "train_log.json")
        if self.select_metric is not None:  # runs that validate: one JSON line of metrics per epoch
            self.val_log = JsonLines(run.output_dir / "val_log.json")

    def state(self, epoch: int) -> dict:
        """The checkpoint of the run after ``epoch`` (its last finished epoch; -1 for none)."""
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": epoch, "scaler": self.scaler.state_dict() if self.scaler else None,
                "args": self.record, "stats": dict(self.dataset.stats), "best": self.best,
                "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
                "format_version": ckpt_io.FORMAT_VERSION}

    def _save(self, epoch: int, metrics: dict) -> None:
        if not self.run.info.is_main:
            return
        out, n = self.run.output_dir, epoch + 1
        self.control.at(f"writing the checkpoints of epoch {epoch}")
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

    def _save_position(self, position: EpochProgress, reason: str) -> None:
        """Called on every rank at an update where the ranks agreed to save: ``checkpoint.pth`` records the
        position inside the epoch and every rank's random state, so that a resumed run continues there."""
        run = self.run
        self.control.at(f"the gathering of random states for a checkpoint inside epoch {position.epoch}",
                        collective=True)
        gather_bad(position)
        rng = gather_objects(rng_state(run.device))
        if run.info.is_main:
            self.control.at(f"writing checkpoint.pth inside epoch {position.epoch}")
            state = self.state(position.epoch - 1)
            state["position"] = {**position.state_dict(), "rng": rng, "world_size": run.info.world_size,
                                 "iters_per_epoch": self.iters_per_epoch}
            ckpt_io.save_linked(state, run.output_dir / "checkpoint.pth")
            log.info("%s: checkpoint.pth written at epoch %d, iteration %d of %d", reason, position.epoch,
                     position.next_iter, self.iters_per_epoch)
        barrier()  # every rank waits for the file: a rank that exits first may make the launcher end the job
        self.control.beat(f"the checkpoint inside epoch {position.epoch}")

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
        self._resume_optimizer(ckpt.get("optimizer"), state, path)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for k, obj in self.extra_state.items():
            if k in ckpt.get("extra", {}):
                obj.load_state_dict(ckpt["extra"][k])
        self.best = float(ckpt.get("best", float("-inf")))
        self.start_epoch = int(ckpt["epoch"]) + 1
        where = f"epoch {self.start_epoch}"
        if ckpt.get("position"):
            self._resume_position(ckpt["position"], path)
            where += f", iteration {self.position.next_iter} of {self.iters_per_epoch}"
        log.info("resumed from %s at %s", path, where)

    def _resume_optimizer(self, saved: dict | None, state: dict, path: Path) -> None:
        if not saved or not saved.get("param_groups"):
            log.warning("%s holds no optimizer state: AdamW's moments start from zero", path)
            return
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

    def _resume_position(self, saved: dict, path: Path) -> None:
        """A checkpoint taken inside an epoch: continue at its step, with this rank's random state."""
        info = self.run.info
        if saved["iters_per_epoch"] != self.iters_per_epoch or saved["world_size"] != info.world_size:
            log.warning("%s was written inside epoch %d by %d ranks with %d iterations per epoch; this run has "
                        "%d ranks and %d: it restarts that epoch from its beginning", path, saved["epoch"],
                        saved["world_size"], saved["iters_per_epoch"], info.world_size, self.iters_per_epoch)
            return
        self.position = EpochProgress.from_state(saved)
        self.control.rng_to_restore = saved["rng"][info.rank]

    def _check_output_folder(self) -> None:
        """Remove temporary files a killed save left, and warn when the checkpoints will not fit."""
        out = self.run.output_dir
        for stale in sorted(out.glob(".*.pth.tmp*")):
            log.warning("removing %s, the temporary file of a save that was killed", stale)
            stale.unlink(missing_ok=True)
        per_file = ckpt_io.state_nbytes(self.raw_model.state_dict()) + 2 * sum(
            p.numel() * p.element_size() for p in self.raw_model.parameters() if p.requires_grad)  # + AdamW moments
        freq = self.args.save_freq
        numbered = sum(1 for n in range(self.start_epoch + 1, self.end_epoch + 1)
                       if (freq and n % freq == 0) or n == self.end_epoch)
        files = 2 + numbered + (self.select_metric is not None)  # latest + its temporary + numbered + best
        warning = ckpt_io.space_warning(out, per_file, files)
        if warning:
            log.warning(warning)


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


def make_loader(dataset, sampler, batch_size: int, num_workers: int, pin_memory: bool,
                collate_fn: Callable | None = None) -> DataLoader:
    """The training loader: persistent workers, 4 batches prefetched per worker, incomplete batch dropped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, collate_fn=collate_fn)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device):
    """AdamW, fused where the build supports it on this device, else the multi-tensor (foreach) path."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
