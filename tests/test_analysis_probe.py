"""python -m analysis.probe: encoders of every kind of checkpoint, the random-init and hand-crafted rows."""
import json

import pandas as pd
import pytest
import torch

import pretraining
from analysis import probe as P
from backbones import export_checkpoint
from modes import MODES
from sarwmix.errors import SarwmixError
from util.config import plain_dict

TINY = ["--model", "mixmim_tiny", "--input_size", "64"]
STATS = {"name": "benv1", "mean": [-19.2309, -12.5951], "std": [3.2, 2.9]}


def _pretrain_checkpoint(tmp_path, *extra):
    args = pretraining.parse_args([*TINY, *extra])
    torch.manual_seed(3)
    model = MODES[args.mode].model(args)
    path = tmp_path / f"checkpoint_{args.mode}.pth"
    torch.save({"model": model.state_dict(), "args": plain_dict(args), "epoch": 0, "stats": STATS}, path)
    return model, path


@pytest.mark.parametrize("mode", ["mixmim", "simmim"])
def test_checkpoint_encoder_carries_the_trained_weights(tmp_path, mode):
    model, path = _pretrain_checkpoint(tmp_path, "--mode", mode)
    enc, size, chans = P.checkpoint_encoder(path, None, None, None)
    assert size == 64 and chans == ("VH", "VV")
    x = torch.randn(2, 2, 64, 64)
    source = MODES[mode].probe_encoder(model)
    with torch.no_grad():
        assert torch.allclose(enc.eval().forward_features(x), source.eval().forward_features(x), atol=1e-5)
    if MODES[mode].exports_backbone:  # the exported backbone (a plain state dict) loads the same, given the model
        exported = export_checkpoint(path, tmp_path / "backbone.pth")[0]
        with pytest.raises(SarwmixError, match="--model"):
            P.checkpoint_encoder(exported, None, None, None)
        enc2, _, _ = P.checkpoint_encoder(exported, "mixmim_tiny", 64, None)
        with torch.no_grad():
            assert torch.equal(enc2.eval().forward_features(x), enc.forward_features(x))


def test_finetuned_checkpoint_drops_its_head(tmp_path):
    from models_mixmim_ft import build_mixmim_ft

    ft = build_mixmim_ft("mixmim_tiny", num_classes=19, img_size=64, in_chans=2)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": ft.state_dict(), "args": {"model": "mixmim_tiny", "input_size": 64,
                                                   "channels": ["VH", "VV"]}}, path)
    enc, _, _ = P.checkpoint_encoder(path, None, None, None)
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc.eval().forward_features(x), ft.eval().forward_features(x), atol=1e-5)


def test_cli_rows_for_checkpoint_random_init_and_handcrafted(tmp_path, capsys):
    _, path = _pretrain_checkpoint(tmp_path)
    out = tmp_path / "out"
    argv = [str(path), "--random_init", "mixmim_tiny", "--handcrafted", "--input_size", "64", "--samples", "16",
            "--knn_k", "3", "--out", str(out)]
    assert P.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"wrote {out / 'probe.csv'}", f"wrote {out / 'probe.json'}"]  # where the files are
    table = pd.read_csv(out / "probe.csv")
    assert list(table.columns) == list(P.COLUMNS)
    assert set(table["checkpoint"]) == {str(path), "random_init:mixmim_tiny", "handcrafted"}
    assert len(table) == 3 * 4 and table["value"].between(0, 1).all()
    assert set(table["protocol"]) == {"knn", "linear"} and set(table["metric"]) == {"mAP_macro", "mAP_micro"}
    assert len(json.loads((out / "probe.json").read_text())["rows"]) == 12
    assert P.main(["--out", str(out)]) == 2  # nothing to probe
