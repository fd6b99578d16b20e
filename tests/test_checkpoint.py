"""util.checkpoint: save_linked (one write, then hard links or copies under the other names, each atomic) and
checkpoint_args (the recorded settings of ours and of the released files)."""
import os

import pytest
import torch

from sarwmix.errors import CheckpointError
from util import checkpoint, files
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

    monkeypatch.setattr(files.os, "link", refuse)
    latest, numbered = tmp_path / "checkpoint.pth", tmp_path / "checkpoint_1.pth"
    save_linked(_state(3), latest, numbered)
    assert not os.path.samefile(latest, numbered) and latest.read_bytes() == numbered.read_bytes()
    assert load_checkpoint(numbered)["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_missing_source_raises_and_leaves_no_temporary(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.link_or_copy_atomic(tmp_path / "absent.pth", tmp_path / "alias.pth")
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


# --- messages about files that are no checkpoint -------------------------------------------------------

def _saved(tmp_path) -> bytes:
    save_atomic({"model": {"w": torch.randn(256, 256)}, "epoch": 3}, tmp_path / "full.pth")
    return (tmp_path / "full.pth").read_bytes()


@pytest.mark.parametrize("cut", [100, 5000, -10])
def test_a_truncated_checkpoint_is_one_whole_sentence(tmp_path, cut):
    """torch's own message stops mid-sentence when cut to a line; ours says what the file is and what to do."""
    bad = tmp_path / "checkpoint_3.pth"
    bad.write_bytes(_saved(tmp_path)[:cut])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    size = f"{bad.stat().st_size:,} bytes"
    assert message == (f"{bad}: not a readable torch checkpoint: the zip archive torch.save writes is truncated or "
                       f"corrupted ({size}); copy or download the file again")


@pytest.mark.parametrize("text", ["101\n", "hello world\n", '{"epoch": 3}\n'])
def test_a_text_file_is_named_as_one(tmp_path, text):
    bad = tmp_path / "notes.pth"
    bad.write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == (f"{bad}: not a readable torch checkpoint: a text file, not one written by "
                               f"torch.save ({len(text)} bytes starting {text.strip()!r})")


def test_an_empty_or_binary_file_is_named_as_such(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a readable torch checkpoint: the file is empty"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"not a file written by torch\.save \(1,024 bytes starting"):
        load_checkpoint(tmp_path / "noise.pth")


@pytest.mark.parametrize("digest", ["deadbeef", "g" * 64, "a" * 63, "a" * 65])
def test_a_malformed_sha256_is_refused_before_hashing(tmp_path, monkeypatch, digest):
    path = tmp_path / "full.pth"
    _saved(tmp_path)

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed the file before checking the digest")

    monkeypatch.setattr(checkpoint, "sha256_of", no_hashing)
    with pytest.raises(CheckpointError, match=f"{digest!r} is not a SHA-256: expected 64 hex digits"):
        load_checkpoint(path, sha256=digest)


def test_a_well_formed_sha256_is_checked(tmp_path):
    path = tmp_path / "full.pth"
    _saved(tmp_path)
    good = checkpoint.sha256_of(path)
    assert load_checkpoint(path, sha256=good.upper())["epoch"] == 3
    with pytest.raises(CheckpointError, match=f"SHA-256 mismatch: expected {'0' * 64}"):
        load_checkpoint(path, sha256="0" * 64)


def test_the_sha256_flag_is_refused_at_parse_time(capsys):
    import main_finetune

    with pytest.raises(SystemExit) as exit_info:
        main_finetune.parse_args(["--checkpoint_sha256", "deadbeef"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err == ("error: --checkpoint_sha256 'deadbeef' is not a SHA-256: expected 64 hex digits (as sha256sum "
                   "prints them)\n")
