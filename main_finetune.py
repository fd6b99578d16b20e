"""Finetuning entry point: BigEarthNet v1/v2 (multi-label) and SEN12-FLOOD (flood change on pairs).

    python main_finetune.py --finetune output_dir/checkpoint.pth      # short CPU run on synthetic data
    python main_finetune.py --config configs/finetune_benv1_base.yaml --data_path /data/BigEarthNet-S1-v1.0 \
        --finetune benv1_pretrain_checkpoint_64.pth
    python main_finetune.py --eval --resume benv1_finetune_checkpoint_best.pth --model mixmim_base ...
    python main_finetune.py --model vit_small_rel --pss cyclic --pss_min 0.2 --pss_max 1.0   # ViT + PSS

The run itself (task, checks, splits, model, training, report) is ``finetuning.finetune``; the flags are
``finetuning.args_parser``. Outputs in --output_dir: checkpoint.pth, checkpoint_best.pth (best on the
validation split), log.txt, val_log.json, train_log.json, config.yaml, TensorBoard events, results.json.
"""
from __future__ import annotations

import argparse

import finetuning
from util.config import RunConfig, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return finetuning.args_parser()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return finetuning.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Finetune (or evaluate) with the parsed flags; returns what ``results.json`` holds."""
    task = finetuning.settle(args)  # task, input size and selection metric settled on the flags
    flags = RunConfig(vars(args))  # frozen once, here: the library never sees the Namespace
    return finetuning.finetune(flags, task)


if __name__ == "__main__":
    run_cli(main, parse_args)
