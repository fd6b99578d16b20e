"""YAML configs and ``--override KEY=VALUE``: every shipped config parses, types, unknown keys, precedence."""
import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import backbones
import main_pretrain
from modes import MODES
from sarwmix.errors import ConfigError
from util import runner
from util.config import RunConfig, plain_dict

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PRETRAIN = [p for p in CONFIGS if p.name.startswith("pretrain_")]
FINETUNE = [p for p in CONFIGS if p.name.startswith("finetune_")]


def parse(*argv: str) -> argparse.Namespace:
    return main_pretrain.parse_args(list(argv))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_every_config_is_a_pretrain_or_finetune_file():
    assert PRETRAIN and FINETUNE
    assert set(CONFIGS) == set(PRETRAIN) | set(FINETUNE)


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_configs_parse_and_validate(path):
    args = parse("--config", str(path), "--data_path", "/data")
    MODES[args.mode].check_model(args)  # backbone and input size, then the common flags, as a run checks them
    runner.validate_common(args)
    for key, value in yaml.safe_load(path.read_text()).items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_finetune_configs_parse_and_validate(path):
    main_finetune = pytest.importorskip("main_finetune")
    args = main_finetune.parse_args(["--config", str(path), "--data_path", "/data"])
    pytest.importorskip("finetuning").settle(args)
    backbones.check_args(args)
    runner.validate_common(args)
    for key, value in yaml.safe_load(path.read_text()).items():
        assert getattr(args, key) == value, key
    assert (args.blr, args.warmup_epochs, args.epochs) == (5e-4, 5, 50)
    assert (args.layer_decay, args.drop_path, args.weight_decay) == (0.7, 0.1, 0.05)
    if args.task == "ben":  # SEN12-FLOOD counts pairs of 2 x 16 tiles: no released batch size
        assert (args.batch_size, args.label_set) == (128, 19)


def test_seed_simmim_config_has_the_guides_values():
    a = parse("--config", str(REPO / "configs/pretrain_simmim_swinv2_tiny_w8.yaml"))
    assert (a.mode, a.model, a.channels) == ("simmim", "swinv2_tiny_w8", ["VV"])
    assert (a.mask_ratio, a.input_size) == (0.6, 256)
    assert (a.batch_size, a.epochs, a.lr, a.mask_patch_size) == (128, 300, 1e-3, 32)


@pytest.mark.parametrize("size", ["base", "large", "huge"])
@pytest.mark.parametrize("data", ["benv1", "benv2"])
def test_released_recipes(data, size):
    a = parse("--config", str(REPO / f"configs/pretrain_{data}_{size}.yaml"))
    assert (a.model, a.dataset, a.mode) == (f"mixmim_{size}", data, "mixmim")
    assert (a.batch_size, a.blr, a.warmup_epochs, a.epochs, a.stop_epoch) == (256, 1.5e-4, 40, 1024, 64)
    assert (a.mask_ratio, a.weighting, a.norm_pix_loss, a.input_size) == (0.5, "per_channel", True, 128)


def test_mask_ratio_default_depends_on_mode(tmp_path):
    assert parse().mask_ratio == 0.5
    assert parse("--mode", "simmim").mask_ratio == 0.6
    assert parse("--mode", "simmim", "--mask_ratio", "0.5").mask_ratio == 0.5
    assert parse("--override", "mode=simmim").mask_ratio == 0.6
    assert parse("--config", write(tmp_path, "mode: simmim\nmask_ratio: 0.7\n")).mask_ratio == 0.7


@pytest.mark.parametrize("item,attr,value", [
    ("MODEL.BACKBONE=swinv2_tiny_w16", "model", "swinv2_tiny_w16"),
    ("model.backbone=swin_tiny", "model", "swin_tiny"),  # dotted keys are case-insensitive
    ("MODEL.MASK_RATIO=0.75", "mask_ratio", 0.75),
    ("DATA.IMG_SIZE=192", "input_size", 192),
    ("DATA.TRAIN_DATA=/data/pretrain/unlabeled", "data_path", "/data/pretrain/unlabeled"),
    ("TRAIN.BATCH_SIZE=256", "batch_size", 256),
    ("TRAIN.EPOCHS=100", "epochs", 100),
    ("TRAIN.LR=1e-3", "lr", 1e-3),  # YAML 1.1 reads 1e-3 as a string: converted by the flag's type
    ("TRAIN.LR=0.001", "lr", 0.001),
    ("TRAIN.CLIP_GRAD=null", "clip_grad", None),
    ("MODEL.IN_CHANS=1", "channels", ["VV"]),
    ("MODEL.IN_CHANS=2", "channels", ["VH", "VV"]),
    ("DATA.CHANNELS=VH,VV", "channels", ["VH", "VV"]),
    ("DATA.CHANNELS=[VV]", "channels", ["VV"]),
    ("epochs=7", "epochs", 7),  # plain flag names work too
    ("norm_pix_loss=false", "norm_pix_loss", False),
    ("MODEL.NORM_PIX_LOSS=no", "norm_pix_loss", False),
    ("MODEL.LOSS=mse", "loss", "mse"),
])
def test_override_values_are_typed(item, attr, value):
    args = parse("--override", item)
    assert getattr(args, attr) == value and type(getattr(args, attr)) is type(value)


@pytest.mark.parametrize("item,message", [
    ("TRAIN.EPOCH=3", "unknown key 'TRAIN.EPOCH'; did you mean 'TRAIN.EPOCHS'"),
    ("MODEL.BACKBON=swin_tiny", "did you mean 'MODEL.BACKBONE'"),
    ("epoch=3", "unknown key 'epoch'; did you mean 'epochs'"),
    ("TRAIN.EPOCHS=abc", "TRAIN.EPOCHS: bad value for 'epochs'"),
    ("TRAIN.BATCH_SIZE=1.5", "bad value for 'batch_size'"),
    ("TRAIN.BATCH_SIZE=true", "bad value for 'batch_size'"),
    ("TRAIN.LR=fast", "bad value for 'lr'"),
    ("MODEL.IN_CHANS=3", "expected 1 (VV) or 2 (VH VV)"),
    ("MODEL.IN_CHANS=two", "expected an integer"),
    ("MODEL.LOSS=l2", "is not one of ['l1', 'mse']"),
    ("norm_pix_loss=maybe", "expected a boolean"),
    ("MODEL.DROP_PATH=0.1", "maps to --drop_path, which 'SAR-W-MixMAE pretraining' does not take"),
    ("TRAIN.EPOCHS", "expected KEY=VALUE"),
])
def test_override_errors_name_the_key(item, message):
    with pytest.raises(ConfigError) as e:
        parse("--override", item)
    assert message in str(e.value)


def test_precedence_defaults_config_override_flags(tmp_path):
    cfg = write(tmp_path, "epochs: 300\nbatch_size: 128\nmodel: swinv2_tiny_w8\nmode: simmim\n")
    assert parse().epochs == 4  # parser default of main_pretrain
    a = parse("--config", cfg)
    assert (a.epochs, a.batch_size, a.model) == (300, 128, "swinv2_tiny_w8")
    a = parse("--config", cfg, "--override", "TRAIN.EPOCHS=5", "MODEL.BACKBONE=swin_tiny")
    assert (a.epochs, a.batch_size, a.model) == (5, 128, "swin_tiny")
    for argv in (["--epochs", "7", "--config", cfg, "--override", "TRAIN.EPOCHS=5"],
                 ["--config", cfg, "--override", "TRAIN.EPOCHS=5", "--epochs=7"]):
        assert parse(*argv).epochs == 7  # an explicit flag wins wherever it stands
    a = parse("--override", "TRAIN.EPOCHS=5", "epochs=6")
    assert a.epochs == 6  # the later override of the same flag wins


def test_unknown_config_key_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'mask_ration'; did you mean 'mask_ratio'"):
        parse("--config", write(tmp_path, "mask_ration: 0.6\n"))
    with pytest.raises(ConfigError, match="bad value for 'epochs'"):
        parse("--config", write(tmp_path, "epochs: many\n"))


def test_every_dotted_key_maps_onto_a_real_flag():
    flags = {a.dest for a in main_pretrain.get_args_parser()._actions}
    try:
        import main_finetune

        flags |= {a.dest for a in main_finetune.get_args_parser()._actions}
    except ImportError:
        pass
    assert set(runner.DOTTED_KEYS.values()) - flags <= {"in_chans"}
    assert {"MODEL.BACKBONE", "MODEL.IN_CHANS", "MODEL.MASK_RATIO", "DATA.IMG_SIZE", "DATA.TRAIN_DATA",
            "TRAIN.BATCH_SIZE", "TRAIN.EPOCHS", "TRAIN.LR"} <= set(runner.DOTTED_KEYS)


def test_yaml_booleans_for_on_off_flags(tmp_path):
    a = parse("--config", write(tmp_path, "norm_pix_loss: false\npin_mem: 'no'\n"))
    assert (a.norm_pix_loss, a.pin_mem) == (False, False)
    assert parse("--config", write(tmp_path, "norm_pix_loss: true\n")).norm_pix_loss is True
    assert parse("--config", write(tmp_path, "norm_pix_loss: false\n"), "--norm_pix_loss").norm_pix_loss is True


def test_help_states_the_defaults(capsys):
    import main_finetune
    import main_pretrain

    for module, expected in ((main_pretrain, ("(default: 192)", "(default: 0.0)", "(default: synthetic)")),
                             (main_finetune, ("(default: 64)", "(default: ./output_finetune)"))):
        text = module.get_args_parser().format_help()
        assert all(e in text for e in expected), (module.__name__, [e for e in expected if e not in text])
        assert "(default: None)" not in text and "(default: False)" not in text


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode, argv, absent, present", [
    ("mixmim", ["--model", "mixmim_tiny", "--input_size", "64"], {"loss", "mask_patch_size"},
     {"range_mask_ratio", "norm_pix_loss"}),
    ("simmim", ["--model", "swinv2_tiny_w8", "--input_size", "128"], {"range_mask_ratio", "norm_pix_loss"},
     {"loss", "mask_patch_size"}),
])
def test_config_yaml_holds_only_the_flags_of_the_run_mode(tmp_path, monkeypatch, mode, argv, absent, present):
    """config.yaml of a MixMIM run does not say ``loss: l1`` (a SimMIM flag), nor SimMIM's the MixMIM ones."""
    def stop(*_args, **_kwargs):
        raise _Stop

    monkeypatch.setattr(runner, "build_train_data", stop)  # config.yaml is written before the data is built
    args = main_pretrain.parse_args(["--mode", mode, *argv, "--output_dir", str(tmp_path)])
    with pytest.raises(_Stop):
        main_pretrain.main(args)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["mode"] == mode and not absent & written.keys() and present <= written.keys()


# --- the settled, read-only run configuration -------------------------------------------------------

def test_run_config_is_a_read_only_view_of_the_settled_flags():
    args = parse("--channels", "VH", "VV", "--seed", "3")
    config = RunConfig.freeze(args)
    assert config.seed == 3 and config.channels == ("VH", "VV") and getattr(config, "absent", None) is None
    assert config.as_dict() == plain_dict(args) and config.as_dict()["channels"] == ["VH", "VV"]
    for change in (lambda: setattr(config, "seed", 4), lambda: delattr(config, "seed")):
        with pytest.raises(AttributeError, match="settled: 'seed'"):
            change()
    with pytest.raises(TypeError):
        config._values["seed"] = 4  # not even through the mapping behind it
    args.seed = 5  # the parsed flags are not the run's any more
    assert config.seed == 3


@pytest.mark.parametrize("released", [False, True], ids=["ours", "released-format"])
def test_eval_config_yaml_is_the_configuration_the_run_used(tmp_path, monkeypatch, released):
    """--eval of SEN12-FLOOD without val/ adopts the evaluated run's hold-out (seed, val_fraction) before
    config.yaml is written; the run reads that settled configuration, which equals the file."""
    import torch

    main_finetune = pytest.importorskip("main_finetune")
    stored = {"seed": 0, "val_fraction": 0.34, "channels": ["VH", "VV"]}
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save({"model": {}, "epoch": 3, "args": argparse.Namespace(**stored) if released else stored}, ckpt)
    used = {}

    def capture(config, task, world_size):
        used["config"] = config
        raise _Stop

    finetuning = pytest.importorskip("finetuning")
    monkeypatch.setattr(finetuning, "build_splits", capture)  # the first use of the settled configuration
    args = main_finetune.parse_args(["--eval", "--resume", str(ckpt), "--dataset", "sen12flood", "--data_path",
                                     str(tmp_path / "pairs"), "--seed", "5", "--val_fraction", "0.6",
                                     "--output_dir", str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    with pytest.raises(_Stop):
        main_finetune.main(args)
    config = used["config"]
    assert isinstance(config, RunConfig) and (config.seed, config.val_fraction) == (0, 0.34)
    assert yaml.safe_load((tmp_path / "ev" / "config.yaml").read_text()) == config.as_dict()
    with pytest.raises(AttributeError, match="settled"):
        config.seed = 5


def test_a_process_that_aborts_in_a_library_writes_its_python_stacks_first():
    """run_cli enables faulthandler: an abort inside C++ code (here os.abort) leaves the Python stack in the log."""
    code = ("import os; from util.config import run_cli\n"
            "def main(args):\n    os.abort()\n"
            "run_cli(main, lambda: None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"})
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in proc.stderr and 'line 3 in main' in proc.stderr, proc.stderr


@pytest.mark.parametrize("ranked", [False, True])
def test_a_rank_ends_without_the_interpreter_finalisation(ranked):
    """end_process: a rank whose process group was destroyed leaves by os._exit with its code, its logs and
    streams flushed; any other process exits as usual (atexit handlers run)."""
    code = ("import atexit, logging, sys; from util import distributed\n"
            f"distributed._ENDED_GROUP = {ranked}\n"
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged')\n"
            "atexit.register(lambda: print('finalised'))\n"
            "print('printed', end='')\n"
            "distributed.end_process(75)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75 and "logged" in proc.stderr and proc.stdout.startswith("printed")
    assert ("finalised" in proc.stdout) is not ranked
