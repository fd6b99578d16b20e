"""A pretraining run: its flags, the mode that reads them (``modes``), the model, the weighting, training with
the shared loop (``engine.Trainer``), the encoder exports, the representation probe and the reconstructions.

``main_pretrain.py`` parses the command line (``parse_args``) and calls ``pretrain`` with the parsed flags
frozen; the analysis scripts read the same parser's defaults and build models with the mode's ``model``.

Outputs in --output_dir: checkpoint.pth (latest, for --resume), checkpoint_<N>.pth, log.txt (JSON lines per
epoch), train_log.json (JSON lines per iteration), config.yaml, TensorBoard events, reconstructions.png;
SimMIM also backbone/backbone_epoch<N>.pth and backbone/backbone_final.pth.
"""
from __future__ import annotations

import argparse
import logging

import torch

from backbones import BackboneExporter
from engine import Trainer, TrainSettings
from engine_pretrain import make_pretrain_step, save_reconstructions
from modes import MODES, get_mode
from sarwmix.cli import ArgumentParser, count
from sarwmix.data.datasets import dataset_names
from sarwmix.errors import ConfigError
from sarwmix.sar.spectra import check_settings as check_spectral
from sarwmix.sar.weighting import GRANULARITIES, WEIGHT_NORMS, WEIGHTINGS, WeightSpec, check_weight_norm
from util import runner
from util.config import RunConfig, parse_with_config
from util.probe import ProbeMonitor, build_probe_sets

log = logging.getLogger("sarwmix")


def args_parser() -> argparse.ArgumentParser:
    """The flags of a pretraining run (``main_pretrain.py``'s command line)."""
    parser = ArgumentParser("SAR-W-MixMAE pretraining", parents=[runner.common_parser()], allow_abbrev=False)
    g = parser.add_argument_group("pretraining")
    g.add_argument("--mode", default="mixmim", choices=tuple(MODES), help="MixMIM mixing or SimMIM masking")
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
    _weighting_flags(g)
    g.add_argument("--stop_epoch", type=count(1), default=None,
                   help="stop after this many epochs of the --epochs schedule, saving checkpoint_<N>.pth")
    g.add_argument("--vis_samples", type=count(0), default=4, help="samples in reconstructions.png (0: none)")
    _probe_flags(parser.add_argument_group("representation probe (k-NN and linear probe of the frozen encoder)"))
    parser.set_defaults(model="mixmim_tiny", epochs=4, warmup_epochs=1, batch_size=32, blr=1.5e-4,
                        weight_decay=0.05, num_samples=192)
    return runner.document_defaults(parser)


def _weighting_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of the ``WeightSpec``."""
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


def _probe_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--probe_every", type=count(0), default=0, help="probe every N epochs and at the last (0: off)")
    g.add_argument("--probe_dataset", default=None, choices=dataset_names(),
                   help="labelled probe data (default: --dataset; synthetic: patches of another seed, "
                        "others: their validation split)")
    g.add_argument("--probe_data_path", default=None, help="root of the probe data (default: --data_path)")
    g.add_argument("--probe_samples", type=count(8), default=1024, help="probe patches: 3/4 to fit, 1/4 held out")
    g.add_argument("--probe_knn_k", type=count(1), default=20, help="neighbours of the cosine k-NN")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags, with the mode's default ``--mask_ratio``; refuses inconsistent flags (ConfigError)."""
    args = parse_with_config(args_parser(), argv, extra=runner.override_values)
    mode = MODES[args.mode]
    if args.mask_ratio is None:  # each mode's own default unless the user chose one
        args.mask_ratio = mode.mask_ratio
    try:
        check_weight_norm(args.weight_norm, args.weight_norm_low, args.weight_norm_high)
    except ValueError as e:
        raise ConfigError(f"--weight_norm {args.weight_norm}: {e}") from None
    try:
        check_spectral(args.spectral_weight, args.spectral_bins)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    mode.check_flags(args)
    return args


def probe_monitor(config: RunConfig, run: runner.Run, encoder: torch.nn.Module,
                  stats: dict) -> ProbeMonitor | None:
    """The ``--probe_every`` monitor; its labelled data are read once, on rank 0 only."""
    if config.probe_every <= 0:
        return None
    sets = (None, None)
    if run.info.is_main:
        name = config.probe_dataset or config.dataset
        path = config.probe_data_path or (config.data_path if name == config.dataset else None)
        sets = build_probe_sets(name, data_path=path, input_size=config.input_size, channels=config.channels,
                                samples=config.probe_samples, seed=config.seed, num_workers=config.num_workers)
        log.info("probe: %s, %d + %d patches, every %d epochs", name, len(sets[0]), len(sets[1]),
                 config.probe_every)
    return ProbeMonitor(encoder, *sets, stats["mean"], stats["std"], every=config.probe_every, device=run.device,
                        knn_k=config.probe_knn_k, batch_size=config.batch_size, amp_dtype=run.amp_dtype,
                        seed=config.seed, is_main=run.info.is_main, distributed=run.info.distributed)


def pretrain(flags: RunConfig) -> dict:
    """The whole run of the parsed ``flags`` (frozen); returns the last epoch's ``log.txt`` record."""
    mode = get_mode(flags.mode)
    mode.check_model(flags)  # backbone and input size, before anything is built
    run = runner.start(flags, task="pretrain", not_applicable=mode.other_flags())
    config = run.config  # settled (derived lr and batch; config.yaml written)
    dataset = runner.build_train_data(config, run)
    model = mode.model(config).to(run.device)
    weights = WeightSpec.of(config, token_size=mode.token_size(config, model))
    step = make_pretrain_step(run.device, dataset.stats["mean"], dataset.stats["std"], weights)
    exporter = (BackboneExporter(config.output_dir, config.model, config.save_freq, run.info.is_main)
                if mode.exports_backbone else None)
    monitor = probe_monitor(config, run, mode.probe_encoder(model), dataset.stats)
    trainer = Trainer(TrainSettings.of(config), run, model, dataset, step, evaluate=exporter, on_epoch_end=monitor)
    stats = trainer.fit()
    finish(config, run, trainer.raw_model, dataset, weights, exporter)
    return stats


def finish(config: RunConfig, run: runner.Run, model: torch.nn.Module, dataset,
           weights: WeightSpec, exporter: BackboneExporter | None) -> None:
    """After the last epoch: the final encoder export, ``reconstructions.png`` (rank 0), the run's teardown."""
    if exporter is not None:
        exporter.final(model)
    if run.info.is_main and config.vis_samples > 0:
        path = save_reconstructions(model, dataset, run.output_dir / "reconstructions.png", weights,
                                    config.vis_samples, config.seed)
        log.info("reconstructions: %s", path)
    runner.finish(run)
