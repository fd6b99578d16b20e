"""Pretraining entry point: MixMIM (default) or SimMIM on Sentinel-1 VH/VV patches.

    python main_pretrain.py                       # short run on the built-in synthetic sample (CPU)
    python main_pretrain.py --config configs/pretrain_benv1_base.yaml --data_path /data/BigEarthNet-S1-v1.0

Outputs in --output_dir: checkpoint.pth (latest, for --resume), checkpoint_<N>.pth, log.txt (JSON lines per
epoch), train_log.json (JSON lines per iteration), config.yaml, TensorBoard events, reconstructions.png.
"""
from __future__ import annotations

import argparse
import logging

import torch

import backbones
from engine import Trainer, TrainSettings
from engine_pretrain import make_pretrain_step, save_reconstructions
from sarwmix.cli import ArgumentParser, count
from sarwmix.data.datasets import dataset_names
from sarwmix.errors import ConfigError
from sarwmix.sar.spectra import check_settings as check_spectral
from sarwmix.sar.weighting import GRANULARITIES, WEIGHT_NORMS, WEIGHTINGS, check_weight_norm
from util import runner
from util.config import parse_with_config, run_cli
from util.probe import ProbeMonitor, build_probe_sets

log = logging.getLogger("sarwmix")
PRETRAIN_MODES = ("mixmim", "simmim")
DEFAULT_MASK_RATIO = {"mixmim": 0.5, "simmim": 0.6}
# Flags that only one mode reads; config.yaml of a run leaves out those of the other mode.
MODE_ONLY_FLAGS = {"mixmim": ("range_mask_ratio", "norm_pix_loss", "spectral_weight", "spectral_bins"),
                   "simmim": ("mask_patch_size", "loss")}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser("SAR-W-MixMAE pretraining", parents=[runner.common_parser()], allow_abbrev=False)
    g = parser.add_argument_group("pretraining")
    g.add_argument("--mode", default="mixmim", choices=PRETRAIN_MODES, help="MixMIM mixing or SimMIM masking")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="masked fraction (default: MixMIM 0.5 as the paper, SimMIM 0.6)")
    g.add_argument("--range_mask_ratio", type=float, default=0.0, help="MixMIM: r = mask_ratio + U(0, this)")
    g.add_argument("--mask_patch_size", type=count(1), default=32, help="SimMIM mask cell in pixels")
    g.add_argument("--loss", default="l1", choices=("l1", "mse"), help="SimMIM loss on masked pixels")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="MixMIM: standardise each target patch (released recipe: on)")
    g.add_argument("--spectral_weight", type=float, default=0.0,
                   help="MixMIM: weight of a phase-free texture target, each hidden cell's log power spectrum "
                        "(0: off, the published loss)")
    g.add_argument("--spectral_bins", type=int, nargs=2, default=[8, 4], metavar=("RADIAL", "ANGULAR"),
                   help="MixMIM: radial x orientation bins of the spectral target")
    g.add_argument("--weighting", default="per_channel", choices=WEIGHTINGS,
                   help="polarisation-aware weights from linear backscatter")
    g.add_argument("--weight_exp_scale", type=float, default=1.0, help="s in w = exp(s * (1 - x~))")
    g.add_argument("--weight_granularity", default="pixel", choices=GRANULARITIES)
    g.add_argument("--weight_norm", default="minmax", choices=WEIGHT_NORMS,
                   help="x~ from the image's min and max (published), or its percentiles clipped to [0, 1]")
    g.add_argument("--weight_norm_low", type=float, default=1.0, help="percentile norm: lower percentile")
    g.add_argument("--weight_norm_high", type=float, default=99.0, help="percentile norm: upper percentile")
    g.add_argument("--weight_zscore_compat", action="store_true",
                   help="reproduce the released code's defect: weights from z-scores, not raw dB")
    g.add_argument("--stop_epoch", type=count(1), default=None,
                   help="stop after this many epochs of the --epochs schedule, saving checkpoint_<N>.pth")
    g.add_argument("--vis_samples", type=count(0), default=4, help="samples in reconstructions.png (0: none)")
    g = parser.add_argument_group("representation probe (k-NN and linear probe of the frozen encoder)")
    g.add_argument("--probe_every", type=count(0), default=0, help="probe every N epochs and at the last (0: off)")
    g.add_argument("--probe_dataset", default=None, choices=dataset_names(),
                   help="labelled probe data (default: --dataset; synthetic: patches of another seed, "
                        "others: their validation split)")
    g.add_argument("--probe_data_path", default=None, help="root of the probe data (default: --data_path)")
    g.add_argument("--probe_samples", type=count(8), default=1024, help="probe patches: 3/4 to fit, 1/4 held out")
    g.add_argument("--probe_knn_k", type=count(1), default=20, help="neighbours of the cosine k-NN")
    parser.set_defaults(model="mixmim_tiny", epochs=4, warmup_epochs=1, batch_size=32, blr=1.5e-4,
                        weight_decay=0.05, num_samples=192)
    return runner.document_defaults(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(get_args_parser(), argv, extra=runner.override_values)
    if args.mask_ratio is None:  # each mode's own default unless the user chose one
        args.mask_ratio = DEFAULT_MASK_RATIO[args.mode]
    try:
        check_weight_norm(args.weight_norm, args.weight_norm_low, args.weight_norm_high)
    except ValueError as e:
        raise ConfigError(f"--weight_norm {args.weight_norm}: {e}") from None
    try:
        check_spectral(args.spectral_weight, args.spectral_bins)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    if args.mode == "simmim" and args.spectral_weight > 0:
        raise ConfigError(f"--spectral_weight {args.spectral_weight} with --mode simmim: the spectral target is "
                          f"MixMIM's (its decoder predicts every hidden cell); leave it at 0 for SimMIM")
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The pretraining model of ``--mode`` for ``--model`` (validated before anything is built)."""
    if args.mode == "simmim":
        kwargs = {"mask_patch_size": args.mask_patch_size, "loss": args.loss}
    else:
        kwargs = {"range_mask_ratio": args.range_mask_ratio, "norm_pix_loss": args.norm_pix_loss,
                  "spectral_weight": args.spectral_weight, "spectral_bins": tuple(args.spectral_bins)}
    return backbones.build_pretrain(args.mode, args.model, args.input_size, len(args.channels),
                                    mask_ratio=args.mask_ratio, **kwargs)


def probe_monitor(args: argparse.Namespace, run: runner.Run, encoder: torch.nn.Module,
                  stats: dict) -> ProbeMonitor | None:
    """The ``--probe_every`` monitor; its labelled data are read once, on rank 0 only."""
    if args.probe_every <= 0:
        return None
    sets = (None, None)
    if run.info.is_main:
        name = args.probe_dataset or args.dataset
        path = args.probe_data_path or (args.data_path if name == args.dataset else None)
        sets = build_probe_sets(name, data_path=path, input_size=args.input_size, channels=args.channels,
                                samples=args.probe_samples, seed=args.seed, num_workers=args.num_workers)
        log.info("probe: %s, %d + %d patches, every %d epochs", name, len(sets[0]), len(sets[1]),
                 args.probe_every)
    return ProbeMonitor(encoder, *sets, stats["mean"], stats["std"], every=args.probe_every, device=run.device,
                        knn_k=args.probe_knn_k, batch_size=args.batch_size, amp_dtype=run.amp_dtype,
                        seed=args.seed, is_main=run.info.is_main, distributed=run.info.distributed)


def main(args: argparse.Namespace) -> dict:
    other_modes = [flag for mode, flags in MODE_ONLY_FLAGS.items() if mode != args.mode for flag in flags]
    backbones.check_args(args)
    run = runner.start(args, task="pretrain", not_applicable=other_modes)
    args = run.config  # settled and read-only from here on
    dataset = runner.build_train_data(args, run)
    model = build_model(args).to(run.device)
    # --weight_granularity token: a SimMIM mask cell, or a MixMIM target patch (the encoder's 32 px stride)
    token = args.mask_patch_size if args.mode == "simmim" else model.encoder_stride
    step = make_pretrain_step(run.device, dataset.stats["mean"], dataset.stats["std"], args.weighting,
                              args.weight_exp_scale, args.weight_granularity, token, args.weight_zscore_compat,
                              weight_norm=args.weight_norm, weight_norm_low=args.weight_norm_low,
                              weight_norm_high=args.weight_norm_high)
    # SimMIM: the encoder alone, for finetuning elsewhere (per --save_freq epoch and at the end).
    exporter = (backbones.BackboneExporter(args.output_dir, args.model, args.save_freq, run.info.is_main)
                if args.mode == "simmim" else None)
    monitor = probe_monitor(args, run, model.encoder if args.mode == "simmim" else model, dataset.stats)
    trainer = Trainer(TrainSettings.of(args), run, model, dataset, step, evaluate=exporter, on_epoch_end=monitor)
    stats = trainer.fit()
    if exporter is not None:
        exporter.final(trainer.raw_model)
    if run.info.is_main and args.vis_samples > 0:
        path = save_reconstructions(trainer.raw_model, dataset, run.output_dir / "reconstructions.png",
                                    args.vis_samples, args.weighting, args.weight_exp_scale, args.seed,
                                    args.weight_granularity, token, args.weight_zscore_compat, args.weight_norm,
                                    args.weight_norm_low, args.weight_norm_high)
        log.info("reconstructions: %s", path)
    runner.finish(run)
    return stats


if __name__ == "__main__":
    run_cli(main, parse_args)
