"""Backbone export: timm layouts (features_only and plain), project Swin and ViT, the CLI, training runs."""
import argparse
import json

import pytest
import timm
import torch
import yaml
from conftest import REPO

import main_pretrain
from backbones import BACKBONES as SIMMIM_BACKBONES
from backbones import (
    FULL_SUFFIX,
    backbone_states,
    build_simmim,
    export_checkpoint,
    infer_swin_name,
    timm_name,
    valid_sizes,
)
from models_mixmim import build_mixmim
from models_swin import SwinEncoder, encoder_kwargs
from models_vit import build_vit
from sarwmix.errors import CheckpointError
from util.checkpoint import load_checkpoint, save_atomic
from util.export_backbone import main

TIMM_BACKBONES = [n for n in SIMMIM_BACKBONES if timm_name(n)]


def meta_timm(name: str, in_chans: int, size: int, **kw) -> torch.nn.Module:
    return timm.create_model(timm_name(name), pretrained=False, in_chans=in_chans, img_size=size,
                             device="meta", **kw)


@pytest.mark.parametrize("in_chans", [1, 2])
@pytest.mark.parametrize("name", TIMM_BACKBONES)
def test_timm_export_loads_strictly_with_and_without_features_only(name, in_chans):
    """A SimMIM state (encoder.* + mask token + decoder) -> two files that fit timm exactly (meta device)."""
    size = valid_sizes(name)[0]
    plain = meta_timm(name, in_chans, size, num_classes=0)
    state = {f"encoder.{k}": v for k, v in plain.state_dict().items()}
    state.update({"mask_token": torch.zeros(1, 1, 96), "decoder.0.weight": torch.zeros(1024, 768, 1, 1)})
    files = backbone_states(name, state, simmim=True)
    assert set(files) == {"", FULL_SUFFIX}
    meta_timm(name, in_chans, size, features_only=True).load_state_dict(files[""], strict=True, assign=True)
    plain.load_state_dict(files[FULL_SUFFIX], strict=True, assign=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # why two files: the layouts differ
        meta_timm(name, in_chans, size, features_only=True).load_state_dict(files[FULL_SUFFIX], strict=True)


def save_pretrain_ckpt(path, model, args):
    save_atomic({"model": model.state_dict(), "epoch": 0, "args": args}, path)
    return path


def test_mixmim_checkpoint_export_is_the_encoder(tmp_path):
    torch.manual_seed(0)
    model = build_mixmim("mixmim_tiny", img_size=64, in_chans=2)
    args = {"model": "mixmim_tiny", "mode": "mixmim", "input_size": 64, "channels": ["VH", "VV"]}
    ckpt = save_pretrain_ckpt(tmp_path / "checkpoint.pth", model, args)
    (out,) = export_checkpoint(ckpt, tmp_path / "backbone.pth")
    enc = SwinEncoder(**encoder_kwargs("mixmim_tiny", img_size=64, in_chans=2))
    state = torch.load(out, weights_only=True)
    enc.load_state_dict(state, strict=True)
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc.forward_features(x), model.forward_features(x))


def test_released_format_checkpoint_infers_the_model(tmp_path):
    """Released files hold an argparse.Namespace whose fields may not name our model: shapes decide."""
    torch.manual_seed(0)
    model = build_mixmim("mixmim_tiny", img_size=64, in_chans=2)  # same width as mixmim_small, fewer blocks
    ckpt = save_pretrain_ckpt(tmp_path / "checkpoint_64.pth", model, argparse.Namespace(input_size=64))
    (out,) = export_checkpoint(ckpt, tmp_path / "b.pth")
    SwinEncoder(**encoder_kwargs("mixmim_tiny", img_size=64, in_chans=2)).load_state_dict(torch.load(out))


def test_released_manifest_encoder_is_mixmim_base(compat_dir):
    entries = json.loads((compat_dir / "pretrain_mixmim_base.json").read_text())["entries"]
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {k: torch.empty(shape, dtype=dtypes[dt]) for k, shape, dt in entries}  # shapes only, untouched
    (enc,) = backbone_states("mixmim_base", state, simmim=False).values()
    assert infer_swin_name(enc, in_chans=2, img_size=128) == "mixmim_base"
    assert not any(k.startswith(("decoder", "mask_token")) for k in enc)


def test_vit_export_loads_into_the_vit():
    model = build_simmim("vit_small_rel", img_size=64, in_chans=1)
    (state,) = backbone_states("vit_small_rel", model.state_dict(), simmim=True).values()
    build_vit("vit_small_rel", img_size=64, in_chans=1).load_state_dict(state, strict=True)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_rel"])
def test_vit_checkpoint_export_via_the_cli(tmp_path, name):
    """The reference ViT is built on the meta device: its constructor must not compute there."""
    torch.manual_seed(0)
    model = build_simmim(name, img_size=64, in_chans=1)
    args = {"model": name, "mode": "simmim", "input_size": 64, "channels": ["VV"]}
    ckpt = save_pretrain_ckpt(tmp_path / "checkpoint.pth", model, args)
    assert main([str(ckpt), str(tmp_path / "b.pth")]) == 0
    vit = build_vit(name, img_size=64, in_chans=1)
    vit.load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True), strict=True)
    assert torch.equal(vit.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "b.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint not found")
    args = {"model": "mixmim_tiny", "input_size": 64}
    bogus = save_pretrain_ckpt(tmp_path / "c.pth", torch.nn.Linear(2, 2), args)
    with pytest.raises(CheckpointError, match="missing keys"):
        export_checkpoint(bogus, tmp_path / "b.pth")


def run(tmp_path, *argv):
    argv = [*argv, "--output_dir", str(tmp_path), "--num_workers", "0", "--no-progress"]
    return main_pretrain.main(main_pretrain.parse_args(argv))


def test_simmim_run_on_the_project_swin_exports_every_epoch(tmp_path):
    run(tmp_path, "--config", str(REPO / "configs/pretrain_simmim_tiny_cpu.yaml"), "--num_samples", "8",
        "--batch_size", "4", "--save_freq", "1")
    names = sorted(p.name for p in (tmp_path / "backbone").iterdir())
    assert names == ["backbone_epoch1.pth", "backbone_epoch2.pth", "backbone_final.pth"]
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    steps = [json.loads(line) for line in (tmp_path / "train_log.json").read_text().splitlines()]
    assert len(steps) == 4 and {s["mask_ratio"] for s in steps} == {0.75}  # ceil(4 * 0.6) of 4 cells
    assert all(s["grad_norm"] > 0 for s in steps)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["mode"], config["mask_ratio"]) == ("simmim", 0.6)
    final = torch.load(tmp_path / "backbone" / "backbone_final.pth", weights_only=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")["model"]
    assert all(torch.equal(v, ckpt[f"encoder.{k}"]) for k, v in final.items())
    SwinEncoder(**encoder_kwargs("mixmim_tiny", img_size=64, in_chans=2)).load_state_dict(final, strict=True)
    pretrained = pytest.importorskip("util.pretrained")
    ft = pytest.importorskip("models_mixmim_ft").build_mixmim_ft("mixmim_tiny", 19, img_size=64, in_chans=2)
    _, report = pretrained.load_pretrained_file(ft, tmp_path / "backbone" / "backbone_final.pth")
    assert report["missing"] == ["head.bias", "head.weight"]


def test_simmim_run_on_timm_swinv2_exports_loadable_backbones(tmp_path):
    run(tmp_path, "--mode", "simmim", "--model", "swinv2_tiny_w8", "--input_size", "128", "--channels", "VV",
        "--epochs", "1", "--warmup_epochs", "0", "--num_samples", "2", "--batch_size", "2",
        "--vis_samples", "0")
    files = tmp_path / "backbone"
    kw = {"pretrained": False, "in_chans": 1, "img_size": 128}
    feats = timm.create_model("swinv2_tiny_window8_256", features_only=True, **kw)
    feats.load_state_dict(torch.load(files / "backbone_final.pth", weights_only=True), strict=True)
    plain = timm.create_model("swinv2_tiny_window8_256", num_classes=0, **kw)
    plain.load_state_dict(torch.load(files / "backbone_final_full.pth", weights_only=True), strict=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")["model"]
    key = "layers.2.blocks.1.attn.qkv.weight"
    assert torch.equal(plain.state_dict()[key], ckpt[f"encoder.{key}"])
    x = torch.randn(1, 1, 128, 128)
    feats.eval()
    plain.eval()  # timm's default drop path (0.1) is random in training mode
    with torch.no_grad():
        last = feats(x)[-1]
        assert last.shape == (1, 4, 4, 768)
        assert torch.allclose(last, plain.layers(plain.patch_embed(x)), atol=1e-5)
    # The CLI writes the same two files from the checkpoint.
    assert main([str(tmp_path / "checkpoint.pth"), str(tmp_path / "cli.pth")]) == 0
    cli = torch.load(tmp_path / "cli_full.pth", weights_only=True)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in cli.items())
