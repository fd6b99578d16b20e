"""The representation monitor of pretraining (--probe_every): logged keys and untouched training streams."""
import json

import pytest
import torch
from conftest import TINY_PRETRAIN

import main_pretrain
from util.checkpoint import load_checkpoint
from util.probe import PROBE_METRICS, ProbeMonitor, build_probe_sets

PROBE_KEYS = {f"probe_{k}" for k in PROBE_METRICS} | {"probe_seconds"}
SMALL = ["--vis_samples", "0", "--probe_samples", "16", "--probe_knn_k", "5"]


def _run(out, *extra):
    main_pretrain.main(main_pretrain.parse_args([*TINY_PRETRAIN, *SMALL, "--output_dir", str(out), *extra]))
    return [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]


def test_probe_logs_its_keys_and_leaves_the_weights_bit_identical(tmp_path):
    plain = _run(tmp_path / "plain")
    probed = _run(tmp_path / "probed", "--probe_every", "1")
    assert all(not PROBE_KEYS & r.keys() for r in plain)
    assert [PROBE_KEYS <= r.keys() for r in probed] == [True, True]
    assert all(0.0 <= r[f"probe_{k}"] <= 1.0 for r in probed for k in PROBE_METRICS)
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in probed]
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pth")["model"]
    b = load_checkpoint(tmp_path / "probed" / "checkpoint.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "probed")).Reload()
    assert {"probe/knn_mAP_macro", "probe/linear_mAP_micro", "probe/seconds"} <= set(events.Tags()["scalars"])


def test_probe_in_simmim_mode_probes_its_encoder(tmp_path):
    records = _run(tmp_path, "--mode", "simmim", "--epochs", "1", "--probe_every", "1")
    assert PROBE_KEYS <= records[0].keys()


def test_probe_every_n_epochs_and_the_last():
    monitor = ProbeMonitor(torch.nn.Identity(), None, None, [0.0], [1.0], every=2)
    assert [monitor.due(e, e == 4) for e in range(5)] == [False, True, False, True, True]
    assert not ProbeMonitor(torch.nn.Identity(), None, None, [0.0], [1.0], every=0).due(4, True)


def test_synthetic_probe_set_is_not_the_pretraining_data():
    from sarwmix.data.datasets import build_dataset

    train, test = build_probe_sets("synthetic", data_path=None, input_size=64, channels=("VH", "VV"), samples=16)
    assert len(train) == 12 and len(test) == 4 and train[0][0].shape == (2, 64, 64) and train[0][1].shape == (19,)
    pretrain = build_dataset("synthetic", data_path=None, split="train", input_size=64, num_samples=16)
    probe_x = torch.cat([train.tensors[0], test.tensors[0]])
    assert not any(torch.equal(pretrain[i][0], p) for i in range(16) for p in probe_x)


@pytest.mark.parametrize("flag, expected", [(["--probe_every", "-1"], "a non-negative integer"),
                                            (["--probe_samples", "4"], "an integer >= 8")])
def test_bad_probe_flags_are_refused(flag, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:  # counts, checked while the command line is parsed
        main_pretrain.parse_args([*TINY_PRETRAIN, *flag])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {flag[0]} {flag[1]}: expected {expected}\n"
