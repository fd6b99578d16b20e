import argparse
import json

import pytest
import torch

import models_mixmim as M
import models_swin as S
from sarwmix.errors import ConfigError
from util.checkpoint import load_checkpoint, model_state, save_atomic
from util.masking import sample_mixing_mask


def tiny(**kw):
    torch.manual_seed(0)
    return M.mixmim_tiny(img_size=64, **kw).eval()


def test_forward_shapes_and_explicit_mask():
    m = tiny()
    x = torch.randn(4, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    loss, pred, out_mask, terms = m(x, mask=mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (4, 4, 32 * 32 * 2)
    assert torch.equal(out_mask, mask)
    assert list(terms) == ["pixel_loss"] and torch.equal(terms["pixel_loss"], loss.detach())


@pytest.mark.parametrize("bad", [torch.ones(4), torch.ones(2, 4), torch.ones(1, 16)])
def test_explicit_mask_of_wrong_shape_is_refused(bad):
    with pytest.raises(ValueError, match=r"expected \(1, 4\)"):
        tiny()(torch.randn(2, 2, 64, 64), mask=bad)


@pytest.mark.parametrize("ratio,extra", [(-0.25, 0.0), (0.0, 0.0), (1.5, 0.0), (0.5, -0.1), (0.8, 0.5)])
def test_mask_ratio_outside_unit_interval_is_refused(ratio, extra):
    with pytest.raises(ConfigError, match="mask_ratio"):
        M.mixmim_tiny(img_size=64, mask_ratio=ratio, range_mask_ratio=extra)


def test_in_chans_flows_to_the_decoder():
    m = M.mixmim_tiny(img_size=64, in_chans=1)
    loss, pred, _, _ = m(torch.randn(2, 1, 64, 64))
    assert pred.shape[-1] == 32 * 32 * 1 and torch.isfinite(loss)


def test_sampled_mask_count_and_seed():
    m = tiny()
    x = torch.randn(2, 2, 64, 64)
    a = m(x, generator=torch.Generator().manual_seed(5)).mask
    b = m(x, generator=torch.Generator().manual_seed(5)).mask
    assert torch.equal(a, b) and int(a.sum()) == 2


def test_isolation_between_mixed_images():
    """Changing image B's pixels does not change image A's encoder output at A's own cells."""
    m = tiny()
    x = torch.randn(4, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    y = x.clone()
    y[3] = torch.randn(2, 64, 64) * 3  # partner of image 0
    with torch.no_grad():
        za, zb = m.forward_encoder(x, mask), m.forward_encoder(y, mask)
    own = mask[0] == 0
    assert torch.allclose(za[0, own], zb[0, own], atol=1e-5)
    assert not torch.allclose(za[0, ~own], zb[0, ~own], atol=1e-3)  # B's cells inside A did change
    assert torch.allclose(za[1], zb[1], atol=1e-5)  # pair (1, 2) untouched


def test_no_masked_attention_leaks_without_mask_bias(monkeypatch):
    """Sanity of the isolation test: without the mixing bias the images do talk to each other."""
    m = tiny()
    x = torch.randn(4, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    y = x.clone()
    y[3] = torch.randn(2, 64, 64) * 3
    monkeypatch.setattr(S, "window_mixing_bias", lambda *a, **k: None)  # mixing without the attention mask
    tokens_only = [m.forward_encoder(v, mask) for v in (x, y)]
    own = mask[0] == 0
    assert not torch.allclose(tokens_only[0][0, own], tokens_only[1][0, own], atol=1e-4)


def test_loss_unmixes_both_branches():
    m = tiny(norm_pix_loss=False)
    x = torch.randn(4, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    target = M.patchify(x, 32)
    # branch 1 predicts each image, branch 2 predicts its partner: the unmixed reconstruction is exact
    perfect = torch.cat([target, target.flip(0)])
    loss, rec, terms = m.forward_loss(x, perfect, mask)
    assert loss.item() == 0.0 and torch.equal(rec, target) and terms == {"pixel_loss": loss}
    wrong = torch.cat([target, target])
    assert m.forward_loss(x, wrong, mask)[0] > 0


def test_unit_weights_equal_plain_loss_and_weights_matter():
    m = tiny()
    x = torch.randn(4, 2, 64, 64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        plain = m(x, mask=mask)[0]
        unit = m(x, weights=torch.ones_like(x), mask=mask)[0]
        double = m(x, weights=2 * torch.ones_like(x), mask=mask)[0]
    assert torch.allclose(plain, unit, rtol=1e-6)
    assert torch.allclose(double, 2 * plain, rtol=1e-5)


def test_norm_pix_target_uses_unbiased_variance():
    m = tiny(norm_pix_loss=True)
    x = torch.randn(2, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    t = M.patchify(x, 32)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    loss = m.forward_loss(x, torch.cat([t, t.flip(0)]), mask)[0]
    assert loss.item() < 1e-10


def test_every_parameter_gets_a_gradient():
    m = tiny().train()
    x = torch.randn(4, 2, 64, 64)
    loss = m(x, weights=torch.rand_like(x) + 1, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == []
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"absolute_pos_embed", "decoder_pos_embed"}


def _set_attn(model, impl):
    for mod in model.modules():
        if isinstance(mod, S.WindowAttention):
            mod.attn_impl = impl


@pytest.mark.parametrize("impl", ["sdpa", "auto"])
def test_attention_paths_match_plain_softmax_oracle(impl):
    """Loss and gradients of every attention path equal the plain softmax path (fp32, same mask)."""
    x = torch.randn(4, 2, 64, 64)
    w = torch.rand_like(x) + 1
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    results = []
    for path in ("math", impl):
        m = tiny().train()
        _set_attn(m, path)
        loss = m(x, weights=w, mask=mask)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-4)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-5), n


def test_relative_position_index_matches_swin():
    idx = S.relative_position_index(2)
    # (0,0)->(0,0) is the centre (1*3+1), (0,0)->(1,1) is offset (-1,-1) -> 0
    assert idx[0, 0] == 4 and idx[0, 3] == 0 and idx[3, 0] == 8
    assert S.relative_position_index(8).max() == 15 * 15 - 1


def test_window_partition_round_trip():
    x = torch.randn(2, 16, 16, 5)
    w = S.window_partition(x, 4)
    assert w.shape == (2, 16, 16, 5)
    assert torch.equal(S.window_reverse(w, 4, 16, 16), x)
    assert torch.equal(w[0, 1], x[0, 0:4, 4:8].reshape(16, 5))


@pytest.mark.parametrize("size", [100, 96, 192])
def test_invalid_input_size_lists_valid_sizes(size):
    with pytest.raises(ConfigError, match=r"valid sizes: \[.*128.*256"):
        M.mixmim_tiny(img_size=size)


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="mixmim_base"):
        M.build_mixmim("mixmim_gigantic")


@pytest.mark.parametrize("name", ["base", "large", "huge"])
def test_state_dict_matches_released_manifest(name, compat_dir):
    entries = json.loads((compat_dir / f"pretrain_mixmim_{name}.json").read_text())["entries"]
    with torch.device("meta"):
        model = getattr(M, f"mixmim_{name}")()
    got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    expected = {k: (shape, dtype) for k, shape, dtype in entries}
    assert got == expected


def test_released_format_checkpoint_loads_strict(tmp_path, compat_dir):
    """A checkpoint in the released layout (args = Namespace) loads with weights_only and strict=True."""
    entries = json.loads((compat_dir / "pretrain_mixmim_base.json").read_text())["entries"]
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 10, shape, generator=g) if dtype == "int64" else torch.randn(shape, generator=g))
          for k, shape, dtype in entries}
    path = save_atomic({"model": sd, "optimizer": {}, "epoch": 63, "scaler": None,
                        "args": argparse.Namespace(model="mixmim_base", input_size=128)},
                       tmp_path / "checkpoint_64.pth")
    ckpt = load_checkpoint(path)
    assert ckpt["args"].model == "mixmim_base"
    model = M.mixmim_base()
    model.load_state_dict(model_state(ckpt), strict=True)
    assert torch.equal(model.layers[2].blocks[5].attn.qkv.weight, sd["layers.2.blocks.5.attn.qkv.weight"])
    x = torch.randn(2, 2, 128, 128)
    with torch.no_grad():
        loss = model(x, mask=sample_mixing_mask(16, 0.5, generator=torch.Generator().manual_seed(0)))[0]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("decay_first", [True, False])
@pytest.mark.parametrize("exempt_names", [(), ("mask_token",)])
def test_optimizer_state_of_the_released_layout_is_matched_by_name(compat_dir, decay_first, exempt_names):
    """An AdamW state numbered in the manifest's registration order, in either group order and by either
    decay rule, is re-indexed so that every one of our parameters gets its own moments."""
    from util.lr_decay import param_groups, regroup_optimizer_state

    order = [k for k, _, _ in json.loads((compat_dir / "pretrain_mixmim_base.json").read_text())["entries"]]
    with torch.device("meta"):
        model = M.mixmim_base()
    params = dict(model.named_parameters())
    trainable = [k for k in order if k in params and params[k].requires_grad]
    exempt = [k for k in trainable if params[k].ndim <= 1 or k.endswith(".bias") or k in exempt_names]
    decay = [k for k in trainable if k not in exempt]
    parts = [(decay, 0.05), (exempt, 0.0)] if decay_first else [(exempt, 0.0), (decay, 0.05)]
    groups, state, start = [], {}, 0
    for names, wd in parts:
        groups.append({"weight_decay": wd, "lr": 1e-4, "params": list(range(start, start + len(names)))})
        state |= {start + i: {"exp_avg": torch.empty(params[n].shape, device="meta"), "tag": n}
                  for i, n in enumerate(names)}
        start += len(names)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05))
    regrouped = regroup_optimizer_state(optimizer, model, {"state": state, "param_groups": groups}, order)
    assert regrouped is not None
    name_of = {id(p): n for n, p in params.items()}
    ours = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert [regrouped["state"][i]["tag"] for i in range(len(ours))] == ours
    groups[0]["params"] = groups[0]["params"][:-1]  # a size no rule reproduces: refused, not guessed
    assert regroup_optimizer_state(optimizer, model, {"state": state, "param_groups": groups}, order) is None


def test_checkpoint_with_a_refused_object_is_not_called_corrupted(tmp_path):
    """weights_only refuses a numpy scalar: the message names its type instead of blaming a truncated file."""
    import numpy as np

    from sarwmix.errors import CheckpointError

    path = tmp_path / "checkpoint_64.pth"
    torch.save({"model": {}, "epoch": 63, "args": argparse.Namespace(best=np.float64(0.5))}, path)
    with pytest.raises(CheckpointError, match="numpy.*weights_only=True") as err:
        load_checkpoint(path)
    assert "corrupted" not in str(err.value)


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    from sarwmix.errors import CheckpointError

    (tmp_path / "notes.pth").write_text("hi\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "notes.pth")


def test_failed_save_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = save_atomic({"epoch": 0}, tmp_path / "checkpoint.pth")

    def disk_full(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"epoch": 1}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert load_checkpoint(path)["epoch"] == 0


def test_fused_adamw_matches_for_loop_adamw():
    """The optimiser the trainer builds (fused or foreach) takes the same steps as the plain for-loop AdamW.

    Both get the same seeded gradients each step, so only the optimiser implementations are compared.
    """
    from engine import adamw
    from util.lr_decay import param_groups

    models = [tiny().train(), tiny().train()]
    opts = [torch.optim.AdamW(param_groups(models[0], 0.05), lr=1e-3, betas=(0.9, 0.95), foreach=False),
            adamw(param_groups(models[1], 0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in models[0].named_parameters() if p.requires_grad}
        for m, opt in zip(models, opts):
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.grad = grads[n].clone()
            opt.step()
    p0, p1 = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    for n in p0:
        assert torch.allclose(p0[n], p1[n], rtol=1e-5, atol=1e-7), n
    assert not torch.equal(p0["patch_embed.proj.weight"], tiny().patch_embed.proj.weight)  # the steps moved it


@pytest.mark.manual
def test_compiled_model_matches_eager():
    """--compile (inductor) gives the eager loss and gradients from the same weights and mask (fp32)."""
    x = torch.randn(2, 2, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    eager = tiny().train()
    compiled_src = tiny().train()
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src)
    l0 = eager(x, mask=mask)[0]
    l0.backward()
    l1 = compiled(x, mask=mask)[0]
    l1.backward()
    assert torch.allclose(l0, l1, rtol=1e-4)
    g0 = dict(eager.named_parameters())
    for n, p in compiled_src.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, g0[n].grad, rtol=1e-3, atol=1e-5), n
