"""modes: the table of pretraining modes, what each mode answers, and a mode added in a test pretraining through
the real entry point (parse, checks, the shared loop, checkpoints, logs)."""
import json

import pytest
import torch
import yaml
from torch import nn

import main_pretrain
import pretraining
from models_mixmim import PretrainOutput
from modes import MODES, PretrainMode, get_mode
from sarwmix.errors import ConfigError


class ToyMIM(nn.Module):
    """A toy masked model: hides random pixels, predicts them with a 3x3 convolution of the visible image.

    Its loss has two terms, the masked squared error (``pixel_loss``) and ``smooth_weight`` times the mean
    horizontal step of the prediction (``smooth_loss``); its forward returns them with the total.
    """

    def __init__(self, in_chans: int, mask_ratio: float, smooth_weight: float) -> None:
        super().__init__()
        self.mask_ratio, self.smooth_weight = mask_ratio, smooth_weight
        self.encoder = nn.Conv2d(in_chans, in_chans, 3, padding=1)

    def forward(self, x, weights=None, mask=None, generator=None) -> PretrainOutput:
        if mask is None:
            mask = (torch.rand(x.shape[0], 1, *x.shape[-2:], generator=generator) < self.mask_ratio).to(x)
        pred = self.encoder(x * (1 - mask))
        err = (pred - x) ** 2 * mask * (weights if weights is not None else 1.0)
        pixel = err.sum() / mask.sum().clamp_min(1) / x.shape[1]
        smooth = (pred[..., 1:] - pred[..., :-1]).abs().mean()
        return PretrainOutput(pixel + self.smooth_weight * smooth, pred, mask,
                              {"pixel_loss": pixel.detach(), "smooth_loss": smooth.detach()})


def toy_model(name: str, img_size: int, in_chans: int, mask_ratio: float = 0.25,
              smooth_weight: float = 0.5) -> ToyMIM:
    return ToyMIM(in_chans, mask_ratio, smooth_weight)


TOY = PretrainMode(name="toy", title="Toy", build=toy_model, options=lambda config: {}, flags=(),
                   mask_ratio=0.25, check_model=lambda config: None, token_size=lambda config, model: 8)


@pytest.fixture
def toy(monkeypatch) -> PretrainMode:
    monkeypatch.setitem(MODES, TOY.name, TOY)
    return TOY


def test_the_two_modes_answer_what_the_run_reads():
    mixmim, simmim = get_mode("mixmim"), get_mode("simmim")
    assert list(MODES) == ["mixmim", "simmim"] and get_mode(simmim) is simmim
    assert (mixmim.mask_ratio, simmim.mask_ratio) == (0.5, 0.6)
    assert mixmim.other_flags() == ["mask_patch_size", "loss"]
    assert simmim.other_flags() == ["range_mask_ratio", "norm_pix_loss", "spectral_weight", "spectral_bins"]
    assert (mixmim.exports_backbone, simmim.exports_backbone) == (False, True)
    assert pretraining.parse_args([]).mask_ratio == 0.5
    assert pretraining.parse_args(["--mode", "simmim"]).mask_ratio == 0.6
    assert pretraining.parse_args(["--mode", "simmim", "--mask_ratio", "0.3"]).mask_ratio == 0.3
    with pytest.raises(ConfigError, match="pretraining mode 'mae': expected one of mixmim, simmim"):
        get_mode("mae")


@pytest.mark.parametrize("mode,token", [("mixmim", 32), ("simmim", 16)])  # MixMIM: its target patch
def test_a_mode_builds_its_model_from_the_flags_and_names_its_token_cell_and_probe_encoder(mode, token):
    config = pretraining.parse_args(["--mode", mode, "--model", "mixmim_tiny", "--input_size", "64",
                                     "--mask_patch_size", "16", "--channels", "VV"])
    m = get_mode(mode)
    m.check_model(config)
    model = m.model(config)
    assert model.mask_ratio == m.mask_ratio and model.in_chans == 1
    assert m.token_size(config, model) == token
    assert hasattr(m.probe_encoder(model), "forward_features")


def test_simmim_refuses_the_spectral_target_at_parse_time():
    with pytest.raises(ConfigError, match="--spectral_weight 2.0 with --mode simmim: the spectral target is MixMIM's"):
        pretraining.parse_args(["--mode", "simmim", "--spectral_weight", "2"])
    assert pretraining.parse_args(["--spectral_weight", "2"]).spectral_weight == 2.0


def test_a_mode_added_in_a_test_pretrains_through_the_entry_point(toy, tmp_path):
    """One entry in the table: --mode takes it, the run builds its model, logs each of its loss terms, leaves
    the flags of the other modes out of config.yaml and saves its state."""
    args = main_pretrain.parse_args(["--mode", "toy", "--model", "mixmim_study", "--input_size", "32",
                                     "--num_samples", "8", "--batch_size", "4", "--epochs", "1", "--num_workers",
                                     "0", "--no-progress", "--vis_samples", "0", "--output_dir", str(tmp_path)])
    assert args.mask_ratio == 0.25  # the mode's default
    record = main_pretrain.main(args)
    assert record["epoch"] == 0 and record["train_pixel_loss"] > 0 and record["train_smooth_loss"] > 0
    logged = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert {"train_loss", "train_pixel_loss", "train_smooth_loss", "train_weight_mean"} <= set(logged)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["mode"] == "toy" and not {*MODES["mixmim"].flags, *MODES["simmim"].flags} & set(config)
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert set(saved["model"]) == {"encoder.weight", "encoder.bias"} and saved["args"]["mode"] == "toy"
