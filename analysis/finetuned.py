"""A finetuned ViT checkpoint with the data it was trained on, for the PSS scripts (sweep, kept patches).

A script's parser is ``main_finetune.py``'s (the same data and model flags, config files and overrides)
plus the analysis output flags (``--out --name --dpi --title``), ``CHECKPOINT`` and ``--split``. Flags not
given default to the values stored in the checkpoint's ``args``, so
``python -m analysis.sweep_drop out/checkpoint_best.pth`` scores the model on the data it was finetuned on.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

import backbones
import engine_finetune as E
import finetuning
from analysis.logs import output_parser
from sarwmix.cli import ArgumentParser
from sarwmix.errors import ConfigError
from tasks import Task
from util import runner
from util.checkpoint import checkpoint_args, load_checkpoint, model_state
from util.config import parse_with_config
from util.device import resolve_amp
from util.distributed import wants_cuda
from util.pretrained import load_pretrained

# Settings of the finetuning run that define the model and its data (taken from the checkpoint's args).
INHERITED: tuple[str, ...] = (
    "model", "input_size", "channels", "dataset", "data_path", "split_file", "label_set", "nb_classes",
    "num_eval_samples", "seed", "select_metric", "batch_size", "skip_bad", "amp",
)
SPLITS: tuple[str, ...] = ("val", "test", "train")


@dataclass
class Finetuned:
    """A loaded finetuned ViT (eval mode), one split of its data and how to feed it."""

    args: argparse.Namespace
    model: torch.nn.Module
    dataset: object
    device: torch.device
    amp_dtype: torch.dtype | None
    checkpoint: Path

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Normalised model input (B, C, S, S) of the samples at ``indices`` (no flips)."""
        stats = self.dataset.stats
        x = torch.stack([torch.as_tensor(self.dataset[i][0]) for i in indices])
        mean = torch.tensor(stats["mean"], dtype=torch.float32, device=self.device)
        std = torch.tensor(stats["std"], dtype=torch.float32, device=self.device)
        return E.prepare_input(x, self.device, mean, std)

    def raw(self, index: int) -> torch.Tensor:
        """Sample ``index`` as stored, (C, S, S) dB."""
        return torch.as_tensor(self.dataset[index][0]).float()


def script_parser(description: str) -> argparse.ArgumentParser:
    """``main_finetune.py``'s parser plus the analysis output flags, ``CHECKPOINT`` and ``--split``."""
    parser = ArgumentParser(description=description, allow_abbrev=False, conflict_handler="resolve",
                            parents=[finetuning.args_parser(), output_parser()],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("checkpoint")
    g.add_argument("checkpoint", type=Path, help="finetuned ViT checkpoint (e.g. checkpoint_best.pth)")
    g.add_argument("--split", default="val", choices=SPLITS, help="split of the data set to use")
    parser.set_defaults(out=None)  # default: the checkpoint's folder
    return parser


def parse_script_args(parser: argparse.ArgumentParser,
                      argv: list[str] | None) -> tuple[argparse.Namespace, dict, Task]:
    """Parse with precedence: parser defaults < the checkpoint's stored args < --config < --override < flags.

    Returns:
        (resolved arguments, the loaded checkpoint, the task).
    """
    first = parser.parse_args(argv)
    ckpt = load_checkpoint(first.checkpoint)
    parser.set_defaults(**checkpoint_args(ckpt).pick(INHERITED))
    args = parse_with_config(parser, argv, extra=runner.override_values)
    task = finetuning.settle(args)
    if args.model not in backbones.names("token_drop"):
        raise ConfigError(f"{args.checkpoint}: model {args.model!r} is not a ViT; token dropping needs one of "
                          f"{', '.join(backbones.names('token_drop'))}")
    if args.out is None:
        args.out = args.checkpoint.parent
    return args, ckpt, task


def load_finetuned(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Finetuned:
    """Read the checkpoint (``weights_only``), build its model and the ``--split`` of its data set.

    Raises:
        CheckpointError for a missing / unreadable file or one that does not fit the model exactly;
        ConfigError for bad flags or a non-ViT model.
    """
    args, ckpt, task = parse_script_args(parser, argv)
    dataset = finetuning.build_split(args, args.split)
    model = finetuning.build_model(args, task, dataset.num_classes)
    load_pretrained(model, model_state(ckpt, args.checkpoint), args.checkpoint, keep_head=True)
    device = torch.device("cuda" if wants_cuda(args.device) else "cpu")
    model.to(device).eval()
    return Finetuned(args, model, dataset, device, resolve_amp(args.amp, device), args.checkpoint)
