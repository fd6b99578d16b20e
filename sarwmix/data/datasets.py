"""The one table of data sets: a ``--dataset`` name -> everything the project knows about it (``DATASETS``).

Every data set returns ``(sar_db, target)``: raw dB float32 ``(C, input_size, input_size)`` in the channel
order of ``CHANNELS`` (or the requested subset) and a float32 multi-hot target (SEN12-FLOOD: a pair of dates
and a class index). Nothing here normalises or flips: the training engine does both on the device, from
``dataset.stats`` and a per-step seed, so a resumed run sees exactly the same augmentations.

An entry (``DatasetSpec``) says how to build the reader of a split (``build``), which finetuning task its labels
serve (``task``, a key of ``tasks.TASKS``), what the source calls its validation split, how a finetuning run's
``--split_file`` names the list of each split, whether it is generated (no data folder) or made of image pairs,
its synthetic writer (``python -m sarwmix.data.synthetic write --format``) and how it is packed
(``python -m sarwmix.data.packed convert --source``). Flag choices, the checks of the entry points and the
commands all ask this table; adding a data set is its reader module plus one entry
(docs/ARCHITECTURE.md shows one).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from sarwmix.constants import CHANNELS
from sarwmix.data import bigearthnetv1, bigearthnetv2
from sarwmix.data.packed_format import PackedDataset
from sarwmix.data.sen12flood_loader import Sen12FloodPairs
from sarwmix.data.sen12flood_synthetic import write_sen12flood
from sarwmix.data.synthetic import (
    SyntheticS1,
    convert_synthetic,
    write_benv1,
    write_benv1_zarr,
    write_benv2,
    write_benv2_lmdb,
)
from sarwmix.errors import ConfigError, table_entry

SPLITS: tuple[str, ...] = ("train", "val", "validation", "test")
# build(data_path, split, **options) -> the split's reader; the options are the keyword arguments of
# build_dataset (input_size, channels, split_file, num_samples, seed, include_snow_cloud, label_set, scene).
Builder = Callable[..., Dataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` choice.

    Attributes:
        build: the reader of one split (see ``Builder``); the split comes normalised (``val_split``).
        task: the finetuning task whose labels it holds (a key of ``tasks.TASKS``).
        val_split: what the source calls its validation split (``val``, or ``validation`` in v2 metadata).
        split_list: finetuning only: ``split_list(split_file, split)`` -> the list of that split, when one
            ``--split_file`` names a folder of per-split lists; None: ``--split_file`` is passed as it is.
        synthetic: generated from a seed (no data folder; ``--num_samples`` and ``--seed`` choose the items).
        pairs: items are pairs of dates (SEN12-FLOOD): every channel, no dB-statistics command.
        write: ``write(out, n, seed, scene)``, the seeded synthetic writer of this format, or None;
            ``write_note`` is printed after its count (what it leaves out).
        pack_label_set: the classes stored when packing this source (43 for v1, 19 for v2); None: not packed.
        pack_stats: the statistics the packed copy records (``benv1`` or ``benv2``).
    """

    build: Builder
    task: str = "ben"
    val_split: str = "val"
    split_list: Callable[[str, str], str] | None = None
    synthetic: bool = False
    pairs: bool = False
    write: Callable[..., object] | None = None
    write_note: str = ""
    pack_label_set: int | None = None
    pack_stats: str = "benv1"


# --- the readers, as builders -------------------------------------------------------------------------

def _synthetic(data_path, split: str, *, input_size: int, channels, num_samples, seed: int, scene: str,
               **_) -> Dataset:
    n = num_samples or (512 if split == "train" else 128)
    split_seed = {"train": 0, "val": 1, "test": 2}[split]
    return SyntheticS1(n=n, input_size=input_size, seed=3 * seed + split_seed, channels=channels, scene=scene)


def _sen12flood(data_path: str, split: str, *, channels, **_) -> Dataset:
    if tuple(channels) != CHANNELS:  # the pair files hold both polarisations of both dates
        raise ConfigError(f"dataset 'sen12flood' has channels {CHANNELS}; got {tuple(channels)}")
    return Sen12FloodPairs(root=data_path, split=split)


def _bigearthnet(cls: type, list_option: str, data_path: str, split: str, *, input_size: int, channels,
                 label_set: int, split_file, include_snow_cloud: bool, **_) -> Dataset:
    return cls(data_path, split, input_size=input_size, channels=tuple(channels), label_set=label_set,
               include_snow_cloud=include_snow_cloud, **{list_option: split_file})


def _packed(data_path: str, split: str, *, input_size: int, channels, label_set: int, **_) -> Dataset:
    return PackedDataset(data_path, split, input_size=input_size, channels=tuple(channels), label_set=label_set)


def _writer(write: Callable, out, n: int, seed: int, scene: str):
    return write(out, n, seed, scene=scene)


_V1 = {"split_list": bigearthnetv1.split_list, "pack_label_set": 43, "pack_stats": "benv1"}
_V2 = {"val_split": "validation", "pack_label_set": 19, "pack_stats": "benv2"}
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(_synthetic, synthetic=True),
    "benv1": DatasetSpec(partial(_bigearthnet, bigearthnetv1.BenV1Folder, "split_file"),
                         write=partial(_writer, write_benv1), **_V1),
    "benv1_zarr": DatasetSpec(partial(_bigearthnet, bigearthnetv1.BenV1Zarr, "split_file"),
                              write=partial(_writer, write_benv1_zarr), **_V1),
    "benv2": DatasetSpec(partial(_bigearthnet, bigearthnetv2.BenV2Folder, "metadata_file"),
                         write=partial(_writer, write_benv2), **_V2),
    "benv2_lmdb": DatasetSpec(partial(_bigearthnet, bigearthnetv2.BenV2Lmdb, "metadata_file"),
                              write=partial(_writer, write_benv2_lmdb), **_V2),
    "packed": DatasetSpec(_packed, write=partial(_writer, convert_synthetic),
                          write_note=" (snow/cloud-flagged ones left out)"),
    "sen12flood": DatasetSpec(_sen12flood, task="sen12flood", pairs=True,
                              write=lambda out, n, seed, scene: write_sen12flood(out, n, seed)),
}


# --- questions the rest of the project asks --------------------------------------------------------

def dataset_names(**having) -> tuple[str, ...]:
    """The data sets, or those whose fields have the given values (``dataset_names(pairs=False)``)."""
    return tuple(n for n, s in DATASETS.items() if all(getattr(s, k) == v for k, v in having.items()))


def dataset_spec(name: str) -> DatasetSpec:
    """The entry of ``name``; ConfigError listing the data sets when there is none."""
    return table_entry(DATASETS, name, "dataset")


def writable_formats() -> tuple[str, ...]:
    """The data sets with a synthetic writer (``python -m sarwmix.data.synthetic write --format``)."""
    return tuple(n for n, s in DATASETS.items() if s.write is not None)


def write_format(fmt: str, out: Path, n: int, seed: int = 0, scene: str = "mosaic") -> Path:
    """Write ``n`` seeded synthetic patches (or SEN12-FLOOD sequences) in format ``fmt`` under ``out``
    (``scene``: see ``sarwmix.data.synthetic.generate_patch``; SEN12-FLOOD sequences have their own generator)."""
    if fmt not in writable_formats():
        raise ConfigError(f"--format {fmt!r}: expected one of {writable_formats()}")
    if n < 1:
        raise ConfigError(f"--n {n}: expected at least 1")
    written = DATASETS[fmt].write(Path(out), n, seed, scene)
    return Path(written) if written is not None else Path(out)


def normalise_split(spec: DatasetSpec, split: str) -> str:
    """``val`` and ``validation`` as the source calls its validation split."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {SPLITS}")
    return spec.val_split if split in ("val", "validation") else split


def build_dataset(name: str, *, data_path: str | None, split: str, input_size: int,
                  channels: tuple[str, ...] = CHANNELS, split_file: str | None = None,
                  num_samples: int | None = None, seed: int = 0,
                  include_snow_cloud: bool = False, label_set: int = 19,
                  scene: str = "mosaic") -> Dataset:
    """Build any data set of the project by name.

    Args:
        name: a key of ``DATASETS``.
        data_path: data-set root (not needed for a synthetic one).
        split: ``train | val | validation | test``.
        input_size: side of the returned tensors (patches are resized bilinearly).
        channels: subset and order of ``CHANNELS``, e.g. ("VV",) for one-channel SimMIM.
        split_file: explicit split list (v1: S2 or S1 names, or two-column S2,S1 CSV) or metadata
            file (v2: parquet/CSV); default: found next to the data.
        num_samples: synthetic only: number of patches (default 512 train, 128 val/test).
        seed: synthetic only: base seed; each split uses a different one.
        include_snow_cloud: keep patches flagged with seasonal snow or cloud/shadow.
        label_set: 19 or 43 classes (43 only for v1-style sources).
        scene: synthetic only: ``mosaic`` or ``structured`` (``sarwmix.data.synthetic.generate_patch``).

    Returns:
        a ``torch.utils.data.Dataset`` with ``.stats`` and ``.num_classes``.
    """
    spec = dataset_spec(name)
    split = normalise_split(spec, split)
    if not spec.synthetic and not data_path:
        raise ConfigError(f"dataset {name!r} needs --data_path")
    return spec.build(data_path, split, input_size=input_size, channels=tuple(channels), split_file=split_file,
                      num_samples=num_samples, seed=seed, include_snow_cloud=include_snow_cloud,
                      label_set=label_set, scene=scene)
