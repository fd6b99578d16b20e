"""A finetuning run: its flags, the task and checks that settle them, the data splits, the model, training with
the shared loop (``engine.Trainer``) and the report (``results.json`` and a table).

``main_finetune.py`` parses the command line and calls ``finetune``; the analysis scripts and the scene predictor
build the same splits and models through ``settle``, ``build_split`` and ``build_model``. The task object
(``tasks.Task``) is settled once, from ``--dataset`` and ``--task``, and handed to whatever needs it.

Backbones: the project's Swin (``mixmim_*``, every task) and, for BigEarthNet, the plain ViT (``vit_*``,
``models_vit``; ``_rel`` = relative-position bias). A ViT can be finetuned with a Patch Sampling Schedule
(``--pss``, ``util.pss``): each update keeps only the ``ceil(rho * N)`` patch tokens of largest embedding
norm, ``rho`` following the schedule; ``--eval_rho`` is the kept fraction at evaluation.

The best epoch is chosen on the validation split by ``--select_metric`` (BigEarthNet: mAP_macro,
SEN12-FLOOD: f1); at the end ``checkpoint_best.pth`` is scored once on val and test. SEN12-FLOOD has no
validation split: unless ``<data_path>/val`` exists, ``--val_fraction`` of the training sequences (seeded) are
held out for it.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

import backbones
import engine_finetune as E
from engine import Trainer, TrainSettings
from models_sen12_ft import PATCH_OPS
from models_swin import SWIN_WINDOWS, check_input_size
from sarwmix.cli import ArgumentParser, count
from sarwmix.data.datasets import build_dataset, dataset_spec
from sarwmix.errors import ConfigError
from tasks import TASKS, Task, task_for_dataset
from util import runner
from util.checkpoint import checkpoint_args, sha256_digest
from util.config import RunConfig, parse_with_config
from util.lr_decay import param_groups
from util.pretrained import checkpoint_epoch, load_pretrained_file, read_pretrained
from util.pss import PSS_KINDS, PatchSchedule, keep_count
from util.subsets import SubsetView, fraction_indices

log = logging.getLogger("sarwmix")
Config = argparse.Namespace | RunConfig  # settled flags (the analysis scripts) or a run's frozen configuration


def args_parser() -> argparse.ArgumentParser:
    """The flags of a finetuning run (``main_finetune.py``'s command line)."""
    parser = ArgumentParser("SAR-W-MixMAE finetuning", parents=[runner.common_parser()], allow_abbrev=False)
    g = parser.add_argument_group("finetuning")
    g.add_argument("--task", default=None, choices=tuple(TASKS), help="default: from --dataset")
    g.add_argument("--finetune", default="", help="pretraining checkpoint to start from (ours or released)")
    g.add_argument("--checkpoint_sha256", default=None, type=sha256_digest,
                   help="expected SHA-256 of the checkpoint loaded (64 hex digits)")
    g.add_argument("--eval", action="store_true", help="only evaluate the finetuned checkpoint --resume PATH")
    g.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=True,
                   help="shard evaluation over processes (off: every process scores the whole split)")
    g.add_argument("--nb_classes", type=count(1), default=None, help="head outputs (default: from the data set)")
    g.add_argument("--label_set", type=int, default=19, choices=(19, 43), help="BigEarthNet nomenclature")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--layer_decay", type=float, default=0.7, help="layer-wise lr decay (1.0: off)")
    g.add_argument("--freeze_encoder", action="store_true", help="linear probing: train the head only")
    g.add_argument("--train_fraction", type=float, default=1.0,
                   help="seeded, nested subset of the training split (label-efficiency study)")
    g.add_argument("--select_metric", default=None,
                   help="validation metric that picks checkpoint_best.pth (default mAP_macro / f1)")
    g.add_argument("--patch_op", default="avg", choices=PATCH_OPS, help="SEN12-FLOOD: pooling over tiles")
    g.add_argument("--tile_size", type=int, default=128, help="SEN12-FLOOD: encoder input side (tile)")
    g.add_argument("--val_fraction", type=float, default=0.1,
                   help="SEN12-FLOOD: share of training sequences held out for validation")
    g.add_argument("--num_eval_samples", type=count(1), default=None,
                   help="synthetic only: samples in each of val and test")
    g = parser.add_argument_group("patch sampling schedule (ViT backbones, BigEarthNet)")
    g.add_argument("--pss", default="none", choices=PSS_KINDS,
                   help="kept-token fraction rho per update: none (rho = 1), linear or cyclic")
    g.add_argument("--pss_min", type=float, default=0.2, help="lowest rho of the schedule")
    g.add_argument("--pss_max", type=float, default=1.0, help="highest rho of the schedule")
    g.add_argument("--pss_period", type=count(1), default=None,
                   help="cyclic: updates per cycle (default: one epoch of updates)")
    g.add_argument("--eval_rho", type=float, default=1.0, help="kept-token fraction at evaluation")
    parser.set_defaults(model="mixmim_tiny", input_size=None, epochs=2, warmup_epochs=1, batch_size=16,
                        blr=5e-4, weight_decay=0.05, num_samples=64, num_eval_samples=32,
                        output_dir="./output_finetune")
    return runner.document_defaults(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_config(args_parser(), argv, extra=runner.override_values)


def settle(args: argparse.Namespace) -> Task:
    """Settle task, input size and selection metric on the parsed flags (the task of ``--dataset`` gives
    the defaults); refuse inconsistent flags (ConfigError). Runs before the configuration is frozen.

    Returns:
        the run's task.
    """
    task = task_for_dataset(args.dataset)
    if args.task not in (None, task.name):
        raise ConfigError(f"--task {args.task} does not fit --dataset {args.dataset} (expected {task.name})")
    args.task = task.name
    if args.input_size is None:
        args.input_size = task.default_input_size
    task.check(args)
    args.select_metric = args.select_metric or task.default_metric
    if args.select_metric not in task.metrics:
        raise ConfigError(f"--select_metric {args.select_metric!r}: expected one of {list(task.metrics)} "
                          f"for {task.name}")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ConfigError(f"--train_fraction {args.train_fraction}: expected 0 < fraction <= 1")
    if args.eval and args.resume in ("", None):
        raise ConfigError("--eval needs the finetuned checkpoint as --resume PATH")
    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"--val_fraction {args.val_fraction}: expected 0 < fraction < 1")
    if not 0.0 <= args.drop_path < 1.0:
        raise ConfigError(f"--drop_path {args.drop_path}: expected a stochastic depth rate 0 <= rate < 1")
    if not 0.0 < args.layer_decay <= 1.0:
        raise ConfigError(f"--layer_decay {args.layer_decay}: expected 0 < decay <= 1 (1: no layer-wise decay)")
    if args.freeze_encoder:
        args.drop_path = 0.0  # linear probing: the frozen encoder must give the same features every time
    check_backbone(args, task)
    return task


def is_vit(name: str) -> bool:
    """A backbone that drops patch tokens (--pss, --eval_rho): the ViTs."""
    return name in backbones.names("token_drop")


def check_backbone(args: argparse.Namespace, task: Task) -> None:
    """The model name, and the flags only a ViT takes (--pss, --eval_rho), fit the task."""
    vits = ", ".join(backbones.names("token_drop"))
    finetunable = [n for n in backbones.BACKBONES if any(n in t.backbone_names() for t in TASKS.values())]
    if args.model not in finetunable:
        raise ConfigError(f"unknown model {args.model!r}; choices: {', '.join(finetunable)}")
    if args.model not in task.backbone_names():
        others = ", ".join(t.title for t in TASKS.values() if args.model in t.backbone_names())
        raise ConfigError(f"--model {args.model}: {args.task} finetuning takes {', '.join(task.backbone_names())}; "
                          f"{args.model} is finetuned on {others}")
    if not is_vit(args.model):
        if args.pss != "none" or args.eval_rho != 1.0:
            flag = f"--pss {args.pss}" if args.pss != "none" else f"--eval_rho {args.eval_rho}"
            raise ConfigError(f"{flag} drops patch tokens, which needs a ViT backbone: --model one of {vits} "
                              f"(got {args.model}, a Swin)")
        check_input_size(task.encoder_input_size(args), SWIN_WINDOWS)  # before the data set is indexed
        return
    if args.input_size % 16:
        raise ConfigError(f"--input_size {args.input_size} is not a multiple of the ViT patch size 16")
    if not 0.0 < args.eval_rho <= 1.0:
        raise ConfigError(f"--eval_rho {args.eval_rho}: expected 0 < rho <= 1")
    # Checks --pss_min/--pss_max/--pss_period now; the run's schedule needs the data size (build_schedule).
    PatchSchedule.from_run(args.pss, args.pss_min, args.pss_max, 1, 1, args.pss_period)
    if args.pss != "none" and getattr(args, "compile", False):
        # Every new kept-token count is a new graph: torch.compile would recompile until its cache limit,
        # then fall back to eager, so the combination only costs compile time.
        raise ConfigError(f"--compile with --pss {args.pss}: each kept-token count is a new graph for "
                          "torch.compile; train PSS runs without --compile")


def split_file_of(args: Config, split: str) -> str | None:
    """The ``--split_file`` of one split: a data set with one list per split (BigEarthNet v1) takes the folder
    of its lists (default: ``splits/`` beside the data, else the official lists in ``datasets/``); a metadata
    file holding every split (v2) is passed as is."""
    spec = dataset_spec(args.dataset)
    if spec.split_list is None or not args.split_file:
        return args.split_file
    return spec.split_list(args.split_file, split)


def build_split(args: Config, split: str):
    """One split of the data set of ``args`` (``train``, ``val`` or ``test``)."""
    n = args.num_samples if split == "train" else args.num_eval_samples
    return build_dataset(args.dataset, data_path=args.data_path, split=split, input_size=args.input_size,
                         channels=tuple(args.channels), split_file=split_file_of(args, split),
                         num_samples=n, seed=args.seed, label_set=args.label_set,
                         scene=args.synthetic_scene)


def build_splits(args: Config, task: Task, world_size: int) -> dict:
    """train (``--train_fraction`` of it), val and test data sets of the run."""
    train = build_split(args, "train")
    if task.holds_out_validation(args.data_path):
        keep, held = task.hold_out(train, args.val_fraction, args.seed)
        val, train = SubsetView(train, held), SubsetView(train, keep)
        log.info("%s validation: %d samples held out of the training split (seed %d)", task.title, len(val),
                 args.seed)
    else:
        val = build_split(args, "val")
    if args.train_fraction < 1.0:
        train = SubsetView(train, fraction_indices(len(train), args.train_fraction, args.seed))
    per_update = args.batch_size * args.accum_iter * world_size
    if not args.eval and len(train) < per_update:
        raise ConfigError(f"training split has {len(train)} samples, fewer than one global batch of "
                          f"{per_update}; lower --batch_size or raise --train_fraction/--num_samples")
    log.info("samples: train %d, val %d", len(train), len(val))
    task.check_validation(val, args.select_metric)
    return {"train": train, "val": val, "test": build_split(args, "test")}


def build_model(args: Config, task: Task, num_classes: int) -> torch.nn.Module:
    """The task's finetuning model of the backbone ``--model`` (its wrapper from the backbone table)."""
    if args.nb_classes is not None and args.nb_classes != num_classes:
        raise ConfigError(f"--nb_classes {args.nb_classes} but the data set has {num_classes} classes")
    common = {"in_chans": len(args.channels), "drop_path_rate": args.drop_path}
    return task.finetune_model(args, num_classes, **common)


def optimizer_groups(args: Config, model) -> list[dict]:
    """AdamW groups with layer-wise lr decay; the encoder is frozen first for linear probing."""
    if args.freeze_encoder:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return param_groups(model, args.weight_decay, model.layer_id, model.num_layers, args.layer_decay)


def provenance(args: Config, init: dict | None, evaluated: dict) -> dict:
    """``finetune``, ``pretrain_epoch``, ``train_fraction`` and ``freeze_encoder`` (the protocol: linear
    probe or finetuning) behind the reported model.

    After training they come from this run (``pretrain_epoch``: settled from the --finetune file by
    ``read_checkpoints``). With --eval they come from the evaluated checkpoint's stored args when this command
    line does not give them (the protocol always: an evaluation trains nothing; None when the checkpoint does
    not record it).
    """
    if init is not None:
        return {"finetune": args.finetune, "pretrain_epoch": args.pretrain_epoch,
                "train_fraction": args.train_fraction, "freeze_encoder": bool(args.freeze_encoder)}
    stored = checkpoint_args(evaluated if args.eval else {})
    source = args.finetune or stored.finetune
    epoch = checkpoint_epoch(source, {}) if source else None
    if not args.finetune and stored.pretrain_epoch is not None:  # recorded by the training run
        epoch = stored.pretrain_epoch
    fraction = stored.train_fraction
    frozen = stored.get("freeze_encoder") if args.eval else args.freeze_encoder
    return {"finetune": source, "pretrain_epoch": epoch,
            "train_fraction": float(args.train_fraction if fraction is None else fraction),
            "freeze_encoder": frozen if isinstance(frozen, bool) else None}


def adopt_holdout(flags: RunConfig, task: Task, evaluated: dict) -> dict:
    """--eval of SEN12-FLOOD without a val/ folder: hold out the sequences the evaluated run held out.

    Its validation pairs were carved from the training split by ``--seed`` and ``--val_fraction``; the
    checkpoint's values win over this command line's, so "val" never holds sequences the model trained on.

    Returns:
        the values to settle instead of the command line's (empty: none).
    """
    if not task.holds_out_validation(flags.data_path):
        return {}
    stored = checkpoint_args(evaluated)
    adopted = {}
    for name in ("seed", "val_fraction"):
        value = getattr(stored, name)
        if value is not None and value != getattr(flags, name):
            log.warning("--eval: --%s %s from the checkpoint instead of %s, so that val holds the sequences its "
                        "training held out", name, value, getattr(flags, name))
            adopted[name] = value
    return adopted


def read_checkpoints(flags: RunConfig, task: Task, run: runner.Run) -> tuple[Path | None, dict | None, dict | None,
                                                                            dict]:
    """Read the checkpoint whose recorded values settle the configuration, before it is recorded.

    --eval: the evaluated checkpoint (its hold-out is adopted, ``adopt_holdout``); training from
    ``--finetune``: the pretraining checkpoint (its epoch is recorded as ``pretrain_epoch``, stored with the
    args of every checkpoint of this run, for an --eval of a ``checkpoint.pth``-named source).

    Returns:
        (evaluated path, evaluated checkpoint, pretraining checkpoint, values to settle), None where not
        applicable.
    """
    channels = tuple(flags.channels)
    if flags.eval:
        chosen = run.output_dir / "checkpoint_best.pth" if flags.resume == "auto" else Path(flags.resume)
        ckpt = read_pretrained(chosen, flags.checkpoint_sha256, channels)
        return chosen, ckpt, None, adopt_holdout(flags, task, ckpt)
    if not flags.finetune:
        return None, None, None, {}
    init = read_pretrained(flags.finetune, flags.checkpoint_sha256, channels)
    return None, None, init, {"pretrain_epoch": checkpoint_epoch(flags.finetune, init)}


def evaluator(args: Config, task: Task, run: runner.Run, dataset):
    """``score(model) -> metrics`` of one split (a ViT at ``--eval_rho``); sharded with --dist_eval."""
    shard = args.dist_eval and run.info.distributed
    world, rank = (run.info.world_size, run.info.rank) if shard else (1, 0)
    loader = E.eval_loader(dataset, args.batch_size, args.num_workers, world, rank, skip_bad=args.skip_bad)
    stats = dataset.stats
    rho = args.eval_rho if is_vit(args.model) else None

    def score(model) -> dict:
        return E.evaluate(model, loader, run.device, task, stats["mean"], stats["std"], run.amp_dtype,
                          task.device_input_size(args), gather=shard, rho=rho)

    return score


def build_schedule(args: Config, n_train: int) -> PatchSchedule | None:
    """The run's patch schedule (ViT only), one step per optimizer update; None for a Swin."""
    if not is_vit(args.model):
        return None
    updates = n_train // args.eff_batch_size  # BlockShardSampler: whole global batches per epoch
    schedule = PatchSchedule.from_run(args.pss, args.pss_min, args.pss_max, updates, args.epochs,
                                      args.pss_period)
    log.info("patch sampling: %s, %d updates per epoch", schedule, updates)
    return schedule


def train(args: RunConfig, task: Task, run: runner.Run, model, splits: dict) -> Path:
    """Finetune with the shared loop; return the checkpoint to report (best on validation)."""
    stats = splits["train"].stats
    schedule = build_schedule(args, len(splits["train"]))
    rho_fn = schedule.value if schedule is not None else None
    n_tokens = model.num_tokens if schedule is not None else 0
    step = E.make_finetune_step(run.device, stats["mean"], stats["std"], task, task.device_input_size(args),
                                rho_fn=rho_fn, n_tokens=n_tokens)
    score_val = evaluator(args, task, run, splits["val"])
    # The evaluation rho goes into val_log.json and log.txt next to the metrics it produced.
    rho_info = {"rho": args.eval_rho, "tokens_kept": keep_count(n_tokens, args.eval_rho)} if schedule else {}

    def validate(raw_model, epoch: int) -> dict:
        return {**score_val(raw_model), **rho_info}

    def on_update(iteration: int) -> dict:
        schedule.step()
        return {}

    trainer = Trainer(TrainSettings.of(args), run, model, splits["train"], step, groups=optimizer_groups(args, model),
                      betas=(0.9, 0.999), evaluate=validate, select_metric=args.select_metric,
                      on_iteration=on_update if schedule else None,
                      extra_state={"pss": schedule} if schedule else None)
    trainer.fit()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has written checkpoint_best.pth
    best = run.output_dir / "checkpoint_best.pth"
    if not best.exists():
        log.warning("no epoch improved %s (NaN?): reporting the last checkpoint", args.select_metric)
        best = run.output_dir / "checkpoint.pth"
    return best


def finetune(flags: RunConfig, task: Task) -> dict:
    """The whole run of the settled, frozen ``flags`` (``settle`` gave ``task``): train (or only evaluate,
    --eval) and score the chosen checkpoint on val and test."""
    run = runner.start(flags, task=f"finetune ({task.name})", record=False)
    chosen, ckpt, init, adopted = read_checkpoints(run.flags, task, run)
    config = runner.record_config(run, **adopted)  # config.yaml written: the run reads this from here on
    splits = build_splits(config, task, run.info.world_size)
    model = build_model(config, task, splits["train"].num_classes).to(run.device)
    if config.eval:
        resized = backbones.load_weights(model, ckpt, chosen, config.model, keep_head=True)["resized"]
        if resized:  # legitimate, but the numbers are then those of another model than the one trained
            log.warning("--eval: %s was trained at another input size or window; resized to this run's: %s",
                        chosen, ", ".join(resized[:4]) + (" ..." if len(resized) > 4 else ""))
    else:
        if init is not None:
            backbones.load_weights(model, init, config.finetune, config.model)
        chosen = train(config, task, run, model, splits)
        ckpt, _ = load_pretrained_file(model, chosen, keep_head=True, channels=tuple(config.channels))
    results = report(config, task, run, model, splits, chosen, ckpt, init)
    runner.finish(run)
    return results


def report(config: RunConfig, task: Task, run: runner.Run, model, splits: dict, chosen: Path, ckpt: dict,
           init: dict | None) -> dict:
    """Score the reported checkpoint on val and test; write ``results.json`` and print the table (rank 0)."""
    vit = {"pss": config.pss, "eval_rho": config.eval_rho} if is_vit(config.model) else {}
    results = {"task": task.name, "model": config.model, "dataset": config.dataset, **vit,
               **provenance(config, init, ckpt),
               "best_epoch": ckpt.get("epoch"), "selection_metric": config.select_metric,
               "evaluated_checkpoint": str(chosen),
               **{split: evaluator(config, task, run, splits[split])(model) for split in ("val", "test")}}
    if run.info.is_main:
        E.write_results(run.output_dir / "results.json", results)
        print(E.format_table(results), flush=True)
    return results
