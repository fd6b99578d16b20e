"""The study's data: structured synthetic patches written once in the packed format.

Two packed folders, so that pretraining never sees a labelled evaluation patch:

- ``pretrain/``: ``n_pretrain`` unlabelled-use patches (split ``train``);
- ``labelled/``: ``n_train`` / ``n_val`` / ``n_test`` patches (splits ``train`` / ``val`` / ``test``).

Patch ``i`` of a folder with base seed ``s`` is ``generate_patch(s * 1_000_003 + i, scene=...)``, so the
folders are reproducible bit for bit and disjoint for distinct base seeds. Generation runs in worker
processes (about 10 ms a patch per core); reading a packed patch afterwards costs microseconds.
"""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np

from sarwmix.data.bigearthnetv1 import target_from_names
from sarwmix.data.packed_format import PackedWriter
from sarwmix.data.synthetic import generate_patch
from sarwmix.errors import DataError

PRETRAIN_SEED, LABELLED_SEED = 101, 202
DATA_SEED_STRIDE = 1000  # base seeds of --data_seed N: 101 + 1000 N and 202 + 1000 N, never another's


def _generate(job: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(seed, scene) -> (sar_db float32 (2, 120, 120), 43-class multi-hot uint8 (43,))."""
    seed, scene = job
    sar_db, _, labels = generate_patch(seed, scene=scene)
    return sar_db, target_from_names(labels, 43, "synthetic")


def write_packed(out: Path, splits: dict[str, int], base_seed: int, scene: str, workers: int = 1) -> Path:
    """Write ``splits`` (name -> count, in order) of seeded synthetic patches as one packed folder.

    Returns:
        ``out``; an existing finished folder (``packed.json`` present) of the same seeds and sizes is kept as it
        is, one of other data is refused (DataError naming both).
    """
    source = f"synthetic:scene={scene},seed={base_seed},splits={splits}"
    done = Path(out) / "packed.json"
    if done.is_file():
        found = json.loads(done.read_text()).get("source")
        if found != source:
            raise DataError(f"{out} holds {found}, not {source}: another study's data (a different --data_seed "
                            f"or size); choose another --out or delete the folder")
        return Path(out)
    names = [(split, i) for split, count in splits.items() for i in range(count)]
    offsets = np.cumsum([0, *splits.values()])
    jobs = [(base_seed * 1_000_003 + k, scene) for k in range(int(offsets[-1]))]
    writer = PackedWriter(out)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, workers)) if workers > 1 else _Serial() as pool:
        for (split, i), (sar_db, target) in zip(names, pool.imap(_generate, jobs, chunksize=16), strict=True):
            writer.add(f"synthetic_{scene}_{base_seed}_{split}_{i}", split, sar_db, target)
    return writer.close(stats="benv1", source=source)


class _Serial:
    """``multiprocessing.Pool`` stand-in for one worker (no process start-up)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap(fn, jobs, chunksize: int = 1):
        return map(fn, jobs)


def write_study_data(root: Path, n_pretrain: int, n_train: int, n_val: int, n_test: int,
                     scene: str = "structured", workers: int = 1, data_seed: int = 0) -> dict[str, Path]:
    """The two packed folders of the study under ``root``: ``{"pretrain": ..., "labelled": ...}``.

    ``data_seed`` draws another, disjoint set of scenes (0: the study's own); a replication on fresh data."""
    offset = DATA_SEED_STRIDE * data_seed
    return {"pretrain": write_packed(Path(root) / "pretrain", {"train": n_pretrain}, PRETRAIN_SEED + offset,
                                     scene, workers),
            "labelled": write_packed(Path(root) / "labelled", {"train": n_train, "val": n_val, "test": n_test},
                                     LABELLED_SEED + offset, scene, workers)}
