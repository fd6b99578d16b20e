"""BigEarthNet (v1 and v2, and the synthetic and packed stand-ins): multi-label scene classification.

One Sentinel-1 patch (C, S, S) -> K logits (19 or 43 classes), trained with MultiLabelSoftMarginLoss
(BCE-with-logits averaged over classes and samples) on multi-hot float targets, scored by
``util.metrics.multilabel_metrics``; mAP_macro selects the best epoch. The model is the backbone table's
``finetune`` wrapper (the Swins' ``models_mixmim_ft`` head, the plain ViTs with their own head).
"""
from __future__ import annotations

import torch
from torch import nn

from sarwmix.constants import BEN_19_CLASSES, BEN_43_CLASSES
from sarwmix.data.geotiff import PATCH_SIZE
from tasks.base import Task
from util.metrics import BEN_METRICS, multilabel_metrics


class BigEarthNet(Task):
    name = "ben"
    title = "BigEarthNet"
    metrics = BEN_METRICS
    default_metric = "mAP_macro"
    default_input_size = 128  # the patch side
    class_counts = (19, 43)

    def class_names(self, n: int) -> list[str]:
        return list({19: BEN_19_CLASSES, 43: BEN_43_CLASSES}.get(n, super().class_names(n)))

    def scene_window(self, input_size: int) -> int:
        return PATCH_SIZE  # the models saw 120 px patches resized to their input size

    def finetune_model(self, config, num_classes: int, *, in_chans: int, drop_path_rate: float) -> nn.Module:
        return self.wrapper(config)(num_classes, img_size=config.input_size, in_chans=in_chans,
                                    drop_path_rate=drop_path_rate)

    def criterion(self) -> nn.Module:
        return nn.MultiLabelSoftMarginLoss()

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.float()  # (N, K) multi-hot

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
        return multilabel_metrics(logits, targets)

    def empty_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros((0, 1)), torch.zeros((0, 1))


BIGEARTHNET = BigEarthNet()
