import math

import pytest
import torch

from util.masking import flip_batch, pixel_mask, sample_mixing_mask, sample_simmim_mask, upsample_mask


@pytest.mark.parametrize("cells,ratio", [(16, 0.5), (16, 0.3), (49, 0.5), (64, 0.75), (4, 0.5), (16, 0.0)])
def test_mixing_mask_count_is_floor(cells, ratio):
    m = sample_mixing_mask(cells, ratio, generator=torch.Generator().manual_seed(1))
    assert m.shape == (1, cells)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert int(m.sum()) == math.floor(cells * ratio)


def test_range_mask_ratio_stays_in_range_and_is_seeded():
    counts = {int(sample_mixing_mask(64, 0.25, 0.5, generator=torch.Generator().manual_seed(s)).sum())
              for s in range(30)}
    assert min(counts) >= 16 and max(counts) <= 48 and len(counts) > 3
    a = sample_mixing_mask(64, 0.5, generator=torch.Generator().manual_seed(7))
    b = sample_mixing_mask(64, 0.5, generator=torch.Generator().manual_seed(7))
    c = sample_mixing_mask(64, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_simmim_mask_is_ceil_per_sample():
    m = sample_simmim_mask(5, 16, 0.6, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 16)
    assert (m.sum(1) == math.ceil(16 * 0.6)).all()
    assert not torch.equal(m[0], m[1])  # one mask per sample


def test_stage_masks_are_consistent_upsamplings():
    m = sample_mixing_mask(16, 0.5, generator=torch.Generator().manual_seed(3))
    grids = [32, 16, 8, 4]
    ups = [upsample_mask(m, 4, g).view(g, g) for g in grids]
    for fine, coarse in zip(ups[:-1], ups[1:]):
        # every 2x2 block of a finer stage equals the cell of the coarser stage it merges into
        blocks = fine.view(coarse.shape[0], 2, coarse.shape[1], 2)
        assert torch.equal(blocks.amin(dim=(1, 3)), coarse) and torch.equal(blocks.amax(dim=(1, 3)), coarse)
    assert ups[0].mean() == m.mean()


def test_upsample_refuses_non_multiple():
    with pytest.raises(ValueError):
        upsample_mask(torch.zeros(1, 16), 4, 6)


def test_unmixing_restores_both_images():
    x = torch.randn(5, 2, 32, 32)  # odd batch: the middle image mixes with itself
    m = pixel_mask(sample_mixing_mask(16, 0.5, generator=torch.Generator().manual_seed(0)), 4, 32)
    mixed = x * (1 - m) + flip_batch(x) * m
    restored = mixed * (1 - m) + flip_batch(mixed) * m
    assert torch.equal(restored, x)
    assert not torch.equal(mixed, x)


def test_step_streams_of_large_runs_do_not_repeat():
    """1,024 micro-batches per update (128 ranks x accum_iter 8): micro 1,009 of one update and micro 0 of
    the next used to share a stream (and so a mixing mask and flips)."""
    from util.augment import step_generator

    def draw(update: int, micro: int) -> torch.Tensor:
        return torch.rand(4, generator=step_generator(0, 0, update, micro))

    assert not torch.equal(draw(0, 1_009), draw(1, 0))
    assert torch.equal(draw(3, 5), draw(3, 5))


@pytest.mark.parametrize("cells,ratio,expected", [(100, 0.55, 55), (25, 0.28, 7), (64, 0.6, 39), (16, 0.5, 8)])
def test_simmim_mask_count_is_not_raised_by_float_error(cells, ratio, expected):
    mask = sample_simmim_mask(2, cells, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [expected, expected]


@pytest.mark.parametrize("cells,ratio,expected", [(100, 0.29, 29), (100, 0.57, 57), (16, 0.5, 8), (49, 0.5, 24)])
def test_mixing_mask_count_is_not_lowered_by_float_error(cells, ratio, expected):
    assert sample_mixing_mask(cells, ratio, generator=torch.Generator().manual_seed(0)).sum() == expected
