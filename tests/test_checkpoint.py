"""util.checkpoint.save_linked: one write, then hard links (or copies) under the other names, each atomic."""
import os

import pytest
import torch

from util import misc
from util.checkpoint import load_checkpoint, save_atomic, save_linked


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
