"""The reconstruction figure: its pure parts (composite, hidden cells, dB, caption) and the PNG of MixMIM and
SimMIM runs with one and two channels."""
from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch

from engine_pretrain import save_reconstructions
from modes import MODES
from sarwmix.data.synthetic import SyntheticS1
from util.augment import normalize
from util.visualize import (
    NORM_PIX_NOTE,
    compose_visible,
    hide_masked,
    reconstruction_caption,
    reconstruction_panels,
    to_db,
    weight_range,
)


def cell_mask(batch: int, size: int = 8, cell: int = 4, seed: int = 0) -> torch.Tensor:
    """(batch, 1, size, size) random 0/1 mask constant on cell x cell squares, with both values present."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(batch, 1, size // cell, size // cell, generator=g) < 0.5
    cells[:, :, 0, 0], cells[:, :, -1, -1] = True, False
    return cells.float().repeat_interleave(cell, 2).repeat_interleave(cell, 3)


@pytest.mark.parametrize("batch_of_mask", [3, 1])  # SimMIM: one mask per sample; MixMIM: one for the batch
def test_composite_is_the_input_on_visible_and_the_prediction_on_masked_pixels(batch_of_mask: int) -> None:
    image, prediction = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    mask = cell_mask(batch_of_mask)
    out = compose_visible(image, prediction, mask)
    hidden = mask.bool().expand_as(image)
    assert out.shape == image.shape
    assert torch.equal(out[hidden], prediction[hidden]) and torch.equal(out[~hidden], image[~hidden])
    assert torch.equal(compose_visible(image, prediction, torch.zeros(1, 1, 8, 8)), image)
    assert torch.equal(compose_visible(image, prediction, torch.ones(1, 1, 8, 8)), prediction)


def test_hidden_pixels_are_nan_and_the_others_kept() -> None:
    image, mask = torch.randn(2, 2, 8, 8), cell_mask(2)
    out = hide_masked(image, mask)
    hidden = mask.bool().expand_as(image)
    assert out[hidden].isnan().all() and torch.equal(out[~hidden], image[~hidden])


def test_panels_are_in_db_and_composed_from_the_prediction() -> None:
    mean, std = [-19.0, -12.5], [3.0, 2.5]
    sar_db = torch.randn(2, 2, 8, 8) * 3 - 15
    x = normalize(sar_db, torch.tensor(mean), torch.tensor(std))
    pred, mask = torch.randn(2, 2, 8, 8), cell_mask(1)
    torch.testing.assert_close(to_db(x, mean, std), sar_db)
    panels, got_mask, kind = reconstruction_panels(
        {"input": x, "mixed input": x.flip(0), "prediction": pred, "mask": mask}, sar_db, mean, std)
    assert kind == "MixMIM" and torch.equal(got_mask, mask)
    assert list(panels) == ["input", "mixed input", "prediction", "visible input + prediction"]
    torch.testing.assert_close(panels["prediction"], to_db(pred, mean, std))
    hidden = mask.bool().expand_as(sar_db)
    assert torch.equal(panels["visible input + prediction"][~hidden], sar_db[~hidden])
    assert torch.equal(panels["visible input + prediction"][hidden], panels["prediction"][hidden])
    panels, _, kind = reconstruction_panels({"input": x, "masked input": x, "prediction": pred, "mask": mask},
                                            sar_db, mean, std)
    assert kind == "SimMIM" and panels["masked input (hidden cells blue)"][hidden].isnan().all()


def test_caption_and_weight_range() -> None:
    assert weight_range(1.0) == (1.0, math.e) and weight_range(0.5) == (1.0, math.exp(0.5))
    assert NORM_PIX_NOTE in reconstruction_caption("MixMIM", "per_channel", 1.0, True)
    assert "own mean and std" in NORM_PIX_NOTE and "--norm_pix_loss" in NORM_PIX_NOTE
    simmim = reconstruction_caption("SimMIM", "shared_avg", 1.0, False)
    assert NORM_PIX_NOTE not in simmim and "mask token" in simmim and "shared_avg" in simmim


@pytest.mark.parametrize("mode,backbone,options", [("mixmim", "mixmim_tiny", {}),
                                                  ("simmim", "vit_tiny", {"mask_patch_size": 16})])
def test_figure_is_written_for_one_and_two_channels(mode: str, backbone: str, options: dict, tmp_path) -> None:
    heights = {}
    for channels in (("VV",), ("VH", "VV")):
        torch.manual_seed(0)
        model = MODES[mode].build(backbone, 64, len(channels), **options)
        data = SyntheticS1(n=2, input_size=64, channels=channels)
        path = save_reconstructions(model, data, tmp_path / f"{mode}_{len(channels)}.png", n=2)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        heights[len(channels)] = matplotlib.image.imread(path).shape[0]
    # One row per sample and channel: two channels draw twice the rows of one.
    assert heights[2] > 1.6 * heights[1]
