"""Pretrain -> finetune -> evaluate end to end (BigEarthNet-style and SEN12-FLOOD), resume, checkpoints,
released formats, data selection and distributed gathering of predictions."""
import argparse
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from _finetune_helpers import eval_rank, released_checkpoint, toy_dataset, toy_model, write_sen12_pairs

import engine_finetune as E
import finetuning
import main_finetune
import main_pretrain
from sarwmix.data.sen12flood_pairs import pair_sequence
from sarwmix.data.synthetic import write_benv2
from sarwmix.errors import CheckpointError, ConfigError
from tasks import get_task
from tasks.sen12flood import holdout_by_sequence
from util.checkpoint import known_hashes, load_checkpoint, sha256_of
from util.config import run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "mixmim_tiny", "--num_workers", "0", "--no-progress", "--amp", "off"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """checkpoint_1.pth of a 1-epoch tiny MixMIM pretraining at 64 px on synthetic data (1 step)."""
    out = tmp_path_factory.mktemp("pretrain")
    main_pretrain.main(main_pretrain.parse_args([
        *FAST, "--input_size", "64", "--num_samples", "4", "--batch_size", "4", "--epochs", "1",
        "--warmup_epochs", "1", "--vis_samples", "0", "--output_dir", str(out)]))
    return out / "checkpoint_1.pth"


def finetune(*argv: str) -> dict:
    return main_finetune.main(main_finetune.parse_args([*FAST, *argv]))


def ben_args(pre: Path, out: Path, *extra: str) -> list[str]:
    """Finetune at 32 px from the 64 px checkpoint (position and window tables are resized)."""
    return ["--finetune", str(pre), "--input_size", "32", "--num_samples", "2", "--num_eval_samples", "3",
            "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e-4",
            "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def benv2_root(tmp_path_factory) -> Path:
    """12 synthetic patches in the BigEarthNet v2 layout (GeoTIFFs + metadata.parquet): 5 train (of
    which --train_fraction 0.4 keeps 2), 3 validation, 3 test."""
    return write_benv2(tmp_path_factory.mktemp("benv2"), 12, seed=0)


def test_ben_finetune_select_on_val_resume_exactly_and_eval_released_format(pretrained, benv2_root, tmp_path,
                                                                              caplog):
    data = ["--dataset", "benv2", "--data_path", str(benv2_root), "--train_fraction", "0.4"]
    a = finetune(*ben_args(pretrained, tmp_path / "a", "--save_freq", "1", *data))
    assert a["task"] == "ben" and a["pretrain_epoch"] == 1 and a["train_fraction"] == 0.4
    assert a["val"]["n_samples"] == 3 and a["test"]["n_samples"] == 3 and a["selection_metric"] == "mAP_macro"
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["test"] == pytest.approx(a["test"]) and saved["best_epoch"] == a["best_epoch"]
    assert saved["freeze_encoder"] is False and saved["dataset"] == "benv2"  # the protocol and the data
    # The best epoch is the first maximum of the validation metric logged per epoch.
    log = [json.loads(line) for line in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    val = [r["val_mAP_macro"] for r in log]
    assert len(val) == 2 and a["best_epoch"] == val.index(max(val))
    assert a["val"]["mAP_macro"] == pytest.approx(max(val))

    # Resume from the end of epoch 0: the final state equals the uninterrupted run's, bit for bit.
    finetune(*ben_args(pretrained, tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoint_1.pth"), *data))
    full, resumed = (load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("a", "b"))
    assert resumed["epoch"] == full["epoch"] == 1
    first = load_checkpoint(tmp_path / "a" / "checkpoint_1.pth")["model"]
    assert not torch.equal(first["head.weight"], full["model"]["head.weight"])  # epoch 1 did train
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    moments = [s["exp_avg"] for s in full["optimizer"]["state"].values()]
    assert all(torch.equal(x, y["exp_avg"]) for x, y in zip(moments, resumed["optimizer"]["state"].values()))

    # The best checkpoint saved the released way (Namespace args) evaluates to the same numbers.
    best = load_checkpoint(tmp_path / "a" / "checkpoint_best.pth")
    path = released_checkpoint(tmp_path / "rel" / "benx_finetune_checkpoint_best.pth", best["model"],
                               best["epoch"], **best["args"])
    c = finetune("--eval", "--resume", str(path), "--input_size", "32", "--output_dir", str(tmp_path / "c"),
                 *data)
    assert c["test"] == pytest.approx(a["test"], rel=1e-5) and c["val"] == pytest.approx(a["val"], rel=1e-5)
    assert c["best_epoch"] == a["best_epoch"]
    # Provenance read from the evaluated file's args.
    assert (c["finetune"], c["pretrain_epoch"], c["train_fraction"]) == (str(pretrained), 1, 0.4)
    assert c["freeze_encoder"] is False
    assert not any(r.levelname == "WARNING" and "another input size" in r.message for r in caplog.records)
    caplog.set_level("INFO", logger="sarwmix")
    finetune("--eval", "--resume", str(path), "--input_size", "64", "--output_dir", str(tmp_path / "d"), *data)
    assert any(r.levelname == "WARNING" and "another input size" in r.message for r in caplog.records)
    [outputs] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"outputs in {tmp_path / 'd'}")]
    assert outputs.endswith(": config.yaml, results.json")  # --eval: no checkpoint, no scalar logged


def test_sen12_finetune_from_a_released_format_checkpoint(pretrained, tmp_path):
    ckpt = load_checkpoint(pretrained)
    released = released_checkpoint(tmp_path / "benv1x_pretrain_checkpoint_64.pth", ckpt["model"], 63,
                                   **ckpt["args"])
    root = write_sen12_pairs(tmp_path / "pairs", {
        "train": [("0001", 0), ("0001", 1), ("0002", 0), ("0002", 1), ("0003", 1)],
        "test": [("0009", 0), ("0009", 1)]})
    r = finetune("--dataset", "sen12flood", "--data_path", str(root), "--finetune", str(released),
                 "--input_size", "64", "--tile_size", "32", "--batch_size", "2", "--epochs", "1",
                 "--val_fraction", "0.34", "--patch_op", "max", "--output_dir", str(tmp_path / "out"))
    assert r["task"] == "sen12flood" and r["pretrain_epoch"] == 64 and r["selection_metric"] == "f1"
    assert r["test"]["n_samples"] == 2 and r["val"]["n_samples"] in (1, 2)  # one held-out sequence
    assert set(r["test"]) == {"loss", "accuracy", "precision", "recall", "f1", "n_samples"}
    assert load_checkpoint(tmp_path / "out" / "checkpoint_best.pth")["args"]["val_fraction"] == 0.34
    # --eval with another --seed / --val_fraction still validates on the sequences training held out.
    e = finetune("--eval", "--resume", str(tmp_path / "out" / "checkpoint_best.pth"), "--dataset", "sen12flood",
                 "--data_path", str(root), "--input_size", "64", "--tile_size", "32", "--batch_size", "2",
                 "--patch_op", "max", "--seed", "5", "--val_fraction", "0.6", "--output_dir", str(tmp_path / "ev"))
    assert e["val"] == pytest.approx(r["val"], rel=1e-5) and e["test"] == pytest.approx(r["test"], rel=1e-5)
    # The --eval run's config.yaml records the hold-out it used, not the command line's.
    config = yaml.safe_load((tmp_path / "ev" / "config.yaml").read_text())
    assert config["seed"] == 0 and config["val_fraction"] == 0.34


def test_train_fraction_subsets_are_nested_and_seeded():
    def train_indices(fraction: float, seed: int = 0) -> list[int]:
        args = main_finetune.parse_args(["--num_samples", "64", "--train_fraction", str(fraction),
                                         "--seed", str(seed), "--batch_size", "1"])
        finetuning.settle(args)
        train = finetuning.build_splits(args, get_task(args.task), world_size=1)["train"]
        return list(range(64)) if fraction == 1.0 else train.indices

    subsets = [set(train_indices(f)) for f in (1.0, 0.5, 0.25, 0.125)]
    assert [len(s) for s in subsets] == [64, 32, 16, 8]
    assert all(small < big for big, small in itertools.pairwise(subsets))
    assert train_indices(0.25) == train_indices(0.25) != train_indices(0.25, seed=1)
    with pytest.raises(ConfigError, match="train_fraction"):
        finetuning.settle(main_finetune.parse_args(["--train_fraction", "0"]))


def test_sen12_validation_holds_out_whole_training_sequences():
    files = [Path(f"{s}__a{i}__b{i}__{i % 2}.npy") for s in ("0001", "0002", "0003", "0004") for i in range(3)]
    train, val = holdout_by_sequence(files, 0.25, seed=0)
    seq = pair_sequence
    assert len(val) == 3 and sorted(train + val) == list(range(12))
    assert not {seq(files[i]) for i in train} & {seq(files[i]) for i in val}
    assert holdout_by_sequence(files, 0.25, seed=0) == (train, val)


def test_pair_input_is_resized_and_both_dates_flip_together():
    pair = torch.randn(3, 1, 2, 8, 8).expand(3, 2, 2, 8, 8)  # both dates identical
    x = E.prepare_input(pair, torch.device("cpu"), torch.zeros(2), torch.ones(2), 4,
                        torch.Generator().manual_seed(0))
    assert x.shape == (3, 2, 2, 4, 4) and torch.equal(x[:, 0], x[:, 1])


def test_released_name_with_wrong_content_is_refused_with_both_hashes(tmp_path):
    name = "benv1_pretrain_checkpoint_64.pth"
    if name not in known_hashes():
        pytest.skip("CHECKSUMS.txt does not list the released files")
    fake = tmp_path / name  # a loadable checkpoint, but not the released bytes
    torch.save({"model": {}, "epoch": 63}, fake)
    with pytest.raises(CheckpointError) as err:
        finetune(*ben_args(fake, tmp_path / "out"))
    assert known_hashes()[name] in str(err.value) and sha256_of(fake) in str(err.value)


def test_a_run_that_fails_at_start_leaves_no_output_folder(tmp_path, capsys):
    """No folder holding only a TensorBoard events file: the writer is made with the first scalar."""
    out = tmp_path / "out"
    argv = [*FAST, "--finetune", str(tmp_path / "missing.pth"), "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_finetune.main, lambda: main_finetune.parse_args(argv))
    assert exit_info.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    assert not out.exists()
    argv = [*FAST, "--dataset", "benv1", "--data_path", str(tmp_path / "no_data"), "--output_dir", str(out)]
    with pytest.raises(SystemExit):  # fails after the configuration is settled: config.yaml only
        run_cli(main_pretrain.main, lambda: main_pretrain.parse_args(argv))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_cli_refuses_a_truncated_checkpoint_in_one_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "checkpoint_3.pth"
    with open(pretrained, "rb") as fh:
        bad.write_bytes(fh.read(5000))
    argv = [*FAST, "--finetune", str(bad), "--num_samples", "2", "--batch_size", "1", "--num_eval_samples", "1",
            "--input_size", "32", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_finetune.main, lambda: main_finetune.parse_args(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: not a readable torch checkpoint")


# --- distributed evaluation -------------------------------------------------------------------------

def test_two_process_evaluation_counts_every_sample_once(tmp_path):
    def single(n: int) -> dict:
        return E.evaluate(toy_model(), E.eval_loader(toy_dataset(n), 2, 0), torch.device("cpu"), "ben",
                          [0.0, 0.0], [1.0, 1.0])

    out = tmp_path / "metrics.json"
    mp.spawn(eval_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    seven, one = json.loads(out.read_text())
    assert seven["n_samples"] == 7 and one["n_samples"] == 1  # 4 + 3 and 1 + 0: no padding duplicates
    assert seven == pytest.approx(single(7), nan_ok=True) and one == pytest.approx(single(1), nan_ok=True)


def test_gather_restores_data_set_order_in_one_process():
    logits, targets, bad = E.gather_predictions([2, 0, 1], torch.tensor([[2.0], [0.0], [1.0]]),
                                                torch.tensor([2, 0, 1]))
    assert logits[:, 0].tolist() == [0.0, 1.0, 2.0] and targets.tolist() == [0, 1, 2] and bad == []


def test_task_and_flags_are_checked_before_anything_runs():
    for argv, match in ((["--dataset", "sen12flood", "--data_path", "x", "--task", "ben"], "does not fit"),
                        (["--select_metric", "accuracy"], "select_metric"),
                        (["--eval"], "--resume"),
                        (["--dataset", "sen12flood", "--data_path", "x", "--tile_size", "48"],
                         r"--tile_size 48 does not fit .* valid tile sizes: \[32, 64, 128"),
                        (["--dataset", "sen12flood", "--data_path", "x", "--input_size", "160",
                          "--tile_size", "64"], "multiple of --tile_size"),
                        (["--input_size", "100"], r"input_size 100 does not fit"),  # before any data is read
                        (["--drop_path", "1.5"], r"--drop_path 1\.5: expected"),
                        (["--drop_path", "-0.1"], r"--drop_path -0\.1: expected"),
                        (["--layer_decay", "-0.7"], r"--layer_decay -0\.7: expected 0 < decay <= 1"),
                        (["--layer_decay", "0"], r"--layer_decay 0\.0: expected")):
        with pytest.raises(ConfigError, match=match):
            finetuning.settle(main_finetune.parse_args(argv))
    args = main_finetune.parse_args(["--freeze_encoder"])
    finetuning.settle(args)
    assert args.drop_path == 0.0 and args.input_size == 128 and args.select_metric == "mAP_macro"
    assert isinstance(args, argparse.Namespace)


def test_freeze_encoder_trains_the_head_only():
    args = main_finetune.parse_args(["--freeze_encoder", "--input_size", "32"])
    finetuning.settle(args)
    model = finetuning.build_model(args, get_task(args.task), 19)
    groups = finetuning.optimizer_groups(args, model)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(model.head.weight), id(model.head.bias)}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize("name", ["finetune_benv1_base", "finetune_benv2_base", "finetune_sen12flood_base"])
def test_released_recipe_configs_parse(name):
    args = main_finetune.parse_args(["--config", str(REPO / "configs" / f"{name}.yaml"), "--data_path", "x"])
    finetuning.settle(args)
    assert (args.model, args.blr, args.warmup_epochs, args.epochs) == ("mixmim_base", 5e-4, 5, 50)
    assert (args.layer_decay, args.drop_path, args.weight_decay) == (0.7, 0.1, 0.05)
    assert args.input_size == (512 if args.task == "sen12flood" else 128)
    assert args.select_metric == ("f1" if args.task == "sen12flood" else "mAP_macro")


def test_eval_reads_the_pretrain_epoch_the_training_run_recorded():
    """A run finetuned from ``checkpoint.pth`` (no epoch in the name) still reports its pretraining epoch."""
    args = main_finetune.parse_args(["--eval", "--resume", "x.pth"])
    stored = {"finetune": "output_dir/checkpoint.pth", "pretrain_epoch": 4, "train_fraction": 0.5}
    assert finetuning.provenance(args, None, {"args": stored}) == {
        "finetune": "output_dir/checkpoint.pth", "pretrain_epoch": 4, "train_fraction": 0.5, "freeze_encoder": None}
    older = {k: v for k, v in stored.items() if k != "pretrain_epoch"}  # before it was recorded: unknown
    assert finetuning.provenance(args, None, {"args": older})["pretrain_epoch"] is None
    # The protocol of the evaluated model is the one it was trained with, whatever this command line says.
    probe = main_finetune.parse_args(["--eval", "--resume", "x.pth", "--freeze_encoder"])
    for given, recorded in ((probe, False), (args, True)):
        evaluated = {"args": {**stored, "freeze_encoder": recorded}}
        assert finetuning.provenance(given, None, evaluated)["freeze_encoder"] is recorded


def test_a_flood_less_sen12_validation_split_is_warned(tmp_path, caplog):
    """F1 of a validation split without floods is 0 every epoch: the first epoch would be kept silently."""
    root = write_sen12_pairs(tmp_path / "pairs", {"train": [("0001", 0), ("0001", 1)], "val": [("0002", 0)],
                                                  "test": [("0009", 0)]})
    args = main_finetune.parse_args(["--dataset", "sen12flood", "--data_path", str(root), "--batch_size", "1"])
    finetuning.settle(args)
    finetuning.build_splits(args, get_task(args.task), world_size=1)
    assert any("holds no flood pair" in r.getMessage() for r in caplog.records)
    caplog.clear()
    args.select_metric = "accuracy"
    finetuning.build_splits(args, get_task(args.task), world_size=1)
    assert not any("holds no flood pair" in r.getMessage() for r in caplog.records)


def test_results_counts_are_integers(tmp_path):
    """results.json writes counts as integers ("n_samples": 7, not 7.0)."""
    scores = E.evaluate(toy_model(), E.eval_loader(toy_dataset(7), 2, 0), torch.device("cpu"), "ben",
                        [0.0, 0.0], [1.0, 1.0])
    E.write_results(tmp_path / "results.json", {"val": scores, "test": scores})
    text = (tmp_path / "results.json").read_text()
    assert re.search(r'"n_samples": 7\n', text) and re.search(r'"n_classes_present": \d+,\n', text)
    written = json.loads(text)["test"]
    assert type(written["n_samples"]) is int and type(written["n_classes_present"]) is int
