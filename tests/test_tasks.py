"""tasks: the table of finetuning tasks, what each task answers, and a task added in a test running through
the finetuning engine (step, the shared loop with its checkpoints, evaluation)."""
import dataclasses

import pytest
import torch
from torch import nn

import backbones
import engine_finetune as E
import finetuning
import main_finetune
from engine import Trainer, TrainSettings
from sarwmix.data.datasets import DATASETS, DatasetSpec
from sarwmix.errors import ConfigError, SarwmixError
from tasks import TASKS, Task, get_task, task_for_dataset
from tasks.base import task_of_dataset
from util.config import RunConfig
from util.distributed import DistInfo
from util.metrics import BEN_METRICS, SEN12_METRICS
from util.runner import Run


class SingleLabel(Task):
    """A toy single-label task: (2, 4, 4) inputs, 3 classes, cross-entropy, accuracy."""

    name, title = "toy", "Toy"
    metrics, default_metric = ("accuracy",), "accuracy"

    def finetune_model(self, config, num_classes, *, in_chans, drop_path_rate):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 16, num_classes))

    def criterion(self):
        return nn.CrossEntropyLoss()

    def targets(self, targets):
        return targets.long()

    def scores(self, logits, targets):
        return {"accuracy": float((logits.argmax(1) == targets).float().mean()) if len(targets) else 0.0}

    def empty_predictions(self):
        return torch.zeros((0, 3)), torch.zeros((0,), dtype=torch.long)


class ToyData(torch.utils.data.Dataset):
    """12 seeded random samples of 3 classes, with the attributes a run reads (``stats``, ``num_classes``)."""

    stats = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    num_classes = 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 2, 4, 4, generator=g)
        self.y = torch.arange(12) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.fixture
def toy(monkeypatch) -> Task:
    task = SingleLabel()
    monkeypatch.setitem(TASKS, task.name, task)
    return task


def test_every_data_set_names_its_task():
    assert {name: task_for_dataset(name).name for name in DATASETS} == {
        name: "sen12flood" if name == "sen12flood" else "ben" for name in DATASETS}


def test_the_two_tasks_answer_what_the_run_records():
    ben, sen12 = get_task("ben"), get_task("sen12flood")
    assert (ben.metrics, ben.default_metric, ben.default_input_size) == (BEN_METRICS, "mAP_macro", 128)
    assert (sen12.metrics, sen12.default_metric, sen12.default_input_size) == (SEN12_METRICS, "f1", 512)
    assert (ben.backbone_role, sen12.backbone_role, get_task(ben)) == ("finetune", "pair_finetune", ben)
    assert set(sen12.scores(torch.eye(2), torch.tensor([0, 1]))) == set(SEN12_METRICS)
    assert sen12.empty_predictions()[0].shape == (0, 2) and ben.empty_predictions()[1].shape == (0, 1)
    with pytest.raises(ConfigError, match="task 'segmentation': expected one of ben, sen12flood"):
        get_task("segmentation")


def test_a_data_set_of_an_unknown_task_is_refused_naming_it(monkeypatch):
    monkeypatch.setitem(DATASETS, "toy_data", DatasetSpec(lambda *a, **k: None, task="segmentation"))
    with pytest.raises(ConfigError, match="--dataset toy_data: its labels are for task 'segmentation', which is "
                                          "none of"):
        task_of_dataset(TASKS, "toy_data")
    with pytest.raises(ConfigError, match="dataset 'nowhere': expected one of"):
        task_of_dataset(TASKS, "nowhere")


def test_a_task_missing_one_of_the_five_methods_cannot_be_built():
    class NoScores(Task):
        name = "no_scores"

        def finetune_model(self, config, num_classes, *, in_chans, drop_path_rate):
            return nn.Identity()

        def criterion(self):
            return nn.CrossEntropyLoss()

        def targets(self, targets):
            return targets

        def empty_predictions(self):
            return torch.zeros(0, 3), torch.zeros(0)

    with pytest.raises(TypeError, match="scores"):
        NoScores()
    SingleLabel()  # the complete toy task builds


def test_a_task_added_in_a_test_runs_through_the_step_the_loop_and_evaluate(toy, tmp_path):
    data = ToyData()
    config = RunConfig({"task": "toy", "epochs": 2, "lr": 0.1, "batch_size": 4, "seed": 0, "warmup_epochs": 0,
                        "num_workers": 0, "progress": False, "channels": ["VH", "VV"]})
    model = toy.finetune_model(config, data.num_classes, in_chans=2, drop_path_rate=0.0)
    step = E.make_finetune_step(torch.device("cpu"), data.stats["mean"], data.stats["std"], config.task,
                                flips=False)
    loss, extras, n = step(model, next(iter(torch.utils.data.DataLoader(data, batch_size=4))), None)
    assert loss.ndim == 0 and n == 4 and extras == {}

    loader = E.eval_loader(data, batch_size=5, num_workers=0)
    cpu = torch.device("cpu")

    def validate(raw_model, epoch: int) -> dict:
        return E.evaluate(raw_model, loader, cpu, config.task, data.stats["mean"], data.stats["std"])

    run = Run(DistInfo(), cpu, tmp_path, None, config=config)
    trainer = Trainer(TrainSettings.of(config), run, model, data, step, betas=(0.9, 0.999), evaluate=validate,
                      select_metric=toy.default_metric)
    record = trainer.fit()
    assert record["epoch"] == 1 and 0.0 <= record["val_accuracy"] <= 1.0 and record["val_n_samples"] == 12
    saved = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    assert saved["args"] == config.as_dict() and saved["args"]["channels"] == ["VH", "VV"]
    empty = E.evaluate(model, E.eval_loader(torch.utils.data.Subset(data, []), 2, 0), cpu, toy, [0.0, 0.0],
                       [1.0, 1.0], gather=False)
    assert empty["n_samples"] == 0


def test_the_entry_point_settles_a_task_from_its_table(toy):
    """--select_metric is checked against the task's metrics, and the task's default fills it."""
    args = main_finetune.parse_args([])
    finetuning.settle(args)
    assert (args.task, args.select_metric) == ("ben", "mAP_macro")
    with pytest.raises(ConfigError, match=r"--select_metric 'f1': expected one of \['mAP_macro'"):
        finetuning.settle(main_finetune.parse_args(["--select_metric", "f1"]))
    with pytest.raises(ConfigError, match="takes mixmim_tiny.*vit_small is finetuned on BigEarthNet"):
        finetuning.settle(main_finetune.parse_args(["--dataset", "sen12flood", "--data_path", "x",
                                                             "--model", "vit_small"]))


def test_a_task_builds_its_model_with_the_wrapper_of_the_backbone_table(monkeypatch):
    """The task gives the structure (one image, or tiled pairs pooled by --patch_op); the table's entry of
    --model builds the network: a backbone added to the table is finetuned by every task whose wrapper it has."""
    calls = []
    spy = dataclasses.replace(
        backbones.BACKBONES["mixmim_tiny"],
        finetune=lambda num_classes, **kw: calls.append(("finetune", num_classes, kw)) or nn.Identity(),
        pair_finetune=lambda num_classes, op, **kw: calls.append(("pair", num_classes, op, kw)) or nn.Identity())
    monkeypatch.setitem(backbones.BACKBONES, "mixmim_spy", spy)
    ben, sen12 = get_task("ben"), get_task("sen12flood")
    config = RunConfig({"model": "mixmim_spy", "input_size": 256, "tile_size": 64, "patch_op": "max"})
    ben.finetune_model(config, 19, in_chans=2, drop_path_rate=0.1)
    sen12.finetune_model(config, 2, in_chans=1, drop_path_rate=0.0)
    assert calls == [("finetune", 19, {"img_size": 256, "in_chans": 2, "drop_path_rate": 0.1}),
                     ("pair", 2, "max", {"img_size": 64, "in_chans": 1, "drop_path_rate": 0.0})]
    assert {"mixmim_spy", "vit_tiny"} <= set(ben.backbone_names())
    assert "mixmim_spy" in sen12.backbone_names() and "vit_tiny" not in sen12.backbone_names()
    with pytest.raises(ConfigError, match="--model vit_tiny: sen12flood finetuning takes mixmim_tiny"):
        sen12.wrapper(RunConfig({"model": "vit_tiny"}))


def test_sen12flood_checks_the_size_rule_on_its_tiles_not_on_the_pair_side(tmp_path):
    """The Swin sees --tile_size tiles: a pair side of 96 px (three 32 px tiles) is no Swin input size but a
    valid SEN12-FLOOD run, which gets as far as reading its data."""
    args = main_finetune.parse_args(["--dataset", "sen12flood", "--data_path", str(tmp_path / "absent"),
                                     "--tile_size", "32", "--input_size", "96", "--output_dir", str(tmp_path)])
    with pytest.raises(SarwmixError) as refused:
        main_finetune.main(args)
    assert "input_size" not in str(refused.value) and "absent" in str(refused.value)
    with pytest.raises(ConfigError, match="--tile_size 48"):
        finetuning.settle(main_finetune.parse_args(["--dataset", "sen12flood", "--data_path", "x",
                                                             "--tile_size", "48", "--input_size", "96"]))
