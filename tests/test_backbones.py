"""backbones: the worked example of docs/ARCHITECTURE.md (one entry adds a backbone) and the table itself."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import REPO

import backbones
import engine_finetune as E
import finetuning
import main_finetune
from models_vit import VisionTransformer, vit_layer_id
from modes import MODES
from tasks import get_task
from util.lr_decay import param_groups

MICRO = {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def vit_micro() -> backbones.Backbone:
    """The entry of docs/ARCHITECTURE.md: a 2-block ViT for BigEarthNet finetuning and export."""
    return backbones.Backbone(
        encoder=lambda img_size, in_chans: VisionTransformer(img_size=img_size, in_chans=in_chans, **MICRO),
        sizes=lambda limit: list(range(16, limit + 1, 16)),
        geometry="patch 16",
        patch=16,
        layer_id=lambda model, name: vit_layer_id(name, len(model.blocks)),
        finetune=lambda num_classes, **kw: VisionTransformer(num_classes=num_classes, **MICRO, **kw),
        token_drop=True,
    )


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "vit_micro", vit_micro())
    return "vit_micro"


def finetune_args(model: str) -> argparse.Namespace:
    args = main_finetune.parse_args(["--model", model, "--input_size", "32", "--dataset", "synthetic"])
    finetuning.settle(args)
    return args


def test_one_entry_finetunes_one_step(micro):
    args = finetune_args(micro)
    backbones.check_args(args)
    model = finetuning.build_model(args, get_task(args.task), 19)
    assert isinstance(model, VisionTransformer) and len(model.blocks) == 2
    groups = param_groups(model, 0.05, model.layer_id, model.num_layers, 0.7)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    step = E.make_finetune_step(torch.device("cpu"), [-15.0, -8.0], [3.0, 3.0], "ben")
    batch = (torch.randn(2, 2, 32, 32) * 3 - 12, (torch.rand(2, 19) > 0.5).float())
    before = model.head.weight.detach().clone()
    loss, _, n = step(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    assert n == 2 and torch.isfinite(loss) and not torch.equal(before, model.head.weight)


def test_one_entry_exports(micro):
    enc = backbones.BACKBONES[micro].encoder(32, 2)
    states = backbones.backbone_states(micro, {f"encoder.{k}": v for k, v in enc.state_dict().items()}, True)
    (ref,) = backbones.reference_models(micro, True, 2, 32).values()
    backbones.check_fits(ref, states[""], "vit_micro export")


def test_the_entry_layer_id_is_the_models():
    for name in ("mixmim_tiny", "vit_tiny"):
        bb = backbones.BACKBONES[name]
        model = bb.finetune(19, img_size=64, in_chans=2)
        assert all(bb.layer_id(model, n) == model.layer_id(n) for n, _ in model.named_parameters())


def test_unknown_models_name_the_choices():
    args = argparse.Namespace(model="mixmim_giant", input_size=128, mode="mixmim")
    with pytest.raises(backbones.ConfigError, match="choices: mixmim_tiny"):
        MODES[args.mode].check_model(args)
    assert "swin_tiny" in backbones.names("simmim") and "swin_tiny" not in backbones.names("finetune")


def test_an_entry_without_pretraining_models_is_refused_by_pretraining(micro):
    with pytest.raises(backbones.ConfigError, match="no SimMIM model"):
        MODES["simmim"].build(micro, 32, 2, mask_patch_size=16)
    with pytest.raises(backbones.ConfigError, match="no MixMIM model; choices: mixmim_tiny"):
        MODES["mixmim"].build(micro, 32, 2)


def test_the_modes_builders_take_the_flags_defaults():
    mixmim = MODES["mixmim"].build("mixmim_tiny", 64, 2)
    simmim = MODES["simmim"].build("vit_tiny", 64, 1, mask_patch_size=16)
    assert (mixmim.mask_ratio, mixmim.range_mask_ratio, mixmim.norm_pix_loss) == (0.5, 0.0, True)
    assert (simmim.mask_ratio, simmim.loss) == (0.6, "l1")


def test_the_launchers_model_sizes_are_backbones():
    """scripts/_common.sh takes MODEL=<size> for --model mixmim_<size>: every size must be an entry."""
    text = (REPO / "scripts" / "_common.sh").read_text()
    sizes = re.search(r"^MODELS=\(([^)]*)\)", text, re.MULTILINE).group(1).split()
    assert sizes and all(f"mixmim_{s}" in backbones.names("mixmim") for s in sizes)
