"""Finetuning entry point: BigEarthNet v1/v2 (multi-label) and SEN12-FLOOD (flood change on pairs).

    python main_finetune.py --finetune output_dir/checkpoint.pth      # short CPU run on synthetic data
    python main_finetune.py --config configs/finetune_benv1_base.yaml --data_path /data/BigEarthNet-S1-v1.0 \
        --finetune benv1_pretrain_checkpoint_64.pth
    python main_finetune.py --eval --resume benv1_finetune_checkpoint_best.pth --model mixmim_base ...
    python main_finetune.py --model vit_small_rel --pss cyclic --pss_min 0.2 --pss_max 1.0   # ViT + PSS

Backbones: the project's Swin (``mixmim_*``, every task) and, for BigEarthNet, the plain ViT (``vit_*``,
``models_vit``; ``_rel`` = relative-position bias). A ViT can be finetuned with a Patch Sampling Schedule
(``--pss``, ``util.pss``): each update keeps only the ``ceil(rho * N)`` patch tokens of largest embedding
norm, ``rho`` following the schedule; ``--eval_rho`` is the kept fraction at evaluation.

The best epoch is chosen on the validation split by ``--select_metric`` (BigEarthNet: mAP_macro,
SEN12-FLOOD: f1); at the end ``checkpoint_best.pth`` is scored once on val and test and the scores go to
``<output_dir>/results.json`` and a printed table. SEN12-FLOOD has no validation split: unless
``<data_path>/val`` exists, ``--val_fraction`` of the training sequences (seeded) are held out for it.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

import backbones
import engine_finetune as E
from engine_pretrain import Trainer
from models_mixmim import SWIN_WINDOWS, check_input_size, valid_input_sizes
from models_sen12_ft import PATCH_OPS
from sarwmix.datasets import build_dataset
from sarwmix.errors import ConfigError
from util import runner
from util.checkpoint import args_dict, model_state
from util.config import parse_with_config, run_cli
from util.lr_decay import param_groups
from util.metrics import BEN_METRICS, SEN12_METRICS
from util.pretrained import checkpoint_epoch, load_pretrained, load_pretrained_file, read_pretrained
from util.pss import PSS_KINDS, PatchSchedule, keep_count

log = logging.getLogger("sarwmix")
DEFAULT_METRIC = {"ben": "mAP_macro", "sen12flood": "f1"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SAR-W-MixMAE finetuning", parents=[runner.common_parser()],
                                     allow_abbrev=False)
    g = parser.add_argument_group("finetuning")
    g.add_argument("--task", default=None, choices=E.TASKS, help="default: from --dataset")
    g.add_argument("--finetune", default="", help="pretraining checkpoint to start from (ours or released)")
    g.add_argument("--checkpoint_sha256", default=None, help="expected SHA-256 of the checkpoint loaded")
    g.add_argument("--eval", action="store_true", help="only evaluate the finetuned checkpoint --resume PATH")
    g.add_argument("--dist_eval", action=argparse.BooleanOptionalAction, default=True,
                   help="shard evaluation over processes (off: every process scores the whole split)")
    g.add_argument("--nb_classes", type=int, default=None, help="head outputs (default: from the data set)")
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
    g.add_argument("--num_eval_samples", type=int, default=None,
                   help="synthetic only: samples in each of val and test")
    g = parser.add_argument_group("patch sampling schedule (ViT backbones, BigEarthNet)")
    g.add_argument("--pss", default="none", choices=PSS_KINDS,
                   help="kept-token fraction rho per update: none (rho = 1), linear or cyclic")
    g.add_argument("--pss_min", type=float, default=0.2, help="lowest rho of the schedule")
    g.add_argument("--pss_max", type=float, default=1.0, help="highest rho of the schedule")
    g.add_argument("--pss_period", type=int, default=None,
                   help="cyclic: updates per cycle (default: one epoch of updates)")
    g.add_argument("--eval_rho", type=float, default=1.0, help="kept-token fraction at evaluation")
    parser.set_defaults(model="mixmim_tiny", input_size=None, epochs=2, warmup_epochs=1, batch_size=16,
                        blr=5e-4, weight_decay=0.05, num_samples=64, num_eval_samples=32,
                        output_dir="./output_finetune")
    return runner.document_defaults(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_config(get_args_parser(), argv, extra=runner.override_values)


def resolve_task(args: argparse.Namespace) -> None:
    """Derive task, input size and selection metric; refuse inconsistent flags (ConfigError)."""
    task = "sen12flood" if args.dataset == "sen12flood" else "ben"
    if args.task not in (None, task):
        raise ConfigError(f"--task {args.task} does not fit --dataset {args.dataset} (expected {task})")
    args.task = task
    if args.input_size is None:  # SEN12-FLOOD: side of the pair images (512, released); BEN: patch side
        args.input_size = 512 if task == "sen12flood" else 128
    if task == "sen12flood":
        if args.tile_size not in valid_input_sizes(SWIN_WINDOWS, max(args.tile_size, 32)):
            raise ConfigError(f"--tile_size {args.tile_size} does not fit the Swin windows {list(SWIN_WINDOWS)}; "
                              f"valid tile sizes: {valid_input_sizes(SWIN_WINDOWS, 512)}")
        if args.input_size % args.tile_size:
            raise ConfigError(f"--input_size {args.input_size} is not a multiple of --tile_size {args.tile_size}")
    valid = BEN_METRICS if task == "ben" else SEN12_METRICS
    args.select_metric = args.select_metric or DEFAULT_METRIC[task]
    if args.select_metric not in valid:
        raise ConfigError(f"--select_metric {args.select_metric!r}: expected one of {list(valid)} for {task}")
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
    check_backbone(args)


def is_vit(name: str) -> bool:
    """A backbone that drops patch tokens (--pss, --eval_rho): the ViTs."""
    return name in backbones.names("token_drop")


def check_backbone(args: argparse.Namespace) -> None:
    """The model name, and the flags only a ViT takes (--pss, --eval_rho), fit the task."""
    vits = ", ".join(backbones.names("token_drop"))
    if args.model not in backbones.names("finetune"):
        raise ConfigError(f"unknown model {args.model!r}; choices: {', '.join(backbones.names('finetune'))}")
    if is_vit(args.model) and args.task != "ben":
        raise ConfigError(f"--model {args.model}: {args.task} finetuning takes the Swin backbones "
                          f"({', '.join(backbones.names('pair_finetune'))}); the ViT backbones are for BigEarthNet")
    if not is_vit(args.model):
        if args.pss != "none" or args.eval_rho != 1.0:
            flag = f"--pss {args.pss}" if args.pss != "none" else f"--eval_rho {args.eval_rho}"
            raise ConfigError(f"{flag} drops patch tokens, which needs a ViT backbone: --model one of {vits} "
                              f"(got {args.model}, a Swin)")
        if args.task == "ben":  # before the data set is indexed (SEN12-FLOOD: the tile size, checked above)
            check_input_size(args.input_size, SWIN_WINDOWS)
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


def split_file_of(args: argparse.Namespace, split: str) -> str | None:
    """BigEarthNet v1 needs one list per split: ``--split_file`` names the folder of train/val/test.csv, or
    of their ``.csv.gz`` (default: ``splits/`` beside the data, else the official lists in ``datasets/``).
    v2's metadata file holds every split and is passed as is."""
    if args.dataset not in ("benv1", "benv1_zarr") or not args.split_file:
        return args.split_file
    folder = Path(args.split_file)
    if not folder.is_dir():
        raise ConfigError(f"--split_file {folder}: for BigEarthNet v1 finetuning give the folder holding "
                          f"train.csv, val.csv and test.csv (one list cannot define three splits)")
    compressed = folder / f"{split}.csv.gz"  # the layout of the shipped datasets/
    return str(compressed if compressed.is_file() and not (folder / f"{split}.csv").is_file()
               else folder / f"{split}.csv")


def build_split(args: argparse.Namespace, split: str):
    """One split of the data set of ``args`` (``train``, ``val`` or ``test``)."""
    n = args.num_samples if split == "train" else args.num_eval_samples
    return build_dataset(args.dataset, data_path=args.data_path, split=split, input_size=args.input_size,
                         channels=tuple(args.channels), split_file=split_file_of(args, split),
                         skip_bad=args.skip_bad, num_samples=n, seed=args.seed, label_set=args.label_set,
                         scene=args.synthetic_scene)


def carves_validation(args: argparse.Namespace) -> bool:
    """SEN12-FLOOD without a ``val/`` folder: validation is held out of the training sequences."""
    return args.task == "sen12flood" and not (Path(args.data_path) / "val").is_dir()


def build_splits(args: argparse.Namespace, world_size: int) -> dict:
    """train (``--train_fraction`` of it), val and test data sets of the run."""
    train = build_split(args, "train")
    if carves_validation(args):
        keep, held = E.holdout_by_sequence(train.files, args.val_fraction, args.seed)
        val, train = E.SubsetView(train, held), E.SubsetView(train, keep)
        log.info("SEN12-FLOOD validation: %d pairs of held-out training sequences (seed %d)", len(val), args.seed)
    else:
        val = build_split(args, "val")
    if args.train_fraction < 1.0:
        train = E.SubsetView(train, E.fraction_indices(len(train), args.train_fraction, args.seed))
    per_update = args.batch_size * args.accum_iter * world_size
    if not args.eval and len(train) < per_update:
        raise ConfigError(f"training split has {len(train)} samples, fewer than one global batch of "
                          f"{per_update}; lower --batch_size or raise --train_fraction/--num_samples")
    log.info("samples: train %d, val %d", len(train), len(val))
    if args.task == "sen12flood" and args.select_metric != "accuracy" and not any(pair_labels(val)):
        log.warning("the SEN12-FLOOD validation split holds no flood pair: its %s is 0 in every epoch, so the "
                    "first epoch would be kept; use another --seed / --val_fraction, a val/ folder, or "
                    "--select_metric accuracy", args.select_metric)
    return {"train": train, "val": val, "test": build_split(args, "test")}


def pair_labels(dataset) -> list[int]:
    """The 0/1 labels of a SEN12-FLOOD data set or of a view of one (from the file names, nothing read)."""
    if isinstance(dataset, E.SubsetView):
        base = pair_labels(dataset.base)
        return [base[i] for i in dataset.indices]
    return list(dataset.labels)


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    if args.nb_classes is not None and args.nb_classes != num_classes:
        raise ConfigError(f"--nb_classes {args.nb_classes} but the data set has {num_classes} classes")
    common = {"in_chans": len(args.channels), "drop_path_rate": args.drop_path}
    bb = backbones.get(args.model, "finetune")
    if args.task == "sen12flood":
        return bb.pair_finetune(num_classes, args.patch_op, img_size=args.tile_size, **common)
    return bb.finetune(num_classes, img_size=args.input_size, **common)


def optimizer_groups(args: argparse.Namespace, model) -> list[dict]:
    """AdamW groups with layer-wise lr decay; the encoder is frozen first for linear probing."""
    if args.freeze_encoder:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return param_groups(model, args.weight_decay, model.layer_id, model.num_layers, args.layer_decay)


def provenance(args: argparse.Namespace, init: dict | None, evaluated: dict) -> dict:
    """``finetune``, ``pretrain_epoch`` and ``train_fraction`` behind the reported model.

    After training they come from this run (the epoch from the --finetune file). With --eval they come
    from the evaluated checkpoint's stored args when this command line does not give them.
    """
    if init is not None:
        return {"finetune": args.finetune, "pretrain_epoch": checkpoint_epoch(args.finetune, init),
                "train_fraction": args.train_fraction}
    stored = args_dict(evaluated.get("args")) if args.eval else {}
    source = args.finetune or stored.get("finetune") or None
    epoch = checkpoint_epoch(source, {}) if source else None
    if not args.finetune and stored.get("pretrain_epoch") is not None:  # recorded by the training run
        epoch = int(stored["pretrain_epoch"])
    return {"finetune": source, "pretrain_epoch": epoch,
            "train_fraction": float(stored.get("train_fraction", args.train_fraction))}


def adopt_holdout(args: argparse.Namespace, evaluated: dict) -> None:
    """--eval of SEN12-FLOOD without a val/ folder: hold out the sequences the evaluated run held out.

    Its validation pairs were carved from the training split by ``--seed`` and ``--val_fraction``; the
    checkpoint's values win over this command line's, so "val" never holds sequences the model trained on.
    """
    if not carves_validation(args):
        return
    stored = args_dict(evaluated.get("args"))
    for name in ("seed", "val_fraction"):
        if name in stored and stored[name] != getattr(args, name):
            log.warning("--eval: --%s %s from the checkpoint instead of %s, so that val holds the sequences its "
                        "training held out", name, stored[name], getattr(args, name))
            setattr(args, name, type(getattr(args, name))(stored[name]))


def _pair_size(args: argparse.Namespace) -> int | None:
    return args.input_size if args.task == "sen12flood" else None


def evaluator(args: argparse.Namespace, run: runner.Run, dataset):
    """``score(model) -> metrics`` of one split (a ViT at ``--eval_rho``); sharded with --dist_eval."""
    shard = args.dist_eval and run.info.distributed
    world, rank = (run.info.world_size, run.info.rank) if shard else (1, 0)
    loader = E.eval_loader(dataset, args.batch_size, args.num_workers, world, rank)
    stats = dataset.stats
    rho = args.eval_rho if is_vit(args.model) else None

    def score(model) -> dict:
        return E.evaluate(model, loader, run.device, args.task, stats["mean"], stats["std"], run.amp_dtype,
                          _pair_size(args), gather=shard, rho=rho)

    return score


def build_schedule(args: argparse.Namespace, n_train: int) -> PatchSchedule | None:
    """The run's patch schedule (ViT only), one step per optimizer update; None for a Swin."""
    if not is_vit(args.model):
        return None
    updates = n_train // args.eff_batch_size  # BlockShardSampler: whole global batches per epoch
    schedule = PatchSchedule.from_run(args.pss, args.pss_min, args.pss_max, updates, args.epochs,
                                      args.pss_period)
    log.info("patch sampling: %s, %d updates per epoch", schedule, updates)
    return schedule


def train(args, run, model, splits: dict) -> Path:
    """Finetune with the shared loop; return the checkpoint to report (best on validation)."""
    stats = splits["train"].stats
    schedule = build_schedule(args, len(splits["train"]))
    rho_fn = schedule.value if schedule is not None else None
    n_tokens = model.num_tokens if schedule is not None else 0
    step = E.make_finetune_step(run.device, stats["mean"], stats["std"], args.task, _pair_size(args),
                                rho_fn=rho_fn, n_tokens=n_tokens)
    score_val = evaluator(args, run, splits["val"])
    # The evaluation rho goes into val_log.json and log.txt next to the metrics it produced.
    rho_info = {"rho": args.eval_rho, "tokens_kept": keep_count(n_tokens, args.eval_rho)} if schedule else {}

    def validate(raw_model, epoch: int) -> dict:
        return {**score_val(raw_model), **rho_info}

    def on_update(iteration: int) -> dict:
        schedule.step()
        return {}

    trainer = Trainer(args, run, model, splits["train"], step, groups=optimizer_groups(args, model),
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


def main(args: argparse.Namespace) -> dict:
    resolve_task(args)
    backbones.check_args(args)
    run = runner.start(args, task=f"finetune ({args.task})", record=False)
    channels, init = tuple(args.channels), None
    if args.eval:  # read first: its stored args can decide the validation split
        chosen = run.output_dir / "checkpoint_best.pth" if args.resume == "auto" else Path(args.resume)
        ckpt = read_pretrained(chosen, args.checkpoint_sha256, channels)
        adopt_holdout(args, ckpt)
        runner.record_config(run, args)  # with the hold-out the evaluated run used
    splits = build_splits(args, run.info.world_size)
    model = build_model(args, splits["train"].num_classes).to(run.device)
    if args.eval:
        resized = load_pretrained(model, model_state(ckpt, chosen), chosen, keep_head=True)["resized"]
        if resized:  # legitimate, but the numbers are then those of another model than the one trained
            log.warning("--eval: %s was trained at another input size or window; resized to this run's: %s",
                        chosen, ", ".join(resized[:4]) + (" ..." if len(resized) > 4 else ""))
    else:
        if args.finetune:
            init, _ = load_pretrained_file(model, args.finetune, args.checkpoint_sha256, channels=channels)
            # Stored with the args of every checkpoint of this run, for --eval of a checkpoint.pth-named source.
            args.pretrain_epoch = checkpoint_epoch(args.finetune, init)
        runner.record_config(run, args)
        chosen = train(args, run, model, splits)
        ckpt, _ = load_pretrained_file(model, chosen, keep_head=True, channels=channels)
    vit = {"pss": args.pss, "eval_rho": args.eval_rho} if is_vit(args.model) else {}
    results = {"task": args.task, "model": args.model, "dataset": args.dataset, **vit,
               **provenance(args, init, ckpt),
               "best_epoch": ckpt.get("epoch"), "selection_metric": args.select_metric,
               "evaluated_checkpoint": str(chosen),
               **{split: evaluator(args, run, splits[split])(model) for split in ("val", "test")}}
    if run.info.is_main:
        E.write_results(run.output_dir / "results.json", results)
        print(E.format_table(results), flush=True)
    runner.finish(run)
    return results


if __name__ == "__main__":
    run_cli(main, parse_args)
