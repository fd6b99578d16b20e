"""What both runs share around the training loop: common flags, run setup (distributed mode, logging, seeding,
the settled configuration and its ``config.yaml``), the training data, and teardown.

The runs (``pretraining.pretrain``, ``finetuning.finetune``) start here, build their model and step, and hand
them to ``engine.Trainer``, where the loop, logging, resume and checkpoint code exists once.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sarwmix.cli import count
from sarwmix.constants import CHANNELS
from sarwmix.data.datasets import build_dataset, dataset_names, dataset_spec
from sarwmix.errors import ConfigError
from util.config import RunConfig, coerce, nearest, str2bool, write_config
from util.device import CPU_MEMORY_MODES, resolve_amp, tune_cpu_memory
from util.distributed import DistInfo, cleanup_distributed, init_distributed
from util.logs import JsonLines, setup_logging
from util.preemption import PreemptionSignal
from util.tb_writer import LazySummaryWriter

log = logging.getLogger("sarwmix")


def document_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append ``(default: X)`` to the --help of every option with a default its help does not state."""
    for action in parser._actions:
        help_text = action.help or ""
        if (action.option_strings and action.help is not argparse.SUPPRESS and "default" not in help_text
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            action.help = f"{help_text} (default: %(default)s)".lstrip()
    return parser


def common_parser() -> argparse.ArgumentParser:
    """Flags shared by pretraining and finetuning (declared once, used as ``parents=[...]``)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file of flag: value (explicit flags win)")
    p.add_argument("--override", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides, flag names or dotted keys (MODEL.BACKBONE=...); flags still win")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mixmim_base", help="model name (see docs/PRETRAIN.md)")
    g.add_argument("--input_size", type=int, default=128, help="image side in pixels")
    g.add_argument("--channels", nargs="+", default=list(CHANNELS), help="subset of VH VV, in that order")
    g.add_argument("--dataset", default="synthetic", choices=dataset_names())
    g.add_argument("--data_path", default=None, help="root of the data set (not needed for synthetic)")
    g.add_argument("--split_file", default=None, help="official split list / CSV to select patches")
    g.add_argument("--num_samples", type=count(1), default=None, help="synthetic: number of training samples")
    g.add_argument("--synthetic_scene", default="mosaic", choices=("mosaic", "structured"),
                   help="synthetic: fields differing in level and fine texture, or with each cover's spatial "
                        "structure (street grids, parcels with rows, canopy, rivers, lakes)")
    g.add_argument("--skip_bad", action="store_true",
                   help="skip bad patches (unreadable, NaN/Inf, wrong shape): counted per epoch in log.txt, listed "
                        "in bad_patches.txt (default: stop with one line naming the patch)")
    g.add_argument("--max_bad", type=float, default=0.001,
                   help="with --skip_bad: stop when more than this fraction of an epoch's samples is bad")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=count(1), default=64, help="per process")
    g.add_argument("--epochs", type=count(1), default=400)
    g.add_argument("--accum_iter", type=count(1), default=1, help="gradient accumulation steps")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr per 256 images")
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--warmup_epochs", type=float, default=40)
    g.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (default: log only)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back if unavailable)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing in the encoder")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./output_dir")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' (output_dir/checkpoint.pth)")
    g.add_argument("--start_epoch", type=count(0), default=0)
    g.add_argument("--save_freq", type=count(0), default=0, help="also keep checkpoint_<N>.pth every N epochs")
    g.add_argument("--save_every_minutes", type=float, default=0.0,
                   help="also write checkpoint.pth inside an epoch every M minutes, at the position reached "
                        "(0: at epoch ends only)")
    g.add_argument("--save_every_steps", type=count(0), default=0,
                   help="also write checkpoint.pth inside an epoch every N optimizer updates (0: off)")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a collective may wait for another rank, and a rank may go without finishing "
                        "a step, before the run reports the stall and stops")
    g.add_argument("--num_workers", type=count(0), default=2)
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--num_threads", type=count(0), default=0, help="torch CPU threads per process (0: torch default)")
    g.add_argument("--cpu_memory", default="tuned", choices=CPU_MEMORY_MODES,
                   help="CPU runs: keep freed memory and use huge pages (tuned) or leave glibc's allocator alone")
    g.add_argument("--dist_on_itp", action="store_true", help="accepted for compatibility; launchers are detected")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return p


# Dotted keys of SimMIM-style YAML configs (e.g. DATA.IMG_SIZE) -> flags.
# A key whose flag an entry point lacks is refused there.
DOTTED_KEYS: dict[str, str] = {
    "MODEL.BACKBONE": "model", "MODEL.IN_CHANS": "in_chans", "MODEL.MASK_RATIO": "mask_ratio",
    "MODEL.MASK_PATCH_SIZE": "mask_patch_size", "MODEL.DROP_PATH": "drop_path", "MODEL.MODE": "mode",
    "MODEL.LOSS": "loss", "MODEL.WEIGHTING": "weighting", "MODEL.NORM_PIX_LOSS": "norm_pix_loss",
    "MODEL.NUM_CLASSES": "nb_classes", "MODEL.BACKBONE.WEIGHTS": "finetune",
    "DATA.IMG_SIZE": "input_size", "DATA.TRAIN_DATA": "data_path", "DATA.DATASET": "dataset",
    "DATA.CHANNELS": "channels", "DATA.SPLIT_FILE": "split_file", "DATA.NUM_WORKERS": "num_workers",
    "TRAIN.BATCH_SIZE": "batch_size", "TRAIN.EPOCHS": "epochs", "TRAIN.STOP_EPOCH": "stop_epoch",
    "TRAIN.LR": "lr", "TRAIN.BASE_LR": "blr", "TRAIN.MIN_LR": "min_lr",
    "TRAIN.WARMUP_EPOCHS": "warmup_epochs", "TRAIN.WEIGHT_DECAY": "weight_decay",
    "TRAIN.LAYER_DECAY": "layer_decay", "TRAIN.ACCUM_ITER": "accum_iter",
    "TRAIN.SEED": "seed", "TRAIN.OUTPUT_DIR": "output_dir", "TRAIN.SAVE_FREQ": "save_freq",
    "TRAIN.CLIP_GRAD": "clip_grad", "TRAIN.AMP": "amp",
}


def override_values(parser: argparse.ArgumentParser, first: argparse.Namespace) -> dict:
    """``--override KEY=VALUE ...`` as flag values, validated like config keys.

    KEY is a flag name (``epochs``) or a dotted key of ``DOTTED_KEYS`` (``TRAIN.EPOCHS``, any case);
    VALUE is read as YAML (``1e-3`` -> 0.001, ``null`` -> None). ``MODEL.IN_CHANS=1`` selects VV and ``=2``
    VH VV; channel lists take ``VH VV``, ``VH,VV`` or ``[VH, VV]``.
    """
    out: dict = {}
    for item in first.override or []:
        if "=" not in item:
            raise ConfigError(f"--override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        dest, value = _override_item(parser, key.strip(), raw.strip())
        out[dest] = value
    return out


def _override_item(parser: argparse.ArgumentParser, key: str, raw: str) -> tuple[str, object]:
    """One KEY=VALUE pair -> (flag destination, checked value)."""
    dest = key
    if "." in key:
        if key.upper() not in DOTTED_KEYS:
            guess = nearest(key.upper(), list(DOTTED_KEYS))
            raise ConfigError(f"--override: unknown key {key!r}; did you mean {guess!r}?")
        dest = DOTTED_KEYS[key.upper()]
    actions = {a.dest: a for a in parser._actions}
    if dest == "in_chans":  # the channel count is set through the channel list (1: VV, 2: VH VV)
        n = coerce_int(raw, key)
        if not 1 <= n <= len(CHANNELS):
            raise ConfigError(f"--override {key}={raw}: expected 1 ({CHANNELS[-1]}) or {len(CHANNELS)} "
                              f"({' '.join(CHANNELS)})")
        return "channels", list(CHANNELS[-n:])
    if "." in key and dest not in actions:
        raise ConfigError(f"--override {key}: maps to --{dest}, which {parser.prog!r} does not take")
    if isinstance(actions.get(dest), argparse.BooleanOptionalAction):
        try:
            return dest, str2bool(raw)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--override {key}: {e}") from None
    if dest == "channels":
        value = yaml.safe_load(raw) if raw.startswith("[") else raw.replace(",", " ").split()
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
    return dest, coerce(parser, dest, value, f"--override {key}")


def coerce_int(raw: str, key: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"--override {key}={raw!r}: expected an integer") from None


@dataclass
class Run:
    """Process-level state of one run."""

    info: DistInfo
    device: torch.device
    output_dir: Path
    amp_dtype: torch.dtype | None
    tb: object = None
    flags: RunConfig | None = None  # the flags with the derived values (``start``), not yet recorded
    config: RunConfig | None = None  # set by record_config once every value is settled
    preemption: PreemptionSignal | None = None  # SIGTERM / SIGUSR1 recorded from start-up on
    epoch_log: JsonLines = field(default_factory=lambda: JsonLines(None))
    step_log: JsonLines = field(default_factory=lambda: JsonLines(None))


def derive(args: argparse.Namespace | RunConfig, world_size: int) -> dict:
    """Effective batch and absolute lr, computed in one place and printed once: the values to settle."""
    eff_batch_size = args.batch_size * args.accum_iter * world_size
    lr = args.blr * eff_batch_size / 256 if args.lr is None else args.lr
    log.info("effective batch %d = %d x %d (accum) x %d (processes); lr %.3e", eff_batch_size,
             args.batch_size, args.accum_iter, world_size, lr)
    return {"channels": list(args.channels), "eff_batch_size": eff_batch_size, "lr": lr}


def start(args: argparse.Namespace | RunConfig, task: str, not_applicable: Collection[str] = (),
          record: bool = True) -> Run:
    """Distributed setup, logging, seeding, output folder, resolved config; validates cheap flags first.

    ``args``: the parsed flags (a Namespace is frozen here). They are settled with the derived values
    (``derive``) into ``run.flags``. ``record``: record them now (``record_config``: ``run.config``,
    ``config.yaml``). An entry point that still settles values after ``start`` (a checkpoint's hold-out
    adopted by ``--eval``, the epoch of the ``--finetune`` file) passes ``record=False`` and calls
    ``record_config`` with those values once they are known.
    ``not_applicable``: flags left out of ``config.yaml`` because this run does not use them.
    """
    validate_common(args)
    info, device = init_distributed(args.device, args.dist_url, args.dist_timeout)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    memory = tune_cpu_memory(args.cpu_memory) if device.type == "cpu" else "device memory"
    setup_logging(info.is_main)
    flags = RunConfig.freeze(args).replace(**derive(args, info.world_size))
    torch.manual_seed(flags.seed + info.rank)
    out = Path(flags.output_dir)
    # A stop signal during start-up (indexing the data, building the model) is kept: the first step saves.
    run = Run(info, device, out, resolve_amp(flags.amp, device), flags=flags,
              preemption=PreemptionSignal().install())
    if info.is_main:  # the folder is made by the first file written to it (config.yaml): none for a failed start
        run.tb = LazySummaryWriter(flags.log_dir or out)  # its events file appears with the first scalar
    log.info("%s on %s x%d (%s launcher), amp=%s, %s, output %s", task, device, info.world_size,
             info.launcher, run.amp_dtype, memory, out.resolve())
    if record:
        record_config(run, not_applicable=not_applicable)
    return run


def record_config(run: Run, not_applicable: Collection[str] = (), **settled) -> RunConfig:
    """Record ``run.flags`` with the ``settled`` values as ``run.config`` and write ``config.yaml`` (main
    process only).

    The run reads its settings from the returned ``RunConfig`` from here on, so the file holds exactly
    the values the run uses (less the ``not_applicable`` flags, which it does not use).
    """
    if run.config is not None:
        raise RuntimeError("record_config: the run configuration is already settled")
    run.config = run.flags.replace(**settled)
    if run.info.is_main:
        write_config(run.config, run.output_dir / "config.yaml", omit=not_applicable)
    return run.config


def validate_common(args: argparse.Namespace | RunConfig) -> None:
    """Refuse bad flags before any data or model is built (one clear line each).

    The backbone and its input size are checked by the entry point first (pretraining: its mode's
    ``check_model``; finetuning: ``finetuning.settle``, on the side the task's encoder sees).
    """
    for name in ("batch_size", "epochs", "accum_iter", "stop_epoch"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: expected a positive integer")
    for name in ("save_every_minutes", "save_every_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} {getattr(args, name)}: expected 0 (off) or a positive number")
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist_timeout {args.dist_timeout}: expected a positive number of seconds")
    if not 0 <= args.max_bad < 1:
        raise ConfigError(f"--max_bad {args.max_bad}: expected a fraction of the epoch, 0 <= fraction < 1")
    if not dataset_spec(args.dataset).synthetic and not args.data_path:
        raise ConfigError(f"--dataset {args.dataset} needs --data_path (the folder or file of the data set)")


def build_train_data(args: argparse.Namespace | RunConfig, run: Run, split: str = "train"):
    return build_dataset(args.dataset, data_path=args.data_path, split=split, input_size=args.input_size,
                         channels=tuple(args.channels), split_file=args.split_file,
                         num_samples=args.num_samples if split == "train" else None, seed=args.seed,
                         scene=args.synthetic_scene)


def finish(run: Run) -> None:
    if run.preemption is not None:
        run.preemption.restore()
    if run.tb is not None:
        run.tb.close()
    run.epoch_log.close()
    run.step_log.close()
    if run.info.is_main:  # what this run left there (an --eval run writes no checkpoint)
        files = sorted(p.name for p in run.output_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        shown = [f for f in files if not f.startswith("events.out.tfevents")]
        shown += ["TensorBoard events"] if len(shown) < len(files) else []
        log.info("outputs in %s: %s", run.output_dir.resolve(), ", ".join(shown))
    cleanup_distributed()
