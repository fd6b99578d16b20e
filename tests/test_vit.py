"""The plain ViT backbone: Unfold patch embedding, position signals, token keeping, the masked-patch head."""
import pytest
import torch
import torch.nn.functional as F

from backbones import build_simmim
from models_mixmim import patchify
from models_vit import MaskedPatchHead, RelativePositionBias, VisionTransformer, build_vit, vit_layer_id
from sarwmix.errors import ConfigError


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{"img_size": 64, "patch_size": 16, "in_chans": 2, "embed_dim": 32, "depth": 2,
                                "num_heads": 2, **kw})


def test_unfold_embedding_is_a_strided_conv():
    vit = small_vit()
    x = torch.randn(2, 2, 64, 64)
    lin = vit.patch_embed.proj
    # Unfold orders each patch channel-major (c, i, j): the Linear weight is a (D, C, p, p) conv kernel.
    conv = F.conv2d(x, lin.weight.view(32, 2, 16, 16), lin.bias, stride=16).flatten(2).transpose(1, 2)
    assert torch.allclose(vit.embed(x), conv, atol=1e-5)


@pytest.mark.parametrize("pos", [{"abs_pos": True}, {"abs_pos": False, "rel_pos": True},
                                 {"abs_pos": True, "rel_pos": True}])
def test_keeping_all_tokens_in_any_order_permutes_the_output(pos):
    """Position is attached before tokens are selected: keep_idx = a permutation permutes the output."""
    vit = small_vit(**pos).eval()
    x = torch.randn(2, 2, 64, 64)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    with torch.no_grad():
        full = vit.forward_features(x)
        kept = vit.forward_features(x, keep_idx=perm)
    assert kept.shape == (2, 16, 32)
    assert torch.allclose(kept, torch.gather(full, 1, perm[..., None].expand(-1, -1, 32)), atol=1e-5)


def test_subset_of_tokens_is_encoded_alone():
    vit = small_vit(abs_pos=False, rel_pos=True).eval()
    keep = torch.tensor([[0, 3, 5, 15], [1, 2, 8, 9]])
    with torch.no_grad():
        out = vit.forward_features(torch.randn(2, 2, 64, 64), keep_idx=keep)
        logits = vit.forward_head(out)
    assert out.shape == (2, 4, 32) and logits.shape == (2, 32)


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor, p: int = 16) -> torch.Tensor:
    """Move whole p x p patches to other places (the same patches, other positions)."""
    cols = F.unfold(x, p, stride=p)[:, :, perm]
    return F.fold(cols, x.shape[-2:], p, stride=p)


def test_position_signal_matters():
    x = torch.randn(1, 2, 64, 64)
    moved = shuffle_patches(x, torch.randperm(16, generator=torch.Generator().manual_seed(0)))
    for pos in ({"abs_pos": True}, {"abs_pos": False, "rel_pos": True}):
        vit = small_vit(**pos).eval()
        with torch.no_grad():
            assert not torch.allclose(vit(x), vit(moved), atol=1e-4), pos
            if vit.pos_embed is not None:  # without any position signal the pooled output cannot tell
                vit.pos_embed.zero_()
                assert torch.allclose(vit(x), vit(moved), atol=1e-5)
    with pytest.raises(ConfigError, match="position"):
        small_vit(abs_pos=False, rel_pos=False)


def test_relative_bias_depends_only_on_offsets():
    rpb = RelativePositionBias(grid=4, num_heads=3)
    torch.nn.init.normal_(rpb.table)
    bias = rpb()[0]  # (heads, 16, 16)
    # token (r, c) -> r*4 + c; the pair (0,0)->(1,1) and (2,2)->(3,3) share the offset (1, 1)
    assert torch.equal(bias[:, 0, 5], bias[:, 10, 15])
    assert not torch.equal(bias[:, 0, 5], bias[:, 0, 6])
    keep = torch.tensor([[10, 15], [0, 5]])
    sub = rpb(keep)
    assert sub.shape == (2, 3, 2, 2) and torch.equal(sub[0], sub[1])


def test_masked_patch_head_predicts_masked_tokens_only():
    head = MaskedPatchHead(embed_dim=8, patch_size=4, in_chans=2)
    z = torch.randn(2, 6, 8, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    out = head(z, mask)
    assert out.shape == (2, 6, 32)
    assert (out[mask == 0] == 0).all() and (out[mask == 1] != 0).any(dim=-1).all()
    out.sum().backward()
    assert (z.grad[mask == 0] == 0).all() and (z.grad[mask == 1] != 0).any(dim=-1).all()


def test_simmim_vit_prediction_lives_in_masked_patches():
    torch.manual_seed(0)
    model = build_simmim("vit_tiny_rel", img_size=96, in_chans=1)
    x = torch.randn(2, 1, 96, 96)
    mask = torch.zeros(2, 9)
    mask[0, 4] = 1
    mask[1, [0, 8]] = 1
    with torch.no_grad():
        loss, rec, _, _ = model(x, mask=mask)
    per_patch = patchify(rec, 16).abs().sum(-1)  # (2, 36) tokens of 16 px
    token_mask = torch.zeros(2, 6, 6)
    token_mask[0, 2:4, 2:4] = 1
    token_mask[1, :2, :2] = 1
    token_mask[1, 4:, 4:] = 1
    assert ((per_patch > 0) == token_mask.view(2, 36).bool()).all()
    assert torch.isfinite(loss)


def test_layer_ids_and_no_weight_decay_names():
    vit = build_vit("vit_tiny_rel", img_size=32, in_chans=2, num_classes=5)
    names = dict(vit.named_parameters())
    assert vit_layer_id("patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("blocks.3.attn.qkv.weight", 12) == 4
    assert vit_layer_id("head.weight", 12) == vit_layer_id("norm.bias", 12) == 13
    assert {n for n in vit.no_weight_decay() if n != "pos_embed"} <= set(names)
    assert vit(torch.randn(1, 2, 32, 32)).shape == (1, 5)
    with pytest.raises(ConfigError, match="multiple of the ViT patch size"):
        build_vit("vit_tiny", img_size=40)
    with pytest.raises(ConfigError, match="choices"):
        build_vit("vit_giant")


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 2, 64, 64)
    grads = []
    for ckpt in (False, True):
        vit = small_vit(rel_pos=True)
        vit.set_grad_checkpointing(ckpt)
        vit.forward_features(x).square().mean().backward()
        grads.append(vit.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(*grads, atol=1e-6)
