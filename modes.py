"""The one table of pretraining modes: a ``--mode`` name -> everything a pretraining run asks of it.

``MODES`` feeds ``--mode``'s choices and every place where the modes differ; no other module compares a mode's
name. An entry (``PretrainMode``) holds:

- ``build(name, img_size, in_chans, **options)``: the pretraining model on backbone ``name`` (a wrapper of the
  backbone table, checked there); its ``forward(x, weights, mask, generator)`` returns a
  ``models_mixmim.PretrainOutput`` (loss, prediction, mask, loss terms) and ``reconstruct`` the images of
  ``reconstructions.png``;
- ``options(config)``: the builder's keyword arguments from the flags of a run, and ``flags``, the flags only
  this mode reads (``config.yaml`` of a run leaves out those of the other modes);
- ``mask_ratio``: the default ``--mask_ratio``;
- ``check_flags(config)``: flag values the mode refuses (at parse time), and ``check_model(config)``: the
  backbone and input size (before anything is built); both raise ConfigError;
- ``token_size(config, model)``: the cell of ``--weight_granularity token``, in pixels;
- ``exports_backbone``: the run writes the encoder alone under ``backbone/`` (``backbones.BackboneExporter``);
- ``probe_encoder(model)``: the module the representation probe reads (``util.probe``).

Adding a mode: a builder (usually a model class wrapping a backbone's encoder) and one entry below; see
docs/ARCHITECTURE.md. Layer: beside ``tasks``, above the backbone table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

import backbones
from sarwmix.errors import ConfigError, table_entry

Config = Any  # a run's flags, read by attribute: the parsed ones (``check_flags``), else the settled RunConfig


def _accept(config: Config) -> None:
    """No flag value is refused."""


def _whole(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class PretrainMode:
    """One ``--mode`` choice (see the module docstring for each field)."""

    name: str
    title: str
    build: Callable[..., nn.Module]
    options: Callable[[Config], dict]
    flags: tuple[str, ...]
    mask_ratio: float
    check_model: Callable[[Config], None]
    token_size: Callable[[Config, nn.Module], int]
    check_flags: Callable[[Config], None] = _accept
    exports_backbone: bool = False
    probe_encoder: Callable[[nn.Module], nn.Module] = _whole

    def model(self, config: Config) -> nn.Module:
        """The pretraining model of a run: ``--model``, ``--input_size``, ``--channels``, ``--mask_ratio`` and
        this mode's own flags."""
        return self.build(config.model, config.input_size, len(config.channels), mask_ratio=config.mask_ratio,
                          **self.options(config))

    def other_flags(self) -> list[str]:
        """The flags of the other modes, which this mode does not read."""
        return [flag for mode in MODES.values() if mode is not self for flag in mode.flags]


# --- MixMIM ---------------------------------------------------------------------------------------

def _mixmim_options(config: Config) -> dict:
    return {"range_mask_ratio": config.range_mask_ratio, "norm_pix_loss": config.norm_pix_loss,
            "spectral_weight": config.spectral_weight, "spectral_bins": tuple(config.spectral_bins)}


MIXMIM = PretrainMode(
    name="mixmim", title="MixMIM", build=backbones.build_mixmim_pretrain, options=_mixmim_options,
    flags=("range_mask_ratio", "norm_pix_loss", "spectral_weight", "spectral_bins"), mask_ratio=0.5,
    check_model=lambda config: backbones.check_mixmim_size(config.model, config.input_size),
    # a target patch: the encoder's 32 px stride
    token_size=lambda config, model: model.encoder_stride)


# --- SimMIM ---------------------------------------------------------------------------------------

def _simmim_flags(config: Config) -> None:
    if config.spectral_weight > 0:
        raise ConfigError(f"--spectral_weight {config.spectral_weight} with --mode simmim: the spectral target is "
                          f"MixMIM's (its decoder predicts every hidden cell); leave it at 0 for SimMIM")


SIMMIM = PretrainMode(
    name="simmim", title="SimMIM", build=backbones.build_simmim,
    options=lambda config: {"mask_patch_size": config.mask_patch_size, "loss": config.loss},
    flags=("mask_patch_size", "loss"), mask_ratio=0.6,
    check_model=lambda config: backbones.check_simmim_size(config.model, config.input_size,
                                                           config.mask_patch_size),
    token_size=lambda config, model: config.mask_patch_size,  # a mask cell
    check_flags=_simmim_flags,
    exports_backbone=True,  # the encoder alone, for finetuning elsewhere (per --save_freq epoch and at the end)
    probe_encoder=lambda model: model.encoder)


MODES: dict[str, PretrainMode] = {m.name: m for m in (MIXMIM, SIMMIM)}


def get_mode(mode: str | PretrainMode) -> PretrainMode:
    """The mode of a name (as ``--mode`` and ``config.yaml`` record it), or ``mode`` itself."""
    return table_entry(MODES, mode, "pretraining mode")
