"""The one table of backbones: a ``--model`` name -> everything the project knows about it.

Every other place (flag checks, pretraining and finetuning factories, layer decay, backbone export, the
probe) asks ``BACKBONES`` or the functions below; adding a backbone is one entry. An entry holds:

- ``encoder(img_size, in_chans)``: a freshly initialised encoder with ``forward_features``; its state dict is
  the exported layout, and the reference an exported file is checked against;
- ``sizes(limit)``: the input sizes it accepts up to ``limit`` px, and ``geometry``, how they are described;
- ``layer_id(model, name)``: the depth id of a parameter for layer-wise lr decay (0 = embeddings);
- ``export``: encoder state -> ``{file suffix: state}`` (``""`` always; timm Swins add ``"_full"``), and
  ``export_models(img_size, in_chans)``: the models those files must fit;
- the wrappers it supports: ``finetune`` (BigEarthNet), ``pair_finetune`` (SEN12-FLOOD), ``mixmim`` and
  ``simmim`` (pretraining); None where the backbone does not take that role.

Three families fill the table: the project's Swin (``mixmim_*``, ``models_swin.ENCODER_CONFIGS``), the plain
ViT (``vit_*``, ``models_vit.VIT_CONFIGS``) and timm's Swin v1/v2 (SimMIM only, built with
``pretrained=False``: nothing is downloaded).
"""
from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

try:  # the project's first import of timm (and so of torchvision), whichever entry point runs
    import timm
except (ImportError, RuntimeError, AttributeError) as err:
    from util.versions import exit_on_vision_mismatch

    exit_on_vision_mismatch(err)  # a torchvision built for another torch: one line naming both, then exit
    raise

from models_mixmim import build_mixmim
from models_mixmim_ft import build_mixmim_ft, swin_layer_id
from models_sen12_ft import build_sen12_ft
from models_simmim import SimMIMSwin, SimMIMTimmSwin, SimMIMViT
from models_swin import ENCODER_CONFIGS, SWIN_WINDOWS, SwinEncoder, check_input_size, encoder_kwargs
from models_swin import valid_input_sizes as swin_valid_sizes
from models_vit import VIT_CONFIGS, build_vit, vit_layer_id
from sarwmix.errors import CheckpointError, ConfigError, SarwmixError
from util.checkpoint import StoredArgs, checkpoint_args, load_checkpoint, model_state, save_atomic
from util.pretrained import load_pretrained

log = logging.getLogger("sarwmix")
FULL_SUFFIX = "_full"
# Valid input sizes of the timm Swins by window (v1 has a fixed resolution).
TIMM_SWIN_SIZES: dict[int, tuple[int, ...]] = {
    7: (224,), 8: (128, 192, 256, 320, 384, 512), 16: (256, 320, 384, 512),
}

Encoder = Callable[[int, int], nn.Module]  # (img_size, in_chans) -> encoder


def plain_export(enc: dict[str, torch.Tensor]) -> dict[str, dict]:
    """One file holding the encoder state as it is."""
    return {"": enc}


def timm_features_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin state (``num_classes=0``) -> the ``features_only=True`` layout of the same model."""
    return {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in full.items()
            if not k.startswith(("norm.", "head."))}


def timm_export(enc: dict[str, torch.Tensor]) -> dict[str, dict]:
    """timm's ``features_only`` layout, and with ``_full`` the ``num_classes=0`` layout (``layers.<i>``, ``norm``)."""
    return {"": timm_features_state(enc), FULL_SUFFIX: enc}


@dataclass(frozen=True)
class Backbone:
    """One ``--model`` choice (see the module docstring for each field)."""

    encoder: Encoder
    sizes: Callable[[int], list[int]]
    geometry: str
    patch: int
    layer_id: Callable[[nn.Module, str], int] | None = None
    export: Callable[[dict], dict[str, dict]] = plain_export
    export_models: Callable[[int, int], dict[str, nn.Module]] | None = None
    finetune: Callable[..., nn.Module] | None = None
    pair_finetune: Callable[..., nn.Module] | None = None
    mixmim: Callable[..., nn.Module] | None = None
    simmim: Callable[..., nn.Module] | None = None
    token_drop: bool = False  # ViT: --pss / --eval_rho keep a subset of the patch tokens
    timm_name: str | None = None

    def reference_models(self, img_size: int, in_chans: int) -> dict[str, nn.Module]:
        """The models each exported file must fit, keyed by file suffix."""
        if self.export_models is not None:
            return self.export_models(img_size, in_chans)
        return {"": self.encoder(img_size, in_chans)}


# --- the three families ---------------------------------------------------------------------------

def _swin_encoder(name: str, img_size: int, in_chans: int) -> SwinEncoder:
    enc = SwinEncoder(**encoder_kwargs(name, img_size=img_size, in_chans=in_chans))
    enc.init_weights()
    return enc


def swin(name: str) -> Backbone:
    """The project's Swin ``name`` (a key of ``models_swin.ENCODER_CONFIGS``): every role."""
    return Backbone(encoder=partial(_swin_encoder, name), sizes=partial(swin_valid_sizes, SWIN_WINDOWS),
                    geometry=f"patch 4, windows {list(SWIN_WINDOWS)}", patch=4,
                    layer_id=lambda model, key: swin_layer_id(key, model.depths),
                    finetune=partial(build_mixmim_ft, name), pair_finetune=partial(build_sen12_ft, name),
                    mixmim=partial(build_mixmim, name), simmim=partial(SimMIMSwin, name))


def vit(name: str) -> Backbone:
    """The plain ViT ``name`` (a key of ``models_vit.VIT_CONFIGS``): BigEarthNet finetuning and SimMIM."""
    return Backbone(encoder=lambda img_size, in_chans: build_vit(name, img_size=img_size, in_chans=in_chans),
                    sizes=lambda limit: list(range(16, limit + 1, 16)), geometry="patch 16", patch=16,
                    layer_id=lambda model, key: vit_layer_id(key, len(model.blocks)),
                    finetune=lambda num_classes, **kw: build_vit(name, num_classes=num_classes, **kw),
                    simmim=partial(SimMIMViT, name), token_drop=True)


def _timm_models(arch: str, img_size: int, in_chans: int) -> dict[str, nn.Module]:
    kw = {"pretrained": False, "in_chans": in_chans, "img_size": img_size}
    return {"": timm.create_model(arch, features_only=True, **kw),
            FULL_SUFFIX: timm.create_model(arch, num_classes=0, **kw)}


def timm_swin(arch: str, window: int) -> Backbone:
    """A timm Swin v1/v2 (SimMIM pretraining and export only)."""
    return Backbone(encoder=lambda img_size, in_chans: _timm_models(arch, img_size, in_chans)[FULL_SUFFIX],
                    sizes=lambda limit: [s for s in TIMM_SWIN_SIZES[window] if s <= limit],
                    geometry=f"patch 4, window {window}", patch=4, export=timm_export,
                    export_models=partial(_timm_models, arch), simmim=partial(SimMIMTimmSwin, arch),
                    timm_name=arch)


BACKBONES: dict[str, Backbone] = {
    **{name: swin(name) for name in ENCODER_CONFIGS},
    "swin_tiny": timm_swin("swin_tiny_patch4_window7_224", 7),
    "swin_small": timm_swin("swin_small_patch4_window7_224", 7),
    "swinv2_tiny_w8": timm_swin("swinv2_tiny_window8_256", 8),
    "swinv2_tiny_w16": timm_swin("swinv2_tiny_window16_256", 16),
    "swinv2_small_w8": timm_swin("swinv2_small_window8_256", 8),
    "swinv2_small_w16": timm_swin("swinv2_small_window16_256", 16),
    **{name: vit(name) for name in VIT_CONFIGS},
}


# --- questions the rest of the project asks ---------------------------------------------------------

def names(role: str) -> list[str]:
    """The backbones that take ``role`` (a field name: ``finetune``, ``mixmim``, ``token_drop``, ...)."""
    return [n for n, b in BACKBONES.items() if getattr(b, role)]


def get(name: str, role: str, kind: str = "model") -> Backbone:
    """The entry of ``name``; ConfigError calling it an unknown ``kind`` and listing the backbones of ``role``
    when there is none."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown {kind} {name!r}; choices: {', '.join(names(role))}")
    return BACKBONES[name]


def _simmim_backbone(name: str) -> Backbone:
    return get(name, "simmim", "SimMIM backbone")


def timm_name(name: str) -> str | None:
    """The timm model name behind a backbone, or None for the project's own encoders."""
    bb = BACKBONES.get(name)
    return bb.timm_name if bb is not None else None


def valid_sizes(name: str, mask_patch_size: int = 32) -> list[int]:
    """Input sizes accepted for backbone ``name`` with this SimMIM mask cell (up to 512 px)."""
    return [s for s in _simmim_backbone(name).sizes(512) if s % mask_patch_size == 0]


def check_simmim_size(name: str, img_size: int, mask_patch_size: int = 32) -> None:
    """Refuse an input size (or mask cell) that ``name`` cannot take, naming the valid sizes."""
    bb = _simmim_backbone(name)
    if bb.simmim is None:
        raise ConfigError(f"--model {name} has no SimMIM model; choices: {', '.join(names('simmim'))}")
    if mask_patch_size % bb.patch:
        raise ConfigError(f"--mask_patch_size {mask_patch_size} is not a multiple of the patch size "
                          f"{bb.patch} of {name}")
    valid = valid_sizes(name, mask_patch_size)
    if not valid:  # no --input_size can help: the mask cell is what to change
        raise ConfigError(f"--mask_patch_size {mask_patch_size} divides none of the input sizes of {name} "
                          f"({bb.geometry}): {', '.join(map(str, valid_sizes(name, bb.patch)))}")
    if img_size not in valid:
        raise ConfigError(f"--input_size {img_size} is not valid for {name} ({bb.geometry}, mask cell "
                          f"{mask_patch_size}); valid sizes: {', '.join(map(str, valid))}")


def check_mixmim_size(name: str, img_size: int) -> None:
    """Refuse a backbone without a MixMIM model, or an input size its windows do not tile."""
    bb = BACKBONES.get(name)
    if bb is None or bb.mixmim is None:
        raise ConfigError(f"unknown model {name!r}; choices: {', '.join(names('mixmim'))} "
                          f"(timm Swin and ViT backbones need --mode simmim)")
    check_input_size(img_size, SWIN_WINDOWS)


def check_args(args: argparse.Namespace) -> None:
    """The input size of a run on the project's Swin, before anything is built (one clear line).

    Pretraining checks its backbone as its mode has it (``modes.PretrainMode.check_model``); finetuning checks
    the side the task's encoder sees instead (``finetuning.settle``).
    """
    bb = BACKBONES.get(args.model)
    if bb is not None and bb.mixmim is not None:
        check_input_size(args.input_size, SWIN_WINDOWS)


def build_simmim(name: str, img_size: int, in_chans: int, mask_ratio: float = 0.6, mask_patch_size: int = 32,
                 loss: str = "l1") -> nn.Module:
    """A SimMIM model, e.g. ``build_simmim("swinv2_tiny_w8", img_size=256, in_chans=1)``."""
    check_simmim_size(name, img_size, mask_patch_size)
    return _simmim_backbone(name).simmim(img_size=img_size, in_chans=in_chans, mask_ratio=mask_ratio,
                                         mask_patch_size=mask_patch_size, loss=loss)


def build_mixmim_pretrain(name: str, img_size: int, in_chans: int, **kwargs) -> nn.Module:
    """A MixMIM pretraining model, e.g. ``build_mixmim_pretrain("mixmim_base", img_size=128, in_chans=2)``.

    ``kwargs`` go to the model (``mask_ratio``, ...); left out, they take the model's defaults, which are the
    command line's.
    """
    bb = get(name, "mixmim")
    if bb.mixmim is None:
        raise ConfigError(f"--model {name} has no MixMIM model; choices: {', '.join(names('mixmim'))} "
                          f"(timm Swin and ViT backbones need --mode simmim)")
    return bb.mixmim(img_size=img_size, in_chans=in_chans, **kwargs)


def reference_models(model_name: str, simmim: bool, in_chans: int, img_size: int) -> dict[str, nn.Module]:
    """The models each exported file must fit, built on the meta device (no memory, no init cost)."""
    bb = BACKBONES.get(model_name)
    if bb is None or (bb.export_models is not None and not simmim):
        raise CheckpointError(f"cannot export model {model_name!r}: not a known backbone")
    with torch.device("meta"):
        return bb.reference_models(img_size, in_chans)


def backbone_states(model_name: str, state: dict[str, torch.Tensor], simmim: bool) -> dict[str, dict]:
    """File suffix -> state dict to write for the encoder of a pretraining state (``encoder_state``)."""
    enc = encoder_state(state, simmim)
    bb = BACKBONES.get(model_name)
    return bb.export(enc) if simmim and bb is not None else plain_export(enc)


def encoder_state(state: dict[str, torch.Tensor], simmim: bool) -> dict[str, torch.Tensor]:
    """The encoder's part of a pretraining state dict.

    SimMIM models hold the encoder under ``encoder.``; MixMIM models hold it at the top level next to
    ``mask_token`` and ``decoder_*``.
    """
    if simmim:
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith(("mask_token", "decoder_"))}


# --- export ---------------------------------------------------------------------------------------

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
    if not simmim and name not in names("mixmim"):
        name = infer_swin_name(encoder_state(state, False), in_chans, img_size)
    if not name or not img_size:
        raise CheckpointError(f"cannot tell the model and input size of this checkpoint "
                              f"(args: {sorted(args.values)[:8]})")
    return name, in_chans, img_size


def infer_swin_name(enc: dict[str, torch.Tensor], in_chans: int, img_size: int) -> str:
    """The ``mixmim_*`` name whose encoder has exactly these keys and shapes (released files)."""
    for name in names("mixmim"):
        try:
            check_fits(reference_models(name, False, in_chans, img_size)[""], enc, name)
            return name
        except (CheckpointError, SarwmixError):
            continue
    raise CheckpointError(f"the encoder of this checkpoint matches none of {names('mixmim')} "
                          f"at in_chans={in_chans}, input_size={img_size}")


def _blocks_per_stage(keys: list[str], pattern: str) -> tuple[int, ...]:
    """Blocks per stage from state-dict keys: ``pattern`` captures (stage, block) or just (block,)."""
    found: dict[int, int] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            stage, block = (int(m.group(1)), int(m.group(2))) if m.lastindex == 2 else (0, int(m.group(1)))
            found[stage] = max(found.get(stage, 0), block + 1)
    return tuple(found[s] for s in sorted(found))


def model_of_state(state: dict[str, torch.Tensor]) -> str | None:
    """The ``--model`` whose encoder has this state's width and depths (the project's Swins and ViTs), or None.

    Read from the shapes alone: the patch embedding's output width and the number of blocks of each stage
    (a pretraining state's ``encoder.``/decoder keys and a DDP ``module.`` prefix are looked through).
    """
    keys = [re.sub(r"^(module\.)?(encoder\.)?", "", k) for k in state]
    proj = next((v for k, v in zip(keys, state.values()) if k == "patch_embed.proj.weight"), None)
    if proj is None or proj.ndim not in (2, 4):
        return None
    # Swin: a 4x4 convolution (out, in, 4, 4); the ViT: a Linear over 16x16 patches (out, in * 256)
    width, patch = proj.shape[0], (proj.shape[-1] if proj.ndim == 4 else 16)
    swin_depths = _blocks_per_stage(keys, r"^layers\.(\d+)\.blocks\.(\d+)\.")
    for name, cfg in ENCODER_CONFIGS.items():
        if patch == 4 and cfg["embed_dim"] == width and tuple(cfg["depths"]) == swin_depths:
            return name
    vit_depth = _blocks_per_stage(keys, r"^blocks\.(\d+)\.")
    rel = any(".rel_pos." in k for k in keys)
    for name, cfg in VIT_CONFIGS.items():
        if (patch == 16 and cfg["embed_dim"] == width and (cfg["depth"],) == vit_depth
                and cfg.get("rel_pos", False) == rel):
            return name
    return None


def checkpoint_model(ckpt: dict) -> tuple[str, str] | None:
    """(``--model`` name, how it is known) of a checkpoint: its stored args when they name a backbone of the
    table, else its tensors' shapes (``model_of_state``); None when neither tells."""
    stored = checkpoint_args(ckpt).model
    if stored in BACKBONES:
        return stored, "its stored arguments"
    try:
        inferred = model_of_state(model_state(ckpt))
    except CheckpointError:
        return None
    return (inferred, "the shapes of its tensors") if inferred else None


def load_weights(model: nn.Module, ckpt: dict, path: str | Path, name: str, *, keep_head: bool = False) -> dict:
    """``util.pretrained.load_pretrained`` of a checkpoint's model state into ``model`` (the backbone ``name``);
    a checkpoint that does not fit and holds another backbone gets the flag to pass.

    Returns:
        the load report of ``load_pretrained``.
    Raises:
        CheckpointError: the state does not fit; ends with ``wrong --model NAME? ... pass --model OTHER`` when
        the checkpoint's own model is known and differs.
    """
    try:
        return load_pretrained(model, model_state(ckpt, path), path, keep_head=keep_head)
    except CheckpointError as err:
        theirs = checkpoint_model(ckpt)
        if theirs is None or theirs[0] == name:
            raise
        detail = str(err).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: a {theirs[0]} checkpoint (by {theirs[1]}), but --model {name}: wrong --model? "
                              f"pass --model {theirs[0]} (loading it into {name}: {detail})") from None


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
