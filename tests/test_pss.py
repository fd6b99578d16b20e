"""Patch Sampling Schedule: schedule values and resume, token selection, the ViT with dropped tokens, the
finetuning run with --pss (logs, resume), config errors, and the sweep / kept-patch scripts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import finetuning
import main_finetune
import main_pretrain
from backbones import build_simmim
from models_vit import VisionTransformer, build_vit
from sarwmix.errors import ConfigError
from util.checkpoint import load_checkpoint
from util.config import run_cli
from util.pretrained import load_pretrained
from util.pss import PatchSchedule, keep_count, select_tokens

REPO = Path(__file__).resolve().parents[1]

from analysis import image_patches, sweep_drop  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--num_workers", "0", "--no-progress", "--amp", "off"]


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{"img_size": 64, "patch_size": 16, "in_chans": 2, "embed_dim": 32, "depth": 2,
                                "num_heads": 2, "num_classes": 5, **kw})


# --- the schedule ------------------------------------------------------------------------------------

def test_linear_schedule_runs_from_min_at_the_first_to_max_at_the_last_update():
    s = PatchSchedule("linear", 0.2, 1.0, total_steps=11)
    values = [s.value(t) for t in range(11)]
    assert values[0] == 0.2 and values[-1] == 1.0 and values[5] == pytest.approx(0.6)
    assert all(b > a for a, b in zip(values, values[1:]))
    assert s.value(50) == 1.0  # past the end it stays at rho_max
    assert [PatchSchedule("none", 0.3, 0.9, 11).value(t) for t in (0, 5, 10)] == [1.0, 1.0, 1.0]


def test_cyclic_schedule_peaks_at_half_period_and_returns_to_min():
    s = PatchSchedule("cyclic", 0.2, 1.0, total_steps=100, period=8)
    assert s.value(0) == s.value(8) == s.value(16) == 0.2
    assert s.value(4) == s.value(12) == 1.0
    assert s.value(2) == pytest.approx(0.6) and s.value(6) == pytest.approx(0.6)
    assert max(s.value(t) for t in range(8)) == 1.0 and min(s.value(t) for t in range(8)) == 0.2
    stepped = [s.rho] + [s.step() for _ in range(8)]
    assert stepped == [s.value(t) for t in range(9)]
    # Default period: one epoch of updates (at least 2).
    assert PatchSchedule.from_run("cyclic", 0.2, 1.0, updates_per_epoch=25, epochs=4).period == 25
    assert PatchSchedule.from_run("cyclic", 0.2, 1.0, updates_per_epoch=1, epochs=4).period == 2
    assert PatchSchedule.from_run("linear", 0.2, 1.0, updates_per_epoch=25, epochs=4).total_steps == 100


def test_schedule_state_round_trip_and_mismatch_is_refused():
    a = PatchSchedule("cyclic", 0.2, 1.0, total_steps=40, period=10)
    for _ in range(13):
        a.step()
    b = PatchSchedule("cyclic", 0.2, 1.0, total_steps=40, period=10)
    b.load_state_dict(a.state_dict())
    assert b.t == 13 and [b.step() for _ in range(20)] == [a.step() for _ in range(20)]
    other = PatchSchedule("cyclic", 0.2, 1.0, total_steps=40, period=12)
    with pytest.raises(ConfigError, match="period: checkpoint 10, now 12"):
        other.load_state_dict(a.state_dict())
    for bad in ({"kind": "cosine"}, {"rho_min": 0.0}, {"rho_min": 0.8, "rho_max": 0.5}, {"period": 1}):
        with pytest.raises(ConfigError):
            PatchSchedule(**{"kind": "cyclic", "rho_min": 0.2, "rho_max": 1.0, "total_steps": 10, "period": 4,
                             **bad})


# --- token selection and the ViT ---------------------------------------------------------------------

@pytest.mark.parametrize("n, rho, k", [(64, 0.5, 32), (16, 0.3, 5), (10, 0.7, 7), (16, 0.2, 4), (49, 0.01, 1),
                                       (16, 1.0, 16)])
def test_keep_count_is_ceil_of_rho_n(n, rho, k):
    assert keep_count(n, rho) == k == max(1, math.ceil(round(rho * n, 9)))


def test_selected_tokens_are_exactly_the_largest_by_l2_norm():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 49, 8, generator=g) * torch.rand(3, 49, 1, generator=g)
    for rho in (0.1, 0.37, 0.5, 0.9):
        idx = select_tokens(tokens, rho)
        k = math.ceil(rho * 49)
        assert idx.shape == (3, k) and idx.dtype == torch.long
        assert torch.equal(idx, idx.sort(dim=1).values)  # row-major order kept
        norms = tokens.norm(dim=-1)
        for b in range(3):
            kept = set(idx[b].tolist())
            assert len(kept) == k
            assert norms[b, list(kept)].min() > max(norms[b, t] for t in range(49) if t not in kept)
    assert select_tokens(tokens, 1.0) is None


@pytest.mark.parametrize("pos", [{"abs_pos": False, "rel_pos": True}, {"abs_pos": True}])
def test_vit_keeps_the_largest_patch_embeddings_and_rho_one_is_the_plain_vit(pos):
    vit = small_vit(**pos).eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        plain = vit(x)
        assert torch.equal(vit(x, rho=1.0), plain)
        feats = vit.forward_features(x, rho=0.3)
        top = vit.embed(x).norm(dim=-1).topk(5, dim=1).indices.sort(dim=1).values
        assert feats.shape == (2, 5, 32)
        assert torch.equal(feats, vit.forward_features(x, keep_idx=top))
        assert not torch.allclose(vit(x, rho=0.3), plain)


def test_dropping_tokens_cuts_the_compute_and_still_trains_every_parameter():
    vit = small_vit(rel_pos=True)
    x = torch.randn(4, 2, 64, 64)

    def flops(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn().square().mean().backward()
        return counter.get_total_flops()

    # The patch embedding sees every patch (the ranking needs it); everything after it sees the kept ones.
    embed = flops(lambda: vit.embed(x))
    full, half = flops(lambda: vit(x, rho=1.0)), flops(lambda: vit(x, rho=0.5))
    assert 0.45 < (half - embed) / (full - embed) < 0.55
    vit.zero_grad()
    vit(x, rho=0.25).square().mean().backward()
    no_grad = [n for n, p in vit.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad


def test_bench_pss_counts_the_attention_of_a_vit_without_a_bias(monkeypatch):
    """Without a trainable bias, SDPA runs torch's CPU kernel, which FlopCounterMode alone counts as 0."""
    from benchmarks import bench_pss

    x = torch.randn(2, 2, 128, 128)  # 64 tokens of width 32: the attention matmuls are a third of a block

    def step_flops(**kw) -> float:
        vit = small_vit(img_size=128, **kw)
        return bench_pss.count_flops(lambda: vit(x).square().mean().backward())

    absolute, relative = step_flops(), step_flops(abs_pos=False, rel_pos=True)
    assert absolute == pytest.approx(relative, rel=0.05)


@pytest.mark.parametrize("name, resized", [("vit_tiny_rel", "blocks.0.rel_pos.table (49, 3)->(9, 3)"),
                                            ("vit_tiny", "pos_embed (1, 16, 192)->(1, 4, 192)")])
def test_simmim_vit_weights_load_into_a_finetune_vit_of_another_size(name, resized):
    torch.manual_seed(0)
    pre = build_simmim(name, img_size=64, in_chans=2)
    ft = build_vit(name, img_size=32, in_chans=2, num_classes=19)
    fresh = build_vit(name, img_size=32, in_chans=2).state_dict()
    report = load_pretrained(ft, pre.state_dict(), "simmim.pth")
    assert report["missing"] == ["head.bias", "head.weight"] and resized in report["resized"]
    assert torch.equal(ft.patch_embed.proj.weight, pre.encoder.patch_embed.proj.weight)
    if "pos_embed" in fresh:  # fixed sin-cos: the finetune grid's own table
        assert torch.equal(ft.pos_embed, fresh["pos_embed"])


# --- main_finetune with --pss ------------------------------------------------------------------------

def test_pss_with_a_swin_or_on_sen12flood_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_finetune.main, lambda: main_finetune.parse_args(["--pss", "cyclic", *FAST]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --pss cyclic drops patch tokens") and "vit_small_rel" in err
    for argv, match in ((["--model", "vit_tiny", "--dataset", "sen12flood", "--data_path", "x"], "takes mixmim_tiny"),
                        (["--eval_rho", "0.5"], "needs a ViT"),
                        (["--model", "vit_tiny", "--input_size", "72"], "multiple of the ViT patch size"),
                        (["--model", "vit_tiny", "--pss", "linear", "--pss_min", "0"], "pss_min"),
                        (["--model", "vit_tiny", "--pss", "cyclic", "--pss_period", "1"], "pss_period"),
                        (["--model", "vit_tiny", "--pss", "linear", "--pss_period", "8"], "would be ignored"),
                        (["--model", "vit_tiny", "--pss", "linear", "--compile"], "without --compile"),
                        (["--model", "vit_gigantic"], "unknown model 'vit_gigantic'; choices: mixmim_tiny")):
        with pytest.raises(ConfigError, match=match):
            finetuning.settle(main_finetune.parse_args(argv))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pss_args(out: Path, pretrained: Path, *extra: str) -> list[str]:
    """vit_tiny_rel at 64 px (16 tokens); 8 samples, batch 2 x accum 2: 2 updates of 2 iterations per epoch."""
    return [*FAST, "--model", "vit_tiny_rel", "--input_size", "64", "--finetune", str(pretrained),
            "--num_samples", "8", "--num_eval_samples", "4", "--batch_size", "2", "--accum_iter", "2",
            "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e-4", "--pss", "cyclic", "--pss_period", "4",
            "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def pss_run(tmp_path_factory) -> Path:
    """A SimMIM vit_tiny_rel pretraining (1 step), then 2 epochs of PSS finetuning from it."""
    root = tmp_path_factory.mktemp("pss")
    main_pretrain.main(main_pretrain.parse_args([
        *FAST, "--mode", "simmim", "--model", "vit_tiny_rel", "--input_size", "64", "--num_samples", "4",
        "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--vis_samples", "0",
        "--output_dir", str(root / "pre")]))
    main_finetune.main(main_finetune.parse_args(pss_args(root / "a", root / "pre" / "checkpoint_1.pth",
                                                         "--save_freq", "1")))
    return root


def test_pss_finetune_logs_rho_per_iteration_and_metrics_per_epoch(pss_run):
    out = pss_run / "a"
    steps = read_jsonl(out / "train_log.json")
    # Stepped once per update (2 iterations each): cyclic(0.2, 1.0, period 4) over 4 updates.
    assert [r["rho"] for r in steps] == pytest.approx([0.2, 0.2, 0.6, 0.6, 1.0, 1.0, 0.6, 0.6])
    assert [r["tokens_kept"] for r in steps] == [4, 4, 10, 10, 16, 16, 10, 10]
    assert all({"loss", "lr", "epoch", "iter"} <= set(r) for r in steps)
    val = read_jsonl(out / "val_log.json")
    assert [r["epoch"] for r in val] == [0, 1] and all("mAP_macro" in r and r["rho"] == 1.0 for r in val)
    epochs = read_jsonl(out / "log.txt")
    assert [r["val_mAP_macro"] for r in epochs] == [r["mAP_macro"] for r in val]
    assert {"checkpoint.pth", "checkpoint_1.pth", "checkpoint_2.pth", "checkpoint_best.pth"} <= {
        p.name for p in out.iterdir()}
    assert load_checkpoint(out / "checkpoint.pth")["extra"]["pss"]["t"] == 4
    results = json.loads((out / "results.json").read_text())
    assert (results["model"], results["pss"], results["eval_rho"], results["pretrain_epoch"]) == (
        "vit_tiny_rel", "cyclic", 1.0, 1)


def test_pss_resume_continues_the_schedule_exactly(pss_run, tmp_path):
    a = pss_run / "a"
    main_finetune.main(main_finetune.parse_args(pss_args(
        tmp_path / "b", pss_run / "pre" / "checkpoint_1.pth", "--resume", str(a / "checkpoint_1.pth"))))
    resumed = read_jsonl(tmp_path / "b" / "train_log.json")
    full = [r for r in read_jsonl(a / "train_log.json") if r["epoch"] == 1]
    assert [(r["iter"], r["rho"], r["loss"]) for r in resumed] == [(r["iter"], r["rho"], r["loss"]) for r in full]
    ref, got = (load_checkpoint(d / "checkpoint.pth") for d in (a, tmp_path / "b"))
    assert got["extra"]["pss"] == ref["extra"]["pss"]
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    with pytest.raises(ConfigError, match="period: checkpoint 4, now 6"):
        main_finetune.main(main_finetune.parse_args(pss_args(
            tmp_path / "c", pss_run / "pre" / "checkpoint_1.pth", "--resume", str(a / "checkpoint_1.pth"),
            "--pss_period", "6")))


def test_sweep_drop_writes_the_dynamic_inference_curve(pss_run, tmp_path, capsys):
    ckpt = pss_run / "a" / "checkpoint_best.pth"
    argv = [str(ckpt), "--rho", "1.0", "0.3", "0.5", "--bench_batch", "2", "--bench_reps", "1",
            "--out", str(tmp_path)]
    assert sweep_drop.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "sweep_drop.csv")
    assert table["rho"].tolist() == [0.3, 0.5, 1.0] and table["tokens_kept"].tolist() == [5, 8, 16]
    assert {"mAP_macro", "mAP_micro", "img_per_s", "speedup"} <= set(table.columns)
    assert (table["img_per_s"] > 0).all() and table["speedup"].iloc[-1] == 1.0
    assert (table["speedup_low"] <= table["speedup"]).all() and (table["speedup"] <= table["speedup_high"]).all()
    # rho = 1 on the val split reproduces the validation score the checkpoint was selected with.
    best = load_checkpoint(ckpt)
    assert table["mAP_macro"].iloc[-1] == pytest.approx(best["best"], rel=1e-6)
    assert (tmp_path / "sweep_drop.png").read_bytes().startswith(PNG_SIGNATURE)
    assert sweep_drop.main([str(ckpt), "--rho", "0", "--out", str(tmp_path)]) == 2


def test_image_patches_lists_the_kept_patches(pss_run, tmp_path):
    ckpt = pss_run / "a" / "checkpoint_best.pth"
    assert image_patches.main([str(ckpt), "--rho", "0.25", "--n", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "image_patches.json").read_text())
    assert (record["grid"], record["tokens_total"], record["tokens_kept"], record["rho"]) == (4, 16, 4, 0.25)
    assert [s["index"] for s in record["samples"]] == [0, 1, 2]
    for s in record["samples"]:
        top = sorted(range(16), key=lambda t: -s["scores"][t])[:4]
        assert s["kept"] == sorted(top)
    assert (tmp_path / "image_patches.png").read_bytes().startswith(PNG_SIGNATURE)
