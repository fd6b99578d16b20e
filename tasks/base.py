"""What a finetuning task is: its data, its model head, its loss, its metrics and its selection metric.

A task is one object (a ``Task`` subclass instance) registered by name in ``tasks.TASKS``. The entry point,
the engine and the analysis scripts ask it; no other code compares task names. The name is what
``--task``, ``config.yaml``, the checkpoints' ``args`` and ``results.json`` record.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

import backbones
from sarwmix.data.datasets import dataset_spec
from sarwmix.errors import ConfigError


class Task(abc.ABC):
    """One finetuning task. Subclasses set the class attributes and implement the five abstract methods
    (``finetune_model``, ``criterion``, ``targets``, ``scores``, ``empty_predictions``; an incomplete
    subclass cannot be instantiated); the other methods have defaults that fit a task of single images with
    a validation split of its own.

    Attributes:
        name: the ``--task`` value.
        title: the task's name in figures.
        metrics: the names ``scores`` returns (higher is better), the valid ``--select_metric`` values.
        default_metric: the metric that picks ``checkpoint_best.pth`` unless ``--select_metric`` is given.
        default_input_size: ``--input_size`` when not given.
        backbone_role: the wrapper of the backbone table (``backbones.Backbone``) the task's model is built
            with: ``finetune`` (one image -> logits) or ``pair_finetune`` (a pair of tiled images -> logits);
            the backbones that have it are the ``--model`` choices of the task.
        dates: images per sample (2 for a pair of dates).
        class_counts: the numbers of classes its models are built with (a checkpoint's head tells its task).
        quicklook: how a map of its probabilities is drawn (``util.quicklook``): ``class`` (the most probable
            class) or ``probability`` (that of the last class).
    """

    name: str = ""
    title: str = ""
    metrics: tuple[str, ...] = ()
    default_metric: str = ""
    default_input_size: int = 128
    backbone_role: str = "finetune"
    dates: int = 1
    class_counts: tuple[int, ...] = ()
    quicklook: str = "class"

    # --- applying a model ----------------------------------------------------------------------------

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits as class probabilities (default: independent classes, sigmoid)."""
        return logits.sigmoid()

    def class_names(self, n: int) -> list[str]:
        """Names of the ``n`` outputs (default: ``class_<k>``)."""
        return [f"class_{k}" for k in range(n)]

    def scene_window(self, input_size: int) -> int:
        """Side of the scene window one prediction covers (default: the model's input size)."""
        return input_size

    # --- configuration ------------------------------------------------------------------------------

    def check(self, config) -> None:
        """Refuse task-specific flags that do not fit (ConfigError); called before anything is built.
        By default every configuration fits."""
        return None

    def encoder_input_size(self, config) -> int:
        """The side of the images the encoder sees (the Swin's size rule applies to it)."""
        return config.input_size

    def device_input_size(self, config) -> int | None:
        """Side the batches are resized to on the device before the model (None: as the loader gives them)."""
        return None

    # --- model and loss -----------------------------------------------------------------------------

    def backbone_names(self) -> list[str]:
        """The ``--model`` values of this task: the backbones whose table entry has its ``backbone_role``."""
        return backbones.names(self.backbone_role)

    def wrapper(self, config) -> Callable[..., nn.Module]:
        """The backbone table's ``backbone_role`` wrapper of ``config.model`` (ConfigError if it has none)."""
        build = getattr(backbones.get(config.model, self.backbone_role), self.backbone_role)
        if build is None:
            raise ConfigError(f"--model {config.model}: {self.name} finetuning takes "
                              f"{', '.join(self.backbone_names())}")
        return build

    @abc.abstractmethod
    def finetune_model(self, config, num_classes: int, *, in_chans: int, drop_path_rate: float) -> nn.Module:
        """The finetuning model of the backbone ``config.model`` with this task's head: the task gives the
        wrapper of ``wrapper(config)`` its inputs (input side, pooling of pairs, ...)."""

    @abc.abstractmethod
    def criterion(self) -> nn.Module:
        """The training loss, called as ``criterion(logits.float(), targets)`` with loader targets."""

    @abc.abstractmethod
    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Gathered evaluation targets in the dtype the criterion takes."""

    @abc.abstractmethod
    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
        """The metrics of a whole split: ``metrics`` as floats, plus any integer counts.

        Args:
            logits: (N, K) model outputs, float32 on the CPU.
            targets: (N, ...) as the loader gives them, gathered over ranks.
        """

    @abc.abstractmethod
    def empty_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of a rank that evaluated no sample, shaped to concatenate with the others."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The criterion over a whole split of gathered predictions."""
        return float(self.criterion()(logits, self.targets(targets)))

    # --- data selection -----------------------------------------------------------------------------

    def holds_out_validation(self, data_path: str | Path | None) -> bool:
        """Whether the validation split is carved out of the training split (no validation data stored)."""
        return False

    def hold_out(self, train: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """(train, validation) indices of ``train`` when ``holds_out_validation``."""
        raise NotImplementedError(f"task {self.name} keeps its validation split apart")

    def check_validation(self, val: Dataset, select_metric: str) -> None:
        """Warn about a validation split on which ``select_metric`` cannot select (e.g. no positive). By
        default there is nothing to warn about."""
        return None

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def task_of_dataset(tasks: Mapping[str, Task], dataset: str) -> Task:
    """The task of ``tasks`` whose labels ``dataset`` holds: the data set names it (``DatasetSpec.task``)."""
    name = dataset_spec(dataset).task
    if name not in tasks:
        raise ConfigError(f"--dataset {dataset}: its labels are for task {name!r}, which is none of "
                          f"{list(tasks)}")
    return tasks[name]
