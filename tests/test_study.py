"""The pretraining study driver: its smallest setting end to end, its tables and its checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis import study, study_config, study_probes
from analysis.study_data import write_packed, write_study_data
from sarwmix.data.packed_format import PackedDataset
from sarwmix.data.synthetic import generate_patch
from sarwmix.errors import DataError

SMOKE = ["--scale", "smoke", "--threads", "1", "--n_test", "16", "--amp", "off"]


def test_smoke_study_runs_end_to_end_and_writes_its_tables(tmp_path):
    assert study.main(["--out", str(tmp_path), *SMOKE]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == ["arm", "fraction", "protocol", "metric", "mean", "std", "n"]
    arms = {"random_init", "mixmim_per_channel", "handcrafted"}
    assert set(summary["arm"]) == arms and set(summary["metric"]) == {"mAP_macro", "mAP_micro"}
    assert set(summary["protocol"]) == {"linear", "knn", "finetune"}
    # The floor has no encoder to finetune; every learned arm has every protocol.
    assert set(summary.loc[summary["protocol"] == "finetune", "arm"]) == arms - {"handcrafted"}
    assert summary["mean"].between(0, 1).all() and (summary["n"] == 1).all()
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 3 * 2 * 2 + 2  # probes: 3 arms x 2 fractions x 2 protocols; finetunes: 2 arms
    # Per-class AP of every probe row; its mean over the present classes is the row's mAP macro.
    ap = runs.filter(like="ap_")
    assert ap.shape[1] == 19
    probes = runs["protocol"] != "finetune"
    np.testing.assert_allclose(ap[probes].mean(axis=1, skipna=True), runs.loc[probes, "mAP_macro"], atol=1e-12)
    assert ap[~probes].isna().all().all()
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    assert list(per_class.columns) == ["arm", "protocol", "fraction", "class", "name", "mean", "std", "n"]
    assert len(per_class) == probes.sum() * ap.notna().any().sum() and "Urban fabric" in set(per_class["name"])
    for name in ("study.png", "pretrain_loss.png", "timing.json", "table.md"):
        assert (tmp_path / name).is_file()
    if "--probe_every" not in study.supported_flags("main_pretrain.py"):  # probed afterwards, per epoch
        curves = pd.read_csv(tmp_path / "probe_curves.csv")
        assert list(curves["arm"]) == ["random_init", "mixmim_per_channel"]
        assert (tmp_path / "probe_curves.png").is_file()
    # A second call finds every step done and writes the same table.
    assert study.main(["--out", str(tmp_path), *SMOKE]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv"), summary)


def test_summary_table_is_mean_std_and_count_per_arm_fraction_protocol():
    runs = pd.DataFrame({"arm": ["a", "a", "a", "b"], "protocol": ["linear"] * 4, "fraction": [1.0] * 4,
                         "seed": [0, 1, 2, 0], "mAP_macro": [0.1, 0.2, 0.3, 0.5], "mAP_micro": [0.4] * 4})
    table = study.summary_table(runs)
    row = table[(table["arm"] == "a") & (table["metric"] == "mAP_macro")].iloc[0]
    assert row["mean"] == pytest.approx(0.2) and row["std"] == pytest.approx(0.1) and row["n"] == 3
    assert np.isnan(table[(table["arm"] == "b") & (table["metric"] == "mAP_macro")]["std"].iloc[0])


def test_per_class_table_averages_each_class_over_seeds_and_skips_rows_without_it():
    runs = pd.DataFrame({"arm": ["a", "a", "a"], "protocol": ["linear", "linear", "finetune"],
                         "fraction": [1.0, 1.0, 1.0], "seed": [0, 1, 0], "mAP_macro": [0.5, 0.6, 0.7],
                         "ap_0": [0.4, 0.6, np.nan], "ap_1": [np.nan, np.nan, np.nan]})
    table = study.per_class_table(runs)
    std = pytest.approx(0.2 / 2 ** 0.5)
    assert table.to_dict("records") == [{"arm": "a", "protocol": "linear", "fraction": 1.0, "class": 0,
                                         "name": "0", "mean": pytest.approx(0.5), "std": std, "n": 2}]
    assert study.per_class_table(runs.drop(columns=["ap_0", "ap_1"])).empty  # probes of an older version


def test_markdown_table_has_a_row_per_arm_and_a_column_per_protocol_and_fraction():
    runs = pd.DataFrame({"arm": ["handcrafted", "random_init", "random_init", "random_init"],
                         "protocol": ["linear", "linear", "linear", "finetune"], "fraction": [1.0, 1.0, 1.0, 0.125],
                         "seed": [0, 0, 1, 0], "mAP_macro": [0.3, 0.2, 0.4, 0.25], "mAP_micro": [0.5] * 4})
    lines = study.markdown_table(study.summary_table(runs)).splitlines()
    assert lines[0] == "| arm | linear 100 % | finetune 12.5 % |"
    assert lines[2] == "| random_init | 0.300 ± 0.141 (2) | 0.250 ± 0.000 (1) |"  # arms in the study's order
    assert lines[3] == "| handcrafted | 0.300 ± 0.000 (1) |  |" and len(lines) == 4


def test_the_drivers_own_steps_take_jobs_times_threads_cores_when_threads_is_set(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        two = study.build_study(study.get_args_parser().parse_args(
            ["--out", str(tmp_path), "--jobs", "2", "--threads", "1"]))
        assert study_probes.limit_own_threads(two) == 2 == torch.get_num_threads()
        torch.set_num_threads(3)
        default = study.build_study(study.get_args_parser().parse_args(["--out", str(tmp_path)]))
        assert study_probes.limit_own_threads(default) is None and torch.get_num_threads() == 3  # left alone
    finally:
        torch.set_num_threads(before)


def test_packed_study_data_holds_the_seeded_structured_patches(tmp_path):
    path = write_packed(tmp_path / "set", {"train": 3, "test": 2}, base_seed=5, scene="structured")
    test = PackedDataset(path, "test", input_size=120)
    sar_db, target = test.read_patch(1)
    expected, expected_target, _ = generate_patch(5 * 1_000_003 + 4, scene="structured")
    np.testing.assert_array_equal(sar_db, expected)
    np.testing.assert_array_equal(target, expected_target)
    assert len(PackedDataset(path, "train")) == 3


def test_a_data_seed_draws_fresh_scenes_and_a_folder_of_other_data_is_refused(tmp_path):
    own = write_study_data(tmp_path / "own", 2, 2, 1, 1)
    fresh = write_study_data(tmp_path / "fresh", 2, 2, 1, 1, data_seed=1)
    for name in ("pretrain", "labelled"):
        a, b = PackedDataset(own[name], "train"), PackedDataset(fresh[name], "train")
        assert not np.array_equal(a.read_patch(0)[0], b.read_patch(0)[0])
    assert write_study_data(tmp_path / "own", 2, 2, 1, 1) == own  # the same data: kept as it is
    with pytest.raises(DataError, match="seed=101,.* not synthetic:scene=structured,seed=1101"):
        write_study_data(tmp_path / "own", 2, 2, 1, 1, data_seed=1)


@pytest.mark.parametrize("argv, message", [
    (["--arms", "random_init mae"], "--arms mae"),
    (["--seeds", ""], "--seeds must not be empty"),
    (["--finetune_fractions", "0"], "every fraction must lie in"),
    (["--dataset", "benv1"], "--dataset benv1 needs --data_path"),
    (["--probe_pooling", "median"], "--probe_pooling median: expected one of mean, meanmax, stages"),
    (["--data_seed", "-1"], "--data_seed -1: expected an integer >= 0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    assert study.main(["--out", str(tmp_path), "--scale", "smoke", *argv]) == 2
    assert message in capsys.readouterr().err


def test_finetune_epochs_grow_for_small_fractions_up_to_four_times():
    scale = study_config.Scale(finetune_epochs=4)
    assert [study_config.finetune_epochs(scale, f) for f in (1.0, 0.5, 0.125, 0.01)] == [4, 8, 16, 16]


def test_probe_rows_of_an_arm_are_reused_only_for_the_same_fractions_and_seeds(tmp_path):
    scale = dataclasses.replace(study_config.SCALES["smoke"], arms=(study_config.HANDCRAFTED,))
    s = study_config.Study(out=tmp_path, scale=scale)
    rows = [{"arm": study_config.HANDCRAFTED, "protocol": "linear", "fraction": f, "seed": 0, "n_labels": 1,
             "mAP_macro": 0.5, "mAP_micro": 0.5} for f in scale.probe_fractions]
    (tmp_path / "probes").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "probes" / f"{study_config.HANDCRAFTED}.csv", index=False)
    assert study_probes.probe_all(s, {}) == rows  # nothing fitted: no data needed
    s.scale = dataclasses.replace(scale, seeds=(0, 1))
    with pytest.raises(KeyError):  # other seeds: fitted again, which needs the study's data
        study_probes.probe_all(s, {})
