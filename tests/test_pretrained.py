"""util/pretrained.py: filtering, resizing and exact key checks when loading into finetune models."""
import argparse
import itertools

import pytest
import torch
from _finetune_helpers import released_checkpoint, state_from_manifest

import models_mixmim as M
from models_mixmim_ft import build_mixmim_ft
from models_sen12_ft import build_sen12_ft
from sarwmix.errors import CheckpointError
from util.checkpoint import save_atomic, sha256_of
from util.pos_embed import relative_position_index, resize_pos_embed, resize_rel_pos_table
from util.pretrained import checkpoint_epoch, filter_state, load_pretrained, load_pretrained_file


@pytest.fixture(scope="module")
def pretrain_64() -> dict:
    """State dict of a (seeded, untrained) tiny MixMIM at 64 px."""
    torch.manual_seed(1)
    return M.mixmim_tiny(img_size=64).state_dict()


def ft(img_size: int = 64, **kw):
    torch.manual_seed(0)
    return build_mixmim_ft("mixmim_tiny", 19, img_size=img_size, **kw)


def test_filter_drops_decoder_mask_token_head_and_module_prefix():
    state = {"module.layers.0.x": torch.zeros(1), "mask_token": torch.zeros(1), "decoder_embed.weight":
             torch.zeros(1), "decoder_pos_embed": torch.zeros(1), "head.weight": torch.zeros(1),
             "decoder.0.weight": torch.zeros(1), "norm.weight": torch.zeros(1)}
    kept, dropped = filter_state(state, keep_head=False)
    assert sorted(kept) == ["layers.0.x", "norm.weight"]
    assert dropped == ["decoder.0.weight", "decoder_embed.weight", "decoder_pos_embed", "head.weight",
                       "mask_token"]
    assert "head.weight" in filter_state(state, keep_head=True)[0]


def test_simmim_run_state_loads_like_its_exported_encoder():
    import pretraining
    from modes import MODES

    torch.manual_seed(2)
    simmim = MODES["simmim"].model(pretraining.parse_args(["--mode", "simmim", "--model", "mixmim_tiny",
                                                           "--input_size", "64"]))
    state = {f"module.{k}": v for k, v in simmim.state_dict().items()}
    model = ft()
    report = load_pretrained(model, state, "simmim.pth")
    assert report["missing"] == ["head.bias", "head.weight"] and "mask_token" in report["dropped"]
    assert torch.equal(model.state_dict()["layers.1.blocks.0.attn.qkv.weight"],
                       simmim.state_dict()["encoder.layers.1.blocks.0.attn.qkv.weight"])


def test_pretrain_state_loads_with_only_the_head_missing(pretrain_64):
    model = ft()
    head_before = model.head.weight.clone()
    report = load_pretrained(model, pretrain_64, "pre.pth")
    assert report["missing"] == ["head.bias", "head.weight"] and report["resized"] == []
    assert "mask_token" in report["dropped"] and "decoder_pred.weight" in report["dropped"]
    own = model.state_dict()
    assert torch.equal(own["layers.2.blocks.5.mlp.fc2.weight"], pretrain_64["layers.2.blocks.5.mlp.fc2.weight"])
    assert torch.equal(model.head.weight, head_before)  # the head keeps its fresh init


def test_unexpected_missing_and_misshapen_keys_are_named(pretrain_64):
    model = ft()
    extra = {**pretrain_64, "layers.2.blocks.6.norm1.weight": torch.ones(384)}
    with pytest.raises(CheckpointError, match=r"keys not in the model: layers\.2\.blocks\.6\.norm1\.weight"):
        load_pretrained(model, extra, "pre.pth")
    short = {k: v for k, v in pretrain_64.items() if k != "norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: norm\.bias"):
        load_pretrained(model, short, "pre.pth")
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*\(96, 1, 4, 4\)"):
        load_pretrained(ft(in_chans=1), pretrain_64, "pre.pth")
    with pytest.raises(CheckpointError, match=r"pre\.pth: has no classification head \(head\.bias, head\.weight "
                                              r"missing\): a pretraining checkpoint\?.*--finetune"):
        load_pretrained(model, pretrain_64, "pre.pth", keep_head=True)  # --eval needs a head


def test_eval_of_a_checkpoint_of_another_label_set_names_both_class_counts(pretrain_64):
    finetuned = {**pretrain_64, "head.weight": torch.zeros(43, 768), "head.bias": torch.zeros(43)}
    with pytest.raises(CheckpointError, match=r"ft\.pth: its head has 43 classes, the model's has 19: .*--label_set"):
        load_pretrained(ft(), finetuned, "ft.pth", keep_head=True)
    report = load_pretrained(ft(), finetuned, "ft.pth")  # --finetune: the other task's head is dropped
    assert report["missing"] == ["head.bias", "head.weight"] and "head.weight" in report["dropped"]


def test_smaller_input_resizes_position_embedding_and_window_tables(pretrain_64):
    model = ft(img_size=32)  # grids 8/4/2/1: windows 8, 4, 2, 1 instead of 8, 8, 4, 2
    report = load_pretrained(model, pretrain_64, "pre.pth")
    resized = {r.split()[0] for r in report["resized"]}
    assert "absolute_pos_embed" in resized
    assert "layers.1.blocks.0.attn.relative_position_bias_table" in resized
    assert "layers.3.blocks.1.attn.relative_position_index" in resized
    assert "layers.0.blocks.0.attn.relative_position_bias_table" not in resized  # window 8 both times
    own = model.state_dict()
    key = "layers.1.blocks.1.attn.relative_position_bias_table"
    assert own[key].shape == (49, 6)
    assert torch.equal(own[key], resize_rel_pos_table(pretrain_64[key], 4))
    assert torch.equal(own["absolute_pos_embed"], resize_pos_embed(pretrain_64["absolute_pos_embed"], (8, 8)))
    assert torch.equal(own["layers.1.blocks.0.attn.relative_position_index"], relative_position_index(4))
    assert model(torch.randn(1, 2, 32, 32)).shape == (1, 19)


def test_a_window_clamped_by_a_smaller_input_keeps_the_bias_of_every_offset(pretrain_64):
    """At 32 px the stage-1 grid (4) clamps window 8 to 4: tokens are as large as in pretraining, so a pair
    of tokens at offset (dy, dx) must get the bias the pretrained block learned for that offset."""
    model = ft(img_size=32)
    load_pretrained(model, pretrain_64, "pre.pth")
    for stage, (w_old, w_new) in ((1, (8, 4)), (2, (4, 2)), (3, (2, 1))):
        old = pretrain_64[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        new = model.layers[stage].blocks[0].attn.relative_position_bias_table.detach()
        assert new.shape == ((2 * w_new - 1) ** 2, old.shape[1])
        for dy, dx in itertools.product(range(-w_new + 1, w_new), repeat=2):
            row_old = (dy + w_old - 1) * (2 * w_old - 1) + dx + w_old - 1
            row_new = (dy + w_new - 1) * (2 * w_new - 1) + dx + w_new - 1
            assert torch.equal(new[row_new], old[row_old]), (stage, dy, dx)
    # A larger window has untrained offsets: resampled bicubically (Swin), to the new shape.
    table = pretrain_64["layers.3.blocks.0.attn.relative_position_bias_table"]  # window 2: (9, heads)
    assert resize_rel_pos_table(table, 4).shape == (49, table.shape[1])


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_released_base_pretrain_checkpoint_at_128_and_256_px(tmp_path):
    path = released_checkpoint(tmp_path / "benv1_like_checkpoint_64.pth",
                               state_from_manifest("pretrain_mixmim_base"), epoch=63,
                               model="mixmim_base", input_size=128, norm_pix_loss=True)
    with torch.device("meta"):  # key and shape logic only; values were checked on the tiny model
        model = build_mixmim_ft("mixmim_base", 19)
        big = build_sen12_ft("mixmim_base", 2, img_size=256)  # windows unchanged, 64x64 position grid
    ckpt, report = load_pretrained_file(model, path)
    assert isinstance(ckpt["args"], argparse.Namespace) and checkpoint_epoch(path, ckpt) == 64
    assert report["resized"] == [] and report["missing"] == ["head.bias", "head.weight"]
    _, report = load_pretrained_file(big, path)
    assert report["resized"] == ["absolute_pos_embed (1, 1024, 128)->(1, 4096, 128)"]


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_released_finetuned_checkpoint_loads_strict_for_eval(tmp_path):
    state = state_from_manifest("finetune_sen12flood_mixmim_base", seed=4)
    path = released_checkpoint(tmp_path / "sen12_like_checkpoint_best.pth", state, epoch=17)
    with torch.device("meta"):
        model = build_sen12_ft("mixmim_base", 2, img_size=128)
    ckpt, report = load_pretrained_file(model, path, keep_head=True)
    assert report["missing"] == [] and report["loaded"] == len(state)
    assert checkpoint_epoch(path, ckpt) == 18


def test_truncated_checkpoint_is_refused_clearly(tmp_path, pretrain_64):
    path = save_atomic({"model": pretrain_64, "epoch": 0}, tmp_path / "checkpoint.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_pretrained_file(ft(), path)


def test_hash_mismatch_names_both_hashes(tmp_path, pretrain_64):
    path = save_atomic({"model": pretrain_64, "epoch": 0}, tmp_path / "mine.pth")
    actual = sha256_of(path)
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"expected {wrong}, got {actual}"):
        load_pretrained_file(ft(), path, sha256=wrong)
    _, report = load_pretrained_file(ft(), path, sha256=actual)  # the right hash passes
    assert report["missing"] == ["head.bias", "head.weight"]


def test_checkpoint_epoch_from_name_or_stored_epoch():
    assert checkpoint_epoch("runs/benv2_pretrain_checkpoint_64.pth", {"epoch": 63}) == 64
    assert checkpoint_epoch("checkpoint_best.pth", {"epoch": 9}) == 10
    assert checkpoint_epoch("checkpoint.pth", {}) is None


def test_channels_of_another_order_are_refused(tmp_path, pretrain_64):
    """[VV, VH] into a [VH, VV] model has the same shapes: only the recorded channels can tell."""
    path = save_atomic({"model": pretrain_64, "epoch": 0, "args": {"channels": ["VH", "VV"]}}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth: trained on channels VH VV, but this run reads VV VH; "
                                              r"pass --channels VH VV"):
        load_pretrained_file(ft(), path, channels=("VV", "VH"))
    assert load_pretrained_file(ft(), path, channels=("VH", "VV"))[1]["missing"] == ["head.bias", "head.weight"]
    released = save_atomic({"model": pretrain_64, "epoch": 0, "args": argparse.Namespace(in_chans=2)},
                           tmp_path / "r.pth")  # no recorded channels: nothing to compare
    load_pretrained_file(ft(), released, channels=("VV", "VH"))
