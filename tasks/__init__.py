"""The finetuning tasks, by name: ``TASKS`` is the one table the entry point, engine and analysis read.

Adding a task: write its module (a ``tasks.base.Task`` subclass and one instance) and add the instance to
the tuple below. See ``docs/TASKS.md``.

Layer: above the backbone table (a task builds its model with a ``backbones`` wrapper) and below the engines;
engines, entry points and analysis import it.
"""
from __future__ import annotations

from sarwmix.errors import table_entry
from tasks.base import Task, task_of_dataset
from tasks.bigearthnet import BIGEARTHNET
from tasks.sen12flood import SEN12FLOOD

TASKS: dict[str, Task] = {t.name: t for t in (BIGEARTHNET, SEN12FLOOD)}


def get_task(task: str | Task) -> Task:
    """The task of a name (as ``--task``, ``config.yaml`` and ``results.json`` record it), or ``task`` itself."""
    return table_entry(TASKS, task, "task")


def task_for_dataset(dataset: str) -> Task:
    """The task a ``--dataset`` belongs to."""
    return task_of_dataset(TASKS, dataset)


__all__ = ["TASKS", "Task", "get_task", "task_for_dataset"]
