"""Pretraining entry point: MixMIM (default) or SimMIM on Sentinel-1 VH/VV patches.

    python main_pretrain.py                       # short run on the built-in synthetic sample (CPU)
    python main_pretrain.py --config configs/pretrain_benv1_base.yaml --data_path /data/BigEarthNet-S1-v1.0

The run itself (mode, checks, model, weighting, training, exports, reconstructions) is ``pretraining.pretrain``;
the flags are ``pretraining.args_parser``. Outputs in --output_dir: checkpoint.pth (latest, for --resume),
checkpoint_<N>.pth, log.txt (JSON lines per epoch), train_log.json (JSON lines per iteration), config.yaml,
TensorBoard events, reconstructions.png.
"""
from __future__ import annotations

import argparse

import pretraining
from util.config import RunConfig, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return pretraining.args_parser()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return pretraining.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Pretrain with the parsed flags; returns the last epoch's ``log.txt`` record."""
    flags = RunConfig(vars(args))  # frozen once, here: the library never sees the Namespace
    return pretraining.pretrain(flags)


if __name__ == "__main__":
    run_cli(main, parse_args)
