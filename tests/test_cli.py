"""sarwmix.cli: every entry point ends a bad command line with one line, names the closest flags of an unknown
one, and refuses a count below its minimum while parsing (command line, config file, --override)."""
from __future__ import annotations

import argparse
import ast
import importlib

import pytest
import yaml
from conftest import REPO, run_py

import main_finetune
import main_pretrain
from sarwmix.cli import ArgumentParser, count
from sarwmix.errors import ConfigError


def _error_line(capsys, parse) -> str:
    """Run ``parse()``, which must exit with status 2, and return its stderr (asserted to be one line)."""
    with pytest.raises(SystemExit) as exit_info:
        parse()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "usage:" not in err
    return err.strip()


# --- the parser -----------------------------------------------------------------------------------------

def test_unknown_flag_is_one_line_with_the_closest_flags(capsys):
    p = ArgumentParser()
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup_epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop_epoch", type=int)
    p.add_argument("--log_dir")
    p.add_argument("--log_dim")
    assert _error_line(capsys, lambda: p.parse_args(["--epoch", "2"])) == (
        "error: unrecognized argument --epoch; did you mean --epochs?")
    assert _error_line(capsys, lambda: p.parse_args(["--epoch=2", "--sed", "1"])) == (
        "error: unrecognized argument --epoch; did you mean --epochs?; unrecognized argument --sed; "
        "did you mean --seed?")
    assert _error_line(capsys, lambda: p.parse_args(["--log_di", "x"])).endswith("did you mean --log_dim or --log_dir?")
    assert "(--help lists the flags)" in _error_line(capsys, lambda: p.parse_args(["--zzzzzz"]))
    assert p.parse_args(["--epochs", "3"]).epochs == 3


def test_an_abbreviated_flag_is_not_taken_for_the_whole_one(capsys):
    p = ArgumentParser()
    p.add_argument("--epochs", type=int)
    assert "did you mean --epochs?" in _error_line(capsys, lambda: p.parse_args(["--epo", "2"]))


def test_the_flags_of_sub_commands_are_suggested(capsys):
    p = ArgumentParser(prog="tool")
    sub = p.add_subparsers(dest="command", required=True).add_parser("write")
    sub.add_argument("--shard_size", type=int)
    assert _error_line(capsys, lambda: p.parse_args(["write", "--shard_siz", "4"])).endswith(
        "did you mean --shard_size?")


def test_other_parse_errors_are_one_line_naming_the_flag(capsys):
    p = ArgumentParser()
    p.add_argument("--amp", choices=("bf16", "off"))
    p.add_argument("--epochs", type=int)
    assert _error_line(capsys, lambda: p.parse_args(["--amp", "fp8"])).startswith("error: --amp invalid choice")
    assert _error_line(capsys, lambda: p.parse_args(["--epochs", "x"])) == "error: --epochs invalid int value: 'x'"


@pytest.mark.parametrize("minimum, text, message", [
    (1, "-5", "-5: expected a positive integer"),
    (1, "0", "0: expected a positive integer"),
    (0, "-1", "-1: expected a non-negative integer"),
    (8, "4", "4: expected an integer >= 8"),
    (1, "2.5", "'2.5': expected a positive integer"),
])
def test_count_refuses_values_below_its_minimum(minimum, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$".replace(".", r"\.")):
        count(minimum)(text)


def test_count_converts_config_file_values_without_silent_casts():
    assert count(1)("3") == 3 and count(1)(3) == 3 and count(0)(4.0) == 4
    for bad in (True, 1.5, None, "three"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(1)(bad)


# --- the entry points -------------------------------------------------------------------------------------

# (module, how its command line is parsed, a misspelled flag of it, the flag it must suggest)
ENTRY_POINTS = [
    ("main_pretrain", "parse_args", ["--epoch", "2"], "--epochs"),
    ("pretraining", "parse_args", ["--mask_ratios", "0.5"], "--mask_ratio"),
    ("main_finetune", "parse_args", ["--finetun", "x.pth"], "--finetune"),
    ("finetuning", "parse_args", ["--finetun", "x.pth"], "--finetune"),
    ("sarwmix.data.synthetic", "main", ["write", "out", "--format", "benv1", "--seeds", "1"], "--seed"),
    ("sarwmix.data.stats", "main", ["--dataset", "benv1", "--max_sample", "3"], "--max_samples"),
    ("sarwmix.data.packed", "main", ["convert", "--source", "synthetic", "o", "--shard_siz", "8"], "--shard_size"),
    ("sarwmix.data.bigearthnetv1", "main", ["to-zarr", "s", "o", "--zarr_formats", "2"], "--zarr_format"),
    ("sarwmix.prep.sen12_align_s1_to_s2", "main", ["r", "o", "--s1list", "x"], "--s1_list"),
    ("sarwmix.prep.sen12_data_prep", "main", ["a", "l", "o", "--seedd", "1"], "--seed"),
    ("sarwmix.prep.sen12_prune_partial_pairs", "main", ["o", "--dry-run"], "--dry_run"),
    ("util.export_backbone", "main", ["ckpt.pth", "o.pth", "--verbose"], None),
    ("analysis.plot_time", "main", ["run", "--dpii", "9"], "--dpi"),
    ("analysis.plot_pretrain_loss", "main", ["run", "--smoth", "3"], "--smooth"),
    ("analysis.plot_label_efficiency", "main", ["r", "--pretrain_epochs", "3"], "--pretrain_epoch"),
    ("analysis.plot_epoch_sweep", "main", ["r", "--metrics", "f1"], "--metric"),
    ("analysis.probe", "main", ["--knn", "3"], "--knn_k"),
    ("analysis.real_s1_check", "main", ["c.pth", "--weightin", "none"], "--weighting"),
    ("analysis.study", "main", ["--out", "x", "--job", "2"], "--jobs"),
    ("analysis.sweep_drop", "main", ["c.pth", "--bench_rep", "2"], "--bench_reps"),
    ("analysis.image_patches", "main", ["c.pth", "--rhoo", "0.5"], "--rho"),
    ("benchmarks.bench_pss", "main", ["--step", "2"], "--steps"),
    ("benchmarks.bench_pretrain", "parse_args", ["--warmups", "2"], "--warmup"),
    ("benchmarks.bench_data", "main", ["--index_row", "2"], "--index_rows"),
    ("benchmarks.bench_faults", "main", ["--onl", "frozen_rank"], "--only"),
    ("benchmarks.bench_predict", "main", ["--window", "120", "--rond", "2"], "--rounds"),
    ("predict", "parse_args", ["c.pth", "--input", "s.tif", "--out", "m.tif", "--strid", "60"], "--stride"),
]


@pytest.mark.parametrize("module, function, argv, suggestion", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_entry_point_names_the_closest_flag_in_one_line(capsys, module, function, argv, suggestion):
    parse = getattr(importlib.import_module(module), function)
    err = _error_line(capsys, lambda: parse(argv))
    assert err.startswith("error: unrecognized argument"), err
    if suggestion:
        assert f"did you mean {suggestion}" in err, err


def _parser_modules() -> list[str]:
    """Every module of the repository that builds a command-line parser (argparse.ArgumentParser or ours)."""
    found = []
    for folder in ("", "sarwmix", "util", "analysis", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            if "ArgumentParser(" in path.read_text():
                found.append(path.relative_to(REPO).as_posix())
    return found


def test_every_command_line_uses_the_shared_parser():
    """A module that builds a parser builds ``sarwmix.cli.ArgumentParser`` (argparse's only for parents)."""
    modules = _parser_modules()
    assert len(modules) >= 20
    tested = {m.replace(".", "/") + ".py" for m, *_ in ENTRY_POINTS}
    tested |= {f"benchmarks/{m}.py" for m, *_ in ENTRY_POINTS if m.startswith("bench_")}
    for path in modules:
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "ArgumentParser"):
                parent_only = any(k.arg == "add_help" for k in node.keywords)
                assert parent_only, f"{path}:{node.lineno}: argparse.ArgumentParser; use sarwmix.cli.ArgumentParser"
    untested = sorted(set(modules) - tested - {"sarwmix/cli.py", "util/runner.py", "analysis/logs.py",
                                               "analysis/finetuned.py", "util/config.py"})
    assert not untested, f"entry points missing from ENTRY_POINTS: {untested}"


def test_the_unknown_flag_of_the_issue_from_the_command_line(tmp_path):
    proc = run_py(["main_pretrain.py", "--epoch", "2", "--output_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: unrecognized argument --epoch; did you mean --epochs?\n"
    assert not (tmp_path / "out").exists()


# --- count flags ---------------------------------------------------------------------------------------

def _count_flags(parser: argparse.ArgumentParser) -> dict[str, int]:
    return {a.dest: a.type.minimum for a in parser._actions if hasattr(a.type, "minimum")}


def test_the_count_flags_of_the_training_entry_points():
    """The audit: every flag that counts samples, epochs, steps or workers is a checked count."""
    expected_pretrain = {"num_samples": 1, "batch_size": 1, "epochs": 1, "accum_iter": 1, "start_epoch": 0,
                         "save_freq": 0, "save_every_steps": 0, "num_workers": 0, "num_threads": 0,
                         "mask_patch_size": 1, "stop_epoch": 1, "vis_samples": 0, "probe_every": 0,
                         "probe_samples": 8, "probe_knn_k": 1}
    assert _count_flags(main_pretrain.get_args_parser()) == expected_pretrain
    finetune = _count_flags(main_finetune.get_args_parser())
    common = {k: v for k, v in expected_pretrain.items() if k in finetune}
    assert finetune == {**common, "nb_classes": 1, "num_eval_samples": 1, "pss_period": 1}


@pytest.mark.parametrize("argv, message", [
    (["--num_samples", "-5"], "--num_samples -5: expected a positive integer"),
    (["--epochs", "0"], "--epochs 0: expected a positive integer"),
    (["--num_workers", "-1"], "--num_workers -1: expected a non-negative integer"),
    (["--probe_samples", "4"], "--probe_samples 4: expected an integer >= 8"),
    (["--save_freq", "-2"], "--save_freq -2: expected a non-negative integer"),
])
def test_a_bad_count_is_refused_at_parse_time(capsys, argv, message):
    assert _error_line(capsys, lambda: main_pretrain.parse_args(argv)) == f"error: {message}"


def test_a_bad_count_in_a_config_file_or_override_is_refused_at_parse_time(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"num_samples": -5}))
    with pytest.raises(ConfigError, match="bad value for 'num_samples': -5: expected a positive integer"):
        main_pretrain.parse_args(["--config", str(config)])
    with pytest.raises(ConfigError, match="bad value for 'num_eval_samples': 0: expected a positive integer"):
        main_finetune.parse_args(["--override", "num_eval_samples=0"])
