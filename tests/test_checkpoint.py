"""util.checkpoint: save_linked (one write, then hard links or copies under the other names, each atomic) and
checkpoint_args (the recorded settings of ours and of the released files)."""
import os

import pytest
import torch

from sarwmix.errors import CheckpointError
from util import misc
from util.checkpoint import checkpoint_args, load_checkpoint, save_atomic, save_linked
from util.config import RunConfig


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((4,), float(epoch))}, "optimizer": {"state": {}, "param_groups": []},
            "epoch": epoch}


def test_aliases_are_hard_links_of_one_write(tmp_path):
    latest, numbered, best = tmp_path / "checkpoint.pth", tmp_path / "checkpoint_1.pth", tmp_path / "best.pth"
    save_linked(_state(0), latest, numbered, best)
    assert latest.stat().st_nlink == 3 and os.path.samefile(latest, numbered) and os.path.samefile(latest, best)
    assert load_checkpoint(numbered)["epoch"] == 0
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_overwriting_the_latest_leaves_the_numbered_one(tmp_path):
    """checkpoint.pth is replaced (a new file renamed over it), never written in place: its old links keep
    the old bytes."""
    latest, numbered = tmp_path / "checkpoint.pth", tmp_path / "checkpoint_1.pth"
    save_linked(_state(0), latest, numbered)
    save_atomic(_state(1), latest)
    assert load_checkpoint(numbered)["epoch"] == 0 and load_checkpoint(latest)["epoch"] == 1
    assert numbered.stat().st_nlink == 1 and latest.stat().st_nlink == 1
    save_linked(_state(2), latest, numbered)  # an existing alias is replaced too
    assert os.path.samefile(latest, numbered) and load_checkpoint(numbered)["epoch"] == 2


def test_copy_where_the_file_system_refuses_links(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(misc.os, "link", refuse)
    latest, numbered = tmp_path / "checkpoint.pth", tmp_path / "checkpoint_1.pth"
    save_linked(_state(3), latest, numbered)
    assert not os.path.samefile(latest, numbered) and latest.read_bytes() == numbered.read_bytes()
    assert load_checkpoint(numbered)["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_missing_source_raises_and_leaves_no_temporary(tmp_path):
    with pytest.raises(FileNotFoundError):
        misc.link_or_copy_atomic(tmp_path / "absent.pth", tmp_path / "alias.pth")
    assert list(tmp_path.iterdir()) == []


# --- checkpoint_args: the one reader of a checkpoint's recorded settings -----------------------------

def test_checkpoint_args_of_a_released_file(tmp_path):
    """Released files hold an argparse.Namespace (loaded with weights_only=True); the accessor types it."""
    from _finetune_helpers import released_checkpoint

    path = released_checkpoint(tmp_path / "sen12_like_checkpoint_best.pth", {"w": torch.zeros(2)}, epoch=17,
                               model="mixmim_base", input_size=512, in_chans=2, seed=0, finetune="",
                               val_fraction=0.1, blr=5e-4)
    stored = checkpoint_args(load_checkpoint(path))
    assert (stored.model, stored.input_size, stored.in_chans, stored.seed) == ("mixmim_base", 512, 2, 0)
    assert stored.val_fraction == 0.1 and stored.finetune is None  # "" = no pretraining file
    assert stored.channels is None and stored.pretrain_epoch is None and stored.train_fraction is None
    assert stored.pick(["blr", "absent"]) == {"blr": 5e-4} and "blr" in stored


def test_checkpoint_args_of_ours(tmp_path):
    """Ours hold the run's settled configuration as a plain dict: the same fields, read the same way."""
    config = RunConfig({"model": "mixmim_tiny", "input_size": 64, "channels": ["VH", "VV"], "seed": 3,
                        "val_fraction": 0.34, "train_fraction": 0.5, "finetune": "out/checkpoint.pth",
                        "pretrain_epoch": 4})
    path = save_atomic({"model": {"w": torch.zeros(2)}, "epoch": 0, "args": config.as_dict()}, tmp_path / "c.pth")
    raw = load_checkpoint(path)
    assert type(raw["args"]) is dict and raw["args"]["channels"] == ["VH", "VV"]  # the format stays a plain dict
    stored = checkpoint_args(raw)
    assert stored.channels == ("VH", "VV") and (stored.seed, stored.val_fraction) == (3, 0.34)
    assert (stored.train_fraction, stored.finetune, stored.pretrain_epoch) == (0.5, "out/checkpoint.pth", 4)
    assert stored.as_dict() == config.as_dict()
    assert checkpoint_args({"model": {}}).as_dict() == {}  # a bare state dict records nothing
    with pytest.raises(CheckpointError, match="'args' is a list"):
        checkpoint_args({"args": [1, 2]})


def test_ill_typed_recorded_fields_read_as_none():
    stored = checkpoint_args({"args": {"input_size": "big", "seed": True, "channels": [1, 2], "model": None}})
    assert (stored.input_size, stored.seed, stored.channels, stored.model) == (None, None, None, None)
