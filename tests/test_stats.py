"""sarwmix.data.stats: texture measures on constructed arrays, both std conventions, the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sarwmix.data.stats import dataset_stats, main, patch_texture_stats


def test_texture_measures_on_known_arrays() -> None:
    rng = np.random.default_rng(0)
    vh = rng.normal(-20, 2, (120, 120))
    stats = patch_texture_stats(np.stack([vh, vh + 7]))
    assert stats["gap"][0] == pytest.approx(7)
    assert stats["corr"][0] == pytest.approx(1)
    assert abs(stats["lag1"][0]) < 0.05, "independent pixels are uncorrelated"
    assert stats["std"][0] == pytest.approx(2, rel=0.05)
    smooth = np.repeat(np.repeat(rng.normal(-12, 3, (30, 30)), 4, 0), 4, 1)
    assert patch_texture_stats(np.stack([smooth, smooth]))["lag1"][0] > 0.7
    # Gamma speckle with L looks has ENL ~L in linear power (windows of 49 pixels: a few % bias).
    gamma = 10 * np.log10(rng.gamma(4.0, 1 / 4.0, (2, 140, 140)))
    assert patch_texture_stats(gamma)["enl"] == pytest.approx([4.0, 4.0], rel=0.15)


class _Fixed(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], torch.zeros(19)


def test_global_and_within_patch_conventions_differ_as_expected() -> None:
    # Two flat patches at -10 and -20 dB: no spread inside a patch, 5 dB over all pixels.
    x = torch.stack([torch.full((2, 4, 4), -10.0), torch.full((2, 4, 4), -20.0)])
    stats = dataset_stats(_Fixed(x), batch_size=1)
    assert stats["mean"] == pytest.approx([-15, -15])
    assert stats["std_global"] == pytest.approx([5, 5])
    assert stats["std_within"] == pytest.approx([0, 0], abs=1e-9)
    assert dataset_stats(_Fixed(x), max_samples=1)["mean"] == pytest.approx([-10, -10])
    # A subset is spread over the data set (sorted by name: the head is a few acquisitions only).
    ramp = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 2, 4, 4) - 20
    assert dataset_stats(_Fixed(ramp), max_samples=4)["mean"] == pytest.approx([-17, -17])


def test_command_line_json_and_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["--dataset", "synthetic", "--max_samples", "16", "--input_size", "64", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_patches"] == 16 and stats["channels"] == ["VH", "VV"]
    assert stats["mean"][0] < stats["mean"][1] < 0
    assert all(w < g for w, g in zip(stats["std_within"], stats["std_global"], strict=True))
    assert main(["--dataset", "synthetic", "--max_samples", "4"]) == 0
    assert "std within" in capsys.readouterr().out
    assert main(["--dataset", "benv1", "--data_path", "/nonexistent/ben"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
