"""SEN12-FLOOD: flood change detection on pairs of Sentinel-1 acquisitions.

A pair (2, C, H, W) is resized on the device to ``--input_size``, cut into ``--tile_size`` tiles that
the Swin encodes, pooled over tiles (``--patch_op``) -> 2 logits (no flood, flood), trained with
CrossEntropyLoss on int64 labels, scored by ``util.metrics.binary_metrics``; F1 of the flood class selects
the best epoch. The data set has no validation split: unless ``<data_path>/val`` exists, ``--val_fraction``
of the training sequences (whole sequences, seeded) are held out for it. The model is the backbone
table's ``pair_finetune`` wrapper (``models_sen12_ft``, the Swin backbones).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from models_swin import SWIN_WINDOWS, valid_input_sizes
from sarwmix.data.sen12flood_pairs import pair_sequence
from sarwmix.errors import ConfigError, DataError
from tasks.base import Task
from util.metrics import SEN12_METRICS, binary_metrics
from util.subsets import SubsetView

log = logging.getLogger("sarwmix")


class Sen12Flood(Task):
    name = "sen12flood"
    title = "SEN12-FLOOD"
    metrics = SEN12_METRICS
    default_metric = "f1"
    default_input_size = 512  # the side of the released pair images
    backbone_role = "pair_finetune"
    dates = 2
    class_counts = (2,)
    quicklook = "probability"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)

    def class_names(self, n: int) -> list[str]:
        return ["no flood", "flood"] if n == 2 else super().class_names(n)

    def check(self, config) -> None:
        tile = config.tile_size
        if tile not in valid_input_sizes(SWIN_WINDOWS, max(tile, 32)):
            raise ConfigError(f"--tile_size {tile} does not fit the Swin windows {list(SWIN_WINDOWS)}; "
                              f"valid tile sizes: {valid_input_sizes(SWIN_WINDOWS, 512)}")
        if config.input_size % tile:
            raise ConfigError(f"--input_size {config.input_size} is not a multiple of --tile_size {tile}")

    def encoder_input_size(self, config) -> int:
        return config.tile_size

    def device_input_size(self, config) -> int | None:
        return config.input_size

    def finetune_model(self, config, num_classes: int, *, in_chans: int, drop_path_rate: float) -> nn.Module:
        return self.wrapper(config)(num_classes, config.patch_op, img_size=config.tile_size, in_chans=in_chans,
                                    drop_path_rate=drop_path_rate)

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.long()  # (N,) 0/1

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
        return binary_metrics(logits, targets)

    def empty_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros((0, 2)), torch.zeros((0,))

    def holds_out_validation(self, data_path: str | Path | None) -> bool:
        return not (Path(data_path) / "val").is_dir()

    def hold_out(self, train: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        return holdout_by_sequence(train.files, fraction, seed)

    def check_validation(self, val: Dataset, select_metric: str) -> None:
        if select_metric != "accuracy" and not any(pair_labels(val)):
            log.warning("the SEN12-FLOOD validation split holds no flood pair: its %s is 0 in every epoch, so the "
                        "first epoch would be kept; use another --seed / --val_fraction, a val/ folder, or "
                        "--select_metric accuracy", select_metric)


def holdout_by_sequence(files: Sequence[Path], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split training pairs into (train, validation) indices by whole sequences, seeded.

    ``max(1, round(fraction * n_sequences))`` sequences go to validation, so no scene is in both parts.
    """
    seqs = sorted({pair_sequence(f) for f in files})
    if len(seqs) < 2:
        raise DataError(f"SEN12-FLOOD training split has {len(seqs)} sequence(s): at least 2 are needed to "
                        f"hold some out for validation (or provide a val/ folder)")
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + 104_729)).tolist()
    n_val = min(len(seqs) - 1, max(1, round(fraction * len(seqs))))
    held = {seqs[i] for i in order[:n_val]}
    train = [i for i, f in enumerate(files) if pair_sequence(f) not in held]
    return train, [i for i, f in enumerate(files) if pair_sequence(f) in held]


def pair_labels(dataset: Dataset) -> list[int]:
    """The 0/1 labels of a SEN12-FLOOD data set or of a view of one (from the file names, nothing read)."""
    if isinstance(dataset, SubsetView):
        base = pair_labels(dataset.base)
        return [base[i] for i in dataset.indices]
    return list(dataset.labels)


SEN12FLOOD = Sen12Flood()
