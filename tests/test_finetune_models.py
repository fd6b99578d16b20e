"""Finetune models: shapes, gradients, tiling, released state-dict names, layer-decay ids."""
import pytest
import torch
from _finetune_helpers import DTYPES, manifest, state_from_manifest

from models_mixmim_ft import MixMIMFT, build_mixmim_ft, swin_layer_id
from models_sen12_ft import Sen12FloodFT, build_sen12_ft, cut_tiles
from sarwmix.errors import ConfigError
from util.lr_decay import param_groups


def tiny_ben(**kw) -> MixMIMFT:
    torch.manual_seed(0)
    return build_mixmim_ft("mixmim_tiny", 19, img_size=64, **kw)


def tiny_sen12(**kw) -> Sen12FloodFT:
    torch.manual_seed(0)
    return build_sen12_ft("mixmim_tiny", 2, img_size=32, **kw)


def test_ben_forward_and_gradient_on_every_trainable_parameter():
    m = tiny_ben(drop_path_rate=0.1)
    logits = m(torch.randn(3, 2, 64, 64))
    assert logits.shape == (3, 19)
    logits.sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    no_grad = sorted(n for n, p in m.named_parameters() if p.requires_grad and
                     (p.grad is None or not p.grad.abs().sum() > 0))
    assert not no_grad, no_grad
    assert "absolute_pos_embed" not in trainable  # fixed sin-cos, as in pretraining


def test_ben_pool_is_the_mean_of_final_tokens():
    m = tiny_ben().eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        expected = m.head(m.forward_features(x).mean(dim=1))
        assert torch.allclose(m(x), expected)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="mixmim_base"):
        build_mixmim_ft("mixmim_gigantic", 19)


def test_cut_tiles_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tiles = cut_tiles(x, 2)
    assert tiles.shape == (1, 4, 1, 2, 2)
    assert tiles[0, 1, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]  # top-right tile
    assert tiles[0, 2, 0].tolist() == [[8.0, 9.0], [12.0, 13.0]]  # bottom-left tile
    with pytest.raises(ValueError, match="whole tiles"):
        cut_tiles(torch.zeros(1, 1, 5, 4), 2)


def test_sen12_tiles_share_the_encoder_and_change_is_symmetric():
    m = tiny_sen12().eval()
    pair = torch.randn(2, 2, 2, 64, 64)
    with torch.no_grad():
        logits = m(pair)
        assert logits.shape == (2, 2)
        # Tile (0, 1) of date 1 of sample 1, encoded on its own, gives the same pooled feature.
        own = m.forward_features(pair[1, 1, :, 0:32, 32:64][None]).mean(dim=1)[0]
        assert torch.allclose(m.tile_features(pair)[1, 1, 1], own, atol=1e-5)
        assert torch.allclose(m(pair.flip(1)), logits, atol=1e-5)  # |f1 - f2| does not care about order
        same = torch.stack([pair[:, 0], pair[:, 0]], dim=1)
        assert torch.allclose(m(same), m.head.bias.expand(2, 2))  # no change -> only the bias


def test_sen12_patch_op_max_differs_from_avg_and_trains():
    m = tiny_sen12(patch_op="avg")
    pair = torch.randn(1, 2, 2, 64, 64)
    with torch.no_grad():
        avg = m(pair)
    m.patch_op = "max"
    mx = m(pair)
    assert not torch.allclose(avg, mx)
    mx.sum().backward()
    assert m.head.weight.grad is not None and m.layers[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch_op"):
        Sen12FloodFT(patch_op="median")


@pytest.mark.parametrize("name,builder", [
    ("finetune_ben19_mixmim_base", lambda: build_mixmim_ft("mixmim_base", 19)),
    ("finetune_sen12flood_mixmim_base", lambda: build_sen12_ft("mixmim_base", 2, img_size=128)),
])
def test_state_dict_matches_the_released_manifest(name, builder):
    with torch.device("meta"):  # names, shapes and dtypes only: no need to initialise 88M weights
        model = builder()
    own = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    expected = {k: (shape, DTYPES[dtype]) for k, shape, dtype in manifest(name)}
    assert sorted(set(own) ^ set(expected)) == []
    bad = [k for k in expected if own[k] != expected[k]]
    assert not bad, bad
    state = state_from_manifest(name)
    model.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(model.head.bias, state["head.bias"])


def test_layer_ids_follow_spec_7():
    def lid(name: str) -> int:
        return swin_layer_id(name, (2, 2, 18, 2))

    assert lid("patch_embed.proj.weight") == 0 and lid("absolute_pos_embed") == 0
    assert lid("layers.0.blocks.0.norm1.weight") == 1
    assert lid("layers.0.blocks.1.mlp.fc1.weight") == 2
    assert lid("layers.0.downsample.reduction.weight") == 3 == lid("layers.1.blocks.0.attn.qkv.bias")
    assert lid("layers.2.blocks.17.norm2.bias") == 22
    assert lid("layers.2.downsample.norm.weight") == 23 == lid("layers.3.blocks.0.norm1.weight")
    assert lid("layers.3.blocks.1.mlp.fc2.weight") == 24
    assert lid("norm.weight") == lid("head.bias") == 25


def test_layer_decay_groups_from_the_model_hook():
    m = tiny_ben()  # depths (2, 2, 6, 2): num_layers 13
    assert m.num_layers == 13
    groups = param_groups(m, 0.05, m.layer_id, m.num_layers, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["patch_embed.proj.weight"])] == pytest.approx(0.5**13)
    assert scale[id(named["layers.1.downsample.reduction.weight"])] == pytest.approx(0.5 ** (13 - 5))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["head.weight"])] == 0.05 and decay[id(named["head.bias"])] == 0.0
    assert len(scale) == sum(p.requires_grad for p in m.parameters())
