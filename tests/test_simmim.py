"""SimMIM mode: per-sample masks, mask-token replacement, the masked loss, every backbone, size validation."""
import math

import pytest
import torch
from conftest import run_py
from torch import nn

import main_pretrain
from backbones import BACKBONES as SIMMIM_BACKBONES
from backbones import TIMM_SWIN_SIZES, build_simmim, check_simmim_size, valid_sizes
from models_simmim import SimMIM, SimMIMTimmSwin
from sarwmix.errors import ConfigError
from util.masking import pixel_mask, upsample_mask


@pytest.fixture(scope="module")
def vit64():
    """A cheap SimMIM model: ViT-tiny at 64 px, 16 px mask cells (4x4 cells, 4x4 tokens)."""
    torch.manual_seed(0)
    return build_simmim("vit_tiny", img_size=64, in_chans=2, mask_patch_size=16)


@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.6, 0.75, 0.9])
def test_forward_masks_ceil_cells_per_sample(vit64, ratio):
    vit64.mask_ratio = ratio
    x = torch.randn(5, 2, 64, 64)
    with torch.no_grad():
        _, rec, mask, _ = vit64(x, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (5, 16) and rec.shape == x.shape
    assert mask.sum(dim=1).tolist() == [math.ceil(16 * ratio)] * 5
    assert len({tuple(r.tolist()) for r in mask}) > 1  # drawn per sample, not shared by the batch
    vit64.mask_ratio = 0.6


def test_mask_is_seeded(vit64):
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        m1 = vit64(x, generator=torch.Generator().manual_seed(7))[2]
        m2 = vit64(x, generator=torch.Generator().manual_seed(7))[2]
        m3 = vit64(x, generator=torch.Generator().manual_seed(8))[2]
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_upsampled_mask_keeps_cells_whole():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 cells
    tok = upsample_mask(mask, 2, 8).view(8, 8)
    for i in range(8):
        for j in range(8):
            assert tok[i, j] == mask[0, (i // 4) * 2 + j // 4]
    assert pixel_mask(mask, 2, 64).shape == (1, 1, 64, 64) and pixel_mask(mask, 2, 64).mean() == 0.5


def test_mask_token_replaces_exactly_the_masked_tokens(vit64, monkeypatch):
    """The encoder sees the mask token at masked tokens, the patch embedding elsewhere (before position)."""
    seen = {}
    real_encode = vit64.encode

    def spy(tokens):
        seen["tokens"] = tokens
        return real_encode(tokens)

    monkeypatch.setattr(vit64, "encode", spy)
    x = torch.randn(2, 2, 64, 64)
    mask = torch.zeros(2, 16)
    mask[0, [0, 5]] = 1
    mask[1, 15] = 1
    with torch.no_grad():
        vit64(x, mask=mask)
        emb = vit64.embed(x)
    tokens, tok_mask = seen["tokens"], upsample_mask(mask, 4, 4).bool()
    assert torch.allclose(tokens[tok_mask], vit64.mask_token[0].expand(int(tok_mask.sum()), -1))
    assert torch.allclose(tokens[~tok_mask], emb[~tok_mask])


def _loss(model, x, rec, mask, w=None):
    return model.forward_loss(x, rec, mask, w)[0]


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_loss_sees_only_masked_pixels(vit64, loss):
    vit64.loss = loss
    g = torch.Generator().manual_seed(3)
    x, rec = torch.randn(2, 2, 64, 64, generator=g), torch.randn(2, 2, 64, 64, generator=g)
    mask = torch.zeros(2, 16)
    mask[:, [1, 6, 11]] = 1
    m_pix = pixel_mask(mask, 4, 64)
    base = _loss(vit64, x, rec, mask)
    x_visible_changed = x + 5.0 * (1 - m_pix) * torch.randn(x.shape, generator=g)
    w_visible_changed = 1 + 3.0 * (1 - m_pix) * torch.rand(x.shape, generator=g)
    assert torch.allclose(_loss(vit64, x_visible_changed, rec, mask), base)
    assert torch.allclose(_loss(vit64, x, rec, mask, w_visible_changed), base)
    assert torch.allclose(_loss(vit64, x, rec, mask, torch.ones_like(x)), base)
    x_masked_changed = x + 0.5 * m_pix
    assert not torch.allclose(_loss(vit64, x_masked_changed, rec, mask), base)
    vit64.loss = "l1"


def test_loss_is_simmims_normalisation(vit64):
    """sum(|x - rec| * m * w) / (sum(m) + 1e-5) / C, with m counted once per pixel (not per channel)."""
    x = torch.zeros(1, 2, 64, 64)
    rec = torch.zeros(1, 2, 64, 64)
    mask = torch.zeros(1, 16)
    mask[0, 0] = 1  # one 16x16 cell: 256 pixels
    rec[0, 0, :16, :16] = 2.0  # channel 0 off by 2, channel 1 exact
    w = torch.ones_like(x)
    w[0, 0, :8, :16] = 3.0  # half of the cell's channel-0 pixels weigh 3
    expected = (2.0 * 128 * 3 + 2.0 * 128) / (256 + 1e-5) / 2
    assert _loss(vit64, x, rec, mask, w).item() == pytest.approx(expected, rel=1e-6)
    assert _loss(vit64, x, rec, torch.zeros(1, 16)).item() == 0.0  # empty mask: no NaN


def test_reconstruct_columns(vit64):
    x = torch.randn(2, 2, 64, 64)
    cols = vit64.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert list(cols) == ["input", "masked input", "prediction", "mask"]
    assert cols["mask"].shape == (2, 1, 64, 64) and 0 < cols["mask"].mean() < 1
    hidden = cols["mask"].bool().expand_as(x)
    assert torch.equal(cols["masked input"][~hidden], x[~hidden]) and not cols["masked input"][hidden].any()
    rec = vit64(x, mask=cols["mask"][:, 0, ::16, ::16].flatten(1)).pred
    assert torch.equal(cols["prediction"], rec)  # the raw decoder output on every cell, not a composite
    assert all(cols[k].shape == x.shape for k in ("input", "masked input", "prediction"))


def small_model(name: str, in_chans: int) -> tuple[SimMIM, int]:
    """The cheapest faithful build of a backbone: 64 px for the project's Swin and the ViT, 224 px for Swin v1
    (its only size), and 128 px for every Swin v2 -- for window 16 below the table's 256, where timm clamps
    the window to the stage grid; the parameters are the same as at 256 px, at a quarter of the cost."""
    bb = SIMMIM_BACKBONES[name]
    if bb.timm_name is not None:
        size = 224 if bb.sizes(512) == [224] else 128
        return SimMIMTimmSwin(bb.timm_name, img_size=size, in_chans=in_chans), size
    return build_simmim(name, img_size=64, in_chans=in_chans), 64


@pytest.mark.parametrize("in_chans", [1, 2])
@pytest.mark.parametrize("name", ["mixmim_tiny", "vit_tiny", "vit_tiny_rel", "swin_tiny", "swin_small",
                                  "swinv2_tiny_w8", "swinv2_tiny_w16", "swinv2_small_w8", "swinv2_small_w16"])
def test_every_backbone_trains_every_parameter(name, in_chans):
    torch.manual_seed(0)
    model, size = small_model(name, in_chans)
    # timm's SwinV2 zero-initialises its res-post-norms, so at step 0 its blocks are identities and only the
    # norms would see a gradient; unit norms let the test check that every weight is wired to the loss.
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
    batch = 2 if size == 64 else 1
    x = torch.randn(batch, in_chans, size, size)
    loss, rec, mask, terms = model(x, weights=1 + torch.rand_like(x), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and rec.shape == x.shape and mask.shape == (batch, (size // 32) ** 2)
    assert terms == {"pixel_loss": loss.detach()}
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead[:5]


@pytest.mark.parametrize("name", ["swin_tiny", "swinv2_tiny_w8", "swinv2_tiny_w16", "mixmim_tiny"])
def test_every_valid_size_builds_and_reconstructs(name):
    """Shapes only, on the meta device: every listed size runs through the wrapper and timm (the ViT head
    selects masked tokens by value, which the meta device cannot do; test_vit covers its sizes)."""
    for size in valid_sizes(name):
        with torch.device("meta"):
            model = build_simmim(name, img_size=size, in_chans=1)
            _, rec, mask, _ = model(torch.empty(1, 1, size, size))
        assert rec.shape == (1, 1, size, size) and mask.shape == (1, (size // 32) ** 2), (name, size)


def test_valid_sizes_follow_the_seed_table():
    assert TIMM_SWIN_SIZES == {7: (224,), 8: (128, 192, 256, 320, 384, 512), 16: (256, 320, 384, 512)}
    assert valid_sizes("swin_small") == [224]
    assert valid_sizes("swinv2_small_w8") == [128, 192, 256, 320, 384, 512]
    assert valid_sizes("swinv2_tiny_w16") == [256, 320, 384, 512]
    assert 128 in valid_sizes("mixmim_base") and 192 not in valid_sizes("mixmim_base")
    assert valid_sizes("vit_tiny", mask_patch_size=48) == [48, 96, 144, 192, 240, 288, 336, 384, 432, 480]


@pytest.mark.parametrize("name,size,valid", [
    ("swinv2_tiny_w8", 200, "128, 192, 256, 320, 384, 512"),
    ("swinv2_small_w16", 192, "256, 320, 384, 512"),
    ("swin_tiny", 256, "valid sizes: 224"),
    ("mixmim_tiny", 192, "32, 64, 128, 256, 384, 512"),
    ("vit_small", 80, "32, 64, 96"),
])
def test_invalid_size_refused_before_anything_is_built(tmp_path, name, size, valid):
    out = tmp_path / "run"
    args = main_pretrain.parse_args(["--mode", "simmim", "--model", name, "--input_size", str(size),
                                     "--output_dir", str(out)])
    with pytest.raises(ConfigError, match=valid) as e:
        main_pretrain.main(args)
    assert f"--input_size {size}" in str(e.value) and name in str(e.value)
    assert not out.exists()


def test_bad_mask_cell_and_unknown_backbone_refused():
    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        check_simmim_size("vit_tiny", 64, mask_patch_size=8)
    no_size = r"--mask_patch_size 64 divides none of the input sizes of swin_tiny .*: 224$"
    with pytest.raises(ConfigError, match=no_size):
        check_simmim_size("swin_tiny", 224, mask_patch_size=64)
    with pytest.raises(ConfigError, match="choices: .*swinv2_tiny_w8"):
        check_simmim_size("swinv3_tiny", 256)
    with pytest.raises(ConfigError, match="choices: mixmim_tiny.*need --mode simmim"):
        main_pretrain.main(main_pretrain.parse_args(["--model", "swinv2_tiny_w8"]))


def test_cli_invalid_size_one_line_exit_2(tmp_path):
    proc = run_py(["main_pretrain.py", "--mode", "simmim", "--model", "swinv2_tiny_w8", "--input_size", "200",
                   "--output_dir", str(tmp_path / "run")], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --input_size 200") and "128, 192, 256, 320, 384, 512" in lines[0]
