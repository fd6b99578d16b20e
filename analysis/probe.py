"""k-NN and linear probes of frozen encoders from any checkpoint, a random-init encoder and the hand-crafted floor.

Usage::

    python -m analysis.probe out/pretrain/checkpoint.pth out/simmim/backbone/backbone_final.pth \\
        --random_init mixmim_tiny --handcrafted --dataset synthetic --samples 1024 --out figures/probe

A checkpoint is this project's pretraining ``checkpoint.pth`` / ``checkpoint_<N>.pth`` (MixMIM or SimMIM),
the released ``checkpoint_64.pth``, a finetuned checkpoint, or an exported backbone (``python -m util.export_backbone``;
a plain state dict, which needs ``--model``). Its encoder (``mixmim_*`` Swin or ``vit_*``) is built from the
checkpoint's recorded ``args`` (``model``, ``input_size``, ``channels``) or from the flags, and its weights go
in through ``util.pretrained.load_pretrained`` (decoder and head dropped, position tables resized).

The probe data are ``util.probe.build_probe_sets`` (3/4 to fit, 1/4 held out; synthetic data from a seed no
pretraining split uses, other data sets from their validation split), normalised with the data set's own
statistics as finetuning does. Writes ``probe.csv`` and ``probe.json`` (rows ``checkpoint, protocol,
metric, value``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch

import backbones
from sarwmix.cli import ArgumentParser, count
from sarwmix.constants import CHANNELS
from sarwmix.data.datasets import dataset_names
from sarwmix.errors import SarwmixError
from util.checkpoint import checkpoint_args, load_checkpoint, model_state
from util.pretrained import load_pretrained
from util.probe import build_probe_sets, handcrafted_features, pooled_features, probe_metrics

log = logging.getLogger("sarwmix")
COLUMNS: tuple[str, ...] = ("checkpoint", "protocol", "metric", "value")


def build_encoder(name: str, img_size: int, in_chans: int) -> torch.nn.Module:
    """A freshly initialised encoder with ``forward_features``: the project's Swin or a plain ViT."""
    if name not in backbones.names("finetune"):
        raise SarwmixError(f"model {name!r}: the probe builds {', '.join(backbones.names('finetune'))}")
    return backbones.BACKBONES[name].encoder(img_size, in_chans)


def checkpoint_encoder(path: Path, model: str | None, input_size: int | None,
                       channels: list[str] | None) -> tuple[torch.nn.Module, int, tuple[str, ...]]:
    """The encoder of a checkpoint with its weights: (encoder, input size, channels).

    The checkpoint's recorded ``args`` give the model, input size and channels; flags given win.
    """
    ckpt = load_checkpoint(path)
    saved = checkpoint_args(ckpt)
    name = model or saved.model
    size = input_size or saved.input_size
    chans = tuple(channels or saved.channels or CHANNELS)
    if not name or not size:
        raise SarwmixError(f"{path}: records no model and input size (an exported backbone?); pass --model "
                           f"and --input_size")
    enc = build_encoder(name, int(size), len(chans))
    load_pretrained(enc, model_state(ckpt, path), path)
    return enc, int(size), chans


def _rows(label: str, metrics: dict[str, float]) -> list[dict]:
    """``knn_mAP_macro`` -> (label, knn, mAP_macro, value)."""
    return [{"checkpoint": label, "protocol": k.split("_", 1)[0], "metric": k.split("_", 1)[1], "value": v}
            for k, v in metrics.items()]


class ProbeData:
    """Probe sets per (input size, channels), read once each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cache = args, {}

    def get(self, size: int, channels: tuple[str, ...]):
        key = (size, channels)
        if key not in self.cache:
            a = self.args
            self.cache[key] = build_probe_sets(a.dataset, data_path=a.data_path, input_size=size,
                                               channels=channels, samples=a.samples, seed=a.seed,
                                               num_workers=a.num_workers)
        return self.cache[key]


def probe_encoder(label: str, enc: torch.nn.Module, sets, args: argparse.Namespace) -> list[dict]:
    """Rows of one encoder: features of both parts, then the k-NN and linear probes."""
    train, test = sets
    device = torch.device(args.device)
    kw = {"device": device, "batch_size": args.batch_size}
    enc.to(device)
    train_x, train_y = pooled_features(enc, train, train.stats["mean"], train.stats["std"], **kw)
    test_x, test_y = pooled_features(enc, test, test.stats["mean"], test.stats["std"], **kw)
    rows = _rows(label, probe_metrics(train_x, train_y, test_x, test_y, k=args.knn_k, seed=args.seed,
                                      solver=args.solver, device=device))
    log.info("%s: %s", label, {f"{r['protocol']}_{r['metric']}": round(r["value"], 4) for r in rows})
    return rows


def handcrafted_rows(sets, args: argparse.Namespace) -> list[dict]:
    train, test = sets
    train_x, test_x = (handcrafted_features(s.tensors[0].numpy()) for s in (train, test))
    metrics = probe_metrics(train_x, train.tensors[1].numpy(), test_x, test.tensors[1].numpy(), k=args.knn_k,
                            seed=args.seed, solver=args.solver, device=args.device)
    return _rows("handcrafted", metrics)


def run(args: argparse.Namespace) -> pd.DataFrame:
    data, rows = ProbeData(args), []
    default_chans = tuple(args.channels or CHANNELS)
    for path in args.checkpoints:
        enc, size, chans = checkpoint_encoder(path, args.model, args.input_size, args.channels)
        rows += probe_encoder(str(path), enc, data.get(size, chans), args)
    for name in args.random_init or []:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            enc = build_encoder(name, args.input_size or 128, len(default_chans))
        rows += probe_encoder(f"random_init:{name}", enc, data.get(args.input_size or 128, default_chans), args)
    if args.handcrafted:
        rows += handcrafted_rows(data.get(args.input_size or 128, default_chans), args)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", type=Path, help="checkpoints or exported backbones")
    p.add_argument("--random_init", nargs="+", default=None, metavar="MODEL", help="also probe untrained encoders")
    p.add_argument("--handcrafted", action="store_true", help="also probe per-channel dB statistics + histograms")
    p.add_argument("--model", default=None, help="encoder name (default: the checkpoint's)")
    p.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's; else 128")
    p.add_argument("--channels", nargs="+", default=None, help="default: the checkpoint's; else VH VV")
    p.add_argument("--dataset", default="synthetic", choices=dataset_names())
    p.add_argument("--data_path", default=None)
    p.add_argument("--samples", type=count(8), default=1024, help="probe patches: 3/4 to fit, 1/4 held out")
    p.add_argument("--knn_k", type=count(1), default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default="sklearn", choices=("sklearn", "torch"),
                   help="linear probe: one scikit-learn fit per class, or one L-BFGS solve of the same problem "
                        "on --device (what the pretraining monitor uses)")
    p.add_argument("--batch_size", type=count(1), default=64)
    p.add_argument("--num_workers", type=count(0), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.checkpoints or args.random_init or args.handcrafted):
        print("error: nothing to probe: give checkpoints, --random_init MODEL or --handcrafted", file=sys.stderr)
        return 2
    try:
        table = run(args)
    except (SarwmixError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "probe.csv", index=False)
    meta = {"dataset": args.dataset, "samples": args.samples, "knn_k": args.knn_k, "seed": args.seed,
            "solver": args.solver}
    (args.out / "probe.json").write_text(json.dumps({**meta, "rows": table.to_dict("records")}, indent=1) + "\n")
    print(table.pivot_table(index="checkpoint", columns=["protocol", "metric"], values="value", sort=False)
          .round(4).to_string())
    for name in ("probe.csv", "probe.json"):  # as the other analysis scripts say where their files are
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
