"""A checkpoint of another backbone than --model: the error names the checkpoint's model and the flag to pass,
for --finetune and for --eval, whether the checkpoint stores its arguments or not."""
from __future__ import annotations

import pytest
import torch
from _finetune_helpers import manifest

import backbones
import main_finetune
from models_mixmim_ft import build_mixmim_ft
from models_swin import ENCODER_CONFIGS
from models_vit import VIT_CONFIGS, build_vit
from modes import MODES
from sarwmix.constants import CHANNELS
from util.checkpoint import save_atomic
from util.config import run_cli

FAST = ["--num_workers", "0", "--no-progress", "--amp", "off", "--input_size", "64", "--num_samples", "4",
        "--batch_size", "2", "--num_eval_samples", "2", "--epochs", "1"]


def _meta_state(build) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build().state_dict()


@pytest.mark.parametrize("name", [n for n in ENCODER_CONFIGS if n not in ("mixmim_base", "mixmim_large",
                                                                              "mixmim_huge")])
def test_a_swin_is_told_from_its_shapes(name):
    assert backbones.model_of_state(_meta_state(lambda: build_mixmim_ft(name, 19, img_size=64))) == name
    mixmim = _meta_state(lambda: MODES["mixmim"].build(name, 64, 2))
    assert backbones.model_of_state(mixmim) == name  # decoder and mask token looked through
    simmim = _meta_state(lambda: MODES["simmim"].build(name, 64, 2))
    assert backbones.model_of_state(simmim) == name  # encoder.* keys


@pytest.mark.parametrize("name", ["pretrain_mixmim_base", "pretrain_mixmim_large", "pretrain_mixmim_huge",
                                  "finetune_ben19_mixmim_base", "finetune_sen12flood_mixmim_base"])
def test_the_released_layouts_are_told_from_their_shapes(name):
    state = {key: torch.empty(shape, device="meta") for key, shape, _ in manifest(name)}
    assert backbones.model_of_state(state) == "mixmim_" + name.rsplit("_", 1)[1]


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_a_vit_is_told_from_its_shapes(name):
    assert backbones.model_of_state(_meta_state(lambda: build_vit(name, img_size=64, num_classes=3))) == name


def test_a_state_of_no_known_backbone_is_none():
    assert backbones.model_of_state({"w": torch.zeros(2)}) is None
    state = _meta_state(lambda: build_mixmim_ft("mixmim_tiny", 19, img_size=64))
    state["patch_embed.proj.weight"] = torch.empty(50, 2, 4, 4, device="meta")
    assert backbones.model_of_state(state) is None


@pytest.fixture(scope="module")
def study_checkpoints(tmp_path_factory) -> dict[str, str]:
    """A finetuned mixmim_study (19 classes, 64 px): with stored args, and bare (a state dict only)."""
    folder = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    state = build_mixmim_ft("mixmim_study", 19, img_size=64).state_dict()
    args = {"model": "mixmim_study", "input_size": 64, "channels": list(CHANNELS)}
    save_atomic({"model": state, "epoch": 0, "args": args}, folder / "with_args.pth")
    save_atomic({"model": state}, folder / "bare.pth")
    return {"with_args": str(folder / "with_args.pth"), "bare": str(folder / "bare.pth")}


@pytest.mark.parametrize("kind, how", [("with_args", "its stored arguments"), ("bare", "the shapes of its tensors")])
@pytest.mark.parametrize("mode", ["finetune", "eval"])
def test_the_error_names_the_checkpoints_model_and_the_flag(study_checkpoints, tmp_path, capsys, kind, how, mode):
    path = study_checkpoints[kind]
    given = ["--finetune", path] if mode == "finetune" else ["--eval", "--resume", path]
    argv = [*FAST, "--model", "mixmim_tiny", *given, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_finetune.main, lambda: main_finetune.parse_args(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: a mixmim_study checkpoint (by {how}), but --model mixmim_tiny: "
                          f"wrong --model? pass --model mixmim_study (loading it into mixmim_tiny: "), err


def test_the_right_model_loads(study_checkpoints, tmp_path):
    argv = [*FAST, "--model", "mixmim_study", "--eval", "--resume", study_checkpoints["with_args"],
            "--output_dir", str(tmp_path / "out")]
    results = main_finetune.main(main_finetune.parse_args(argv))
    assert results["model"] == "mixmim_study" and "mAP_macro" in results["test"]
