"""What a pretraining study is: its arms, protocols and sizes (``Scale``), and where and how it runs (``Study``).

``analysis.study`` runs the steps; ``analysis.study_probes`` holds the frozen-feature protocols.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RANDOM_INIT, HANDCRAFTED = "random_init", "handcrafted"
# Pretraining arms: name -> main_pretrain.py flags. Every arm shares the encoder, data and budget.
ARMS: dict[str, list[str]] = {
    "mixmim_none": ["--weighting", "none"],
    "mixmim_per_channel": ["--weighting", "per_channel"],
    "mixmim_shared_avg": ["--weighting", "shared_avg"],
    "simmim": ["--mode", "simmim", "--weighting", "none"],
    "mixmim_per_channel_pct": ["--weighting", "per_channel", "--weight_norm", "percentile"],
    # The phase-free texture target (each hidden cell's log power spectrum) besides the pixels; its weight
    # was chosen on the validation split among 1, 4, 16, 64, 256 (docs/RESULTS.md).
    "mixmim_per_channel_spectral": ["--weighting", "per_channel", "--spectral_weight", "64"],
}
ALL_ARMS: tuple[str, ...] = (RANDOM_INIT, *ARMS, HANDCRAFTED)
PROTOCOLS: tuple[str, ...] = ("linear", "knn", "finetune")


@dataclasses.dataclass
class Scale:
    """Every size of a study; ``--scale`` picks one, flags override single fields."""

    model: str = "mixmim_study"
    input_size: int = 128
    arms: tuple[str, ...] = ALL_ARMS
    n_pretrain: int = 4096
    n_train: int = 1024
    n_val: int = 256
    n_test: int = 1024
    pretrain_epochs: int = 8
    pretrain_warmup: float = 1.0
    pretrain_lr: float | None = 1.5e-3  # absolute; None: --pretrain_blr scaled by the global batch
    pretrain_blr: float | None = None
    pretrain_batch: int = 64
    mask_ratio: float | None = None
    # Short runs: the standardised per-patch target drops each cell's level, which is half of what tells the
    # covers apart; without it the probe of the encoder rose faster (docs/RESULTS.md).
    norm_pix_loss: bool = False
    # At fraction 1.0; see finetune_epochs(). A random-init finetune with all labels still gained 0.1 mAP
    # between epochs 4 and 15 (README, Results): 4 epochs measured the schedule, not the encoder.
    finetune_epochs: int = 8
    finetune_lr: float | None = 1e-3
    finetune_blr: float | None = None
    finetune_batch: int = 16
    finetune_fractions: tuple[float, ...] = (1.0, 0.125)
    probe_fractions: tuple[float, ...] = (1.0, 0.125, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    probe_c: float = 0.1
    # Frozen features of the probes (util.probe.POOLINGS): the mean tokens of every stage, not only the
    # final 4x4 grid whose mean dilutes small covers; every arm, random init included, alike.
    probe_pooling: str = "stages"
    # Solver of the linear probe (util.probe.linear_probe_scores): ``torch`` solves the same problem for all
    # classes in one L-BFGS run, seconds where scikit-learn's 19 fits on 960 features took minutes.
    probe_solver: str = "torch"
    probe_samples: int = 512  # patches of the pretraining monitor (labelled validation split)


SCALES: dict[str, Scale] = {
    "smoke": Scale(model="mixmim_study", input_size=64, arms=(RANDOM_INIT, "mixmim_per_channel", HANDCRAFTED),
                   n_pretrain=32, n_train=32, n_val=16, n_test=32, pretrain_epochs=1, pretrain_batch=16,
                   finetune_epochs=1, finetune_batch=16, finetune_fractions=(1.0,), probe_fractions=(1.0, 0.5),
                   seeds=(0,), probe_solver="sklearn"),  # 32 patches: scikit-learn's fits take milliseconds
    "cpu": Scale(),
    # The paper's protocol: its model and data set are given with --model / --dataset / --data_path.
    "paper": Scale(model="mixmim_base", n_pretrain=0, n_train=0, n_val=0, n_test=0, pretrain_epochs=64,
                   pretrain_warmup=10, pretrain_lr=None, pretrain_blr=1.5e-4, pretrain_batch=128,
                   norm_pix_loss=True, finetune_epochs=50, finetune_lr=None, finetune_blr=5e-4, finetune_batch=64,
                   finetune_fractions=(1.0, 0.125, 0.01)),
}


def finetune_epochs(scale: Scale, fraction: float) -> int:
    """Epochs of a finetune run at ``fraction``: smaller subsets get more epochs (up to 4x), so that a run
    at 12.5 % takes half the updates of one at 100 % instead of one eighth."""
    return int(np.ceil(scale.finetune_epochs * min(4.0, 1.0 / fraction)))


@dataclasses.dataclass
class Study:
    """Where and how one study runs (from the command line)."""

    out: Path
    scale: Scale
    dataset: str = "synthetic"
    data_path: str | None = None
    launcher: tuple[str, ...] = (sys.executable,)
    jobs: int = 1
    threads: int = 0
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    pretrain_seed: int = 0
    data_seed: int = 0  # synthetic data: 0 the study's scenes, N > 0 a fresh disjoint draw
    extra_pretrain: tuple[str, ...] = ()
    extra_finetune: tuple[str, ...] = ()
    data: dict = dataclasses.field(default_factory=dict)

    def entry(self, script: str) -> list[str]:
        """The launcher followed by the path of an entry point of the repository."""
        return [*self.launcher, str(REPO / script)]

    def common_flags(self) -> list[str]:
        threads = ["--num_threads", str(self.threads)] if self.threads else []
        return ["--model", self.scale.model, "--input_size", str(self.scale.input_size), "--device", self.device,
                "--amp", self.amp, "--num_workers", str(self.num_workers), "--no-progress", *threads]
