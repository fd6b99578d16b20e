"""Export the pretrained encoder of a checkpoint for finetuning elsewhere.

    python -m util.export_backbone output_dir/checkpoint.pth backbone.pth

Works for MixMIM and SimMIM pretraining checkpoints (this project's, or the released ``checkpoint_64.pth``)
and writes plain state dicts (``torch.load`` + ``load_state_dict(strict=True)``):

- timm Swin backbones (SimMIM): ``OUT`` holds the layout of
  ``timm.create_model(name, pretrained=False, in_chans=C, img_size=S, features_only=True)``
  (``patch_embed.*``, ``layers_<i>.*``; that model has no final norm), and ``OUT`` with the suffix ``_full``
  the layout of the same call with ``num_classes=0`` instead of ``features_only`` (``layers.<i>.*``,
  ``norm.*``). One file cannot serve both: timm renames ``layers.<i>`` to ``layers_<i>`` and drops the final
  norm in its feature-extraction wrapper.
- the project's Swin (``mixmim_*``): the ``SwinEncoder`` state (``patch_embed.*``, ``absolute_pos_embed``,
  ``layers.*``, ``norm.*``), i.e. a finetune model's state without its head.
- the plain ViT (``vit_*``): the ``models_vit.VisionTransformer`` state without head.

A training run in SimMIM mode writes the same files under ``<output_dir>/backbone/``: ``backbone_final.pth``
at the end and ``backbone_epoch<N>.pth`` every ``--save_freq`` epochs.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch
from torch import nn

from sarwmix.errors import CheckpointError, SarwmixError
from util.checkpoint import StoredArgs, checkpoint_args, load_checkpoint, model_state, save_atomic

log = logging.getLogger("sarwmix")
FULL_SUFFIX = "_full"


def encoder_state(state: dict[str, torch.Tensor], simmim: bool) -> dict[str, torch.Tensor]:
    """The encoder's part of a pretraining state dict.

    SimMIM models hold the encoder under ``encoder.``; MixMIM models hold it at the top level next to
    ``mask_token`` and ``decoder_*``.
    """
    if simmim:
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith(("mask_token", "decoder_"))}


def timm_features_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin state (``num_classes=0``) -> the ``features_only=True`` layout of the same model."""
    return {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in full.items()
            if not k.startswith(("norm.", "head."))}


def backbone_states(model_name: str, state: dict[str, torch.Tensor], simmim: bool) -> dict[str, dict]:
    """File suffix -> state dict to write: ``""`` always, plus ``"_full"`` for timm backbones."""
    from models_simmim import timm_name

    enc = encoder_state(state, simmim)
    if simmim and timm_name(model_name):
        return {"": timm_features_state(enc), FULL_SUFFIX: enc}
    return {"": enc}


def suffixed(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")


def save_backbone(states: dict[str, dict], out: str | Path) -> list[Path]:
    """Write each state (tensors detached, contiguous, on the CPU) atomically; returns the paths."""
    out = Path(out)
    paths = []
    for suffix, sd in states.items():
        clean = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        paths.append(save_atomic(clean, suffixed(out, suffix)))
    return paths


def reference_models(model_name: str, simmim: bool, in_chans: int, img_size: int) -> dict[str, nn.Module]:
    """The models each exported file must fit, built on the meta device (no memory, no init cost)."""
    from models_mixmim import ENCODER_CONFIGS, SwinEncoder, encoder_kwargs
    from models_simmim import timm_name
    from models_vit import VIT_CONFIGS, build_vit

    with torch.device("meta"):
        if model_name in ENCODER_CONFIGS:
            return {"": SwinEncoder(**encoder_kwargs(model_name, img_size=img_size, in_chans=in_chans))}
        if model_name in VIT_CONFIGS:
            return {"": build_vit(model_name, img_size=img_size, in_chans=in_chans)}
        name = timm_name(model_name) if simmim else None
        if name is None:
            raise CheckpointError(f"cannot export model {model_name!r}: not a known backbone")
        import timm

        kw = {"pretrained": False, "in_chans": in_chans, "img_size": img_size}
        return {"": timm.create_model(name, features_only=True, **kw),
                FULL_SUFFIX: timm.create_model(name, num_classes=0, **kw)}


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{what}: {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")


def checkpoint_geometry(args: StoredArgs, state: dict[str, torch.Tensor], simmim: bool) -> tuple[str, int, int]:
    """(model name, in_chans, input size) of a pretraining checkpoint, from its args or its tensors."""
    from models_mixmim import ENCODER_CONFIGS

    prefix = "encoder." if simmim else ""
    proj = state.get(f"{prefix}patch_embed.proj.weight")
    if args.channels is not None:
        in_chans = len(args.channels)
    elif proj is not None and proj.ndim == 4:
        in_chans = proj.shape[1]
    else:
        in_chans = args.in_chans or 2
    pos = state.get(f"{prefix}absolute_pos_embed")
    img_size = args.input_size or (4 * round(pos.shape[1] ** 0.5) if pos is not None else 0)
    name = args.model
    if not simmim and name not in ENCODER_CONFIGS:
        name = infer_swin_name(encoder_state(state, False), in_chans, img_size)
    if not name or not img_size:
        raise CheckpointError(f"cannot tell the model and input size of this checkpoint "
                              f"(args: {sorted(args.values)[:8]})")
    return name, in_chans, img_size


def infer_swin_name(enc: dict[str, torch.Tensor], in_chans: int, img_size: int) -> str:
    """The ``mixmim_*`` name whose encoder has exactly these keys and shapes (released files)."""
    from models_mixmim import ENCODER_CONFIGS

    for name in ENCODER_CONFIGS:
        try:
            check_fits(reference_models(name, False, in_chans, img_size)[""], enc, name)
            return name
        except (CheckpointError, SarwmixError):
            continue
    raise CheckpointError(f"the encoder of this checkpoint matches none of {list(ENCODER_CONFIGS)} "
                          f"at in_chans={in_chans}, input_size={img_size}")


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> list[Path]:
    """Load a pretraining checkpoint, check each exported state against its target model, write it."""
    ckpt = load_checkpoint(ckpt_path)
    state = model_state(ckpt, ckpt_path)
    args = checkpoint_args(ckpt)
    simmim = any(k.startswith("encoder.") for k in state)
    name, in_chans, img_size = checkpoint_geometry(args, state, simmim)
    states = backbone_states(name, state, simmim)
    refs = reference_models(name, simmim, in_chans, img_size)
    for suffix, sd in states.items():
        check_fits(refs[suffix], sd, f"{ckpt_path}: exported {name} backbone{suffix}")
    return save_backbone(states, out)


class BackboneExporter:
    """Writes ``backbone/backbone_epoch<N>.pth`` every ``save_freq`` epochs (rank 0) and, via ``final``,
    ``backbone/backbone_final.pth``. Called like an evaluation hook: ``exporter(model, epoch) -> {}``."""

    def __init__(self, output_dir: str | Path, model_name: str, save_freq: int, is_main: bool) -> None:
        self.dir, self.model_name = Path(output_dir) / "backbone", model_name
        self.save_freq, self.is_main = save_freq, is_main

    def export(self, model: nn.Module, file_name: str) -> list[Path]:
        if not self.is_main:
            return []
        paths = save_backbone(backbone_states(self.model_name, model.state_dict(), simmim=True),
                              self.dir / file_name)
        log.info("backbone: %s", ", ".join(str(p) for p in paths))
        return paths

    def __call__(self, model: nn.Module, epoch: int) -> dict:
        n = epoch + 1
        if self.save_freq and n % self.save_freq == 0:
            self.export(model, f"backbone_epoch{n}.pth")
        return {}

    def final(self, model: nn.Module) -> list[Path]:
        return self.export(model, "backbone_final.pth")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m util.export_backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (checkpoint.pth, checkpoint_<N>.pth)")
    p.add_argument("out", help="output file, e.g. backbone.pth (timm backbones also get <stem>_full.pth)")
    a = p.parse_args(argv)
    try:
        for path in export_checkpoint(a.checkpoint, a.out):
            print(path)
    except SarwmixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
