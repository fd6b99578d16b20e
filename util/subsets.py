"""Views of part of a data set: a subset by indices, and the seeded, nested fractions of a training split."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from sarwmix.data.bad_patches import patch_name


class SubsetView(Dataset):
    """Some items of a data set, keeping the attributes the run needs (``stats``, ``num_classes``)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.stats, self.num_classes = base.stats, base.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def patch_name(self, i: int) -> str:
        """The name of item ``i`` as its data set knows it (``sarwmix.data.bad_patches.patch_name``)."""
        return patch_name(self.base, self.indices[i])


def fraction_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded subset of ``round(fraction * n)`` indices (at least 1), sorted.

    The subset is a prefix of one seeded permutation of ``range(n)``, so for one seed the subsets of
    smaller fractions are contained in those of larger ones (1.0 > 0.5 > 0.25 > 0.125: nested).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: expected 0 < fraction <= 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7_919)).tolist()
    return sorted(order[: max(1, round(fraction * n))])
