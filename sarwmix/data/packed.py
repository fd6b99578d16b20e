"""Converters to the packed format (``sarwmix.data.packed_format``) and their command line.

    python -m sarwmix.data.packed convert --source benv1 /data/BigEarthNet-S1-v1.0 /data/benv1_packed
    python -m sarwmix.data.packed convert --source synthetic /tmp/packed --n 512

``packed.json`` is written last, so a folder without it is incomplete.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sarwmix.cli import ArgumentParser, count
from sarwmix.data.datasets import DATASETS, build_dataset, dataset_names
from sarwmix.data.packed_format import PACKED_SPLITS, PackedWriter, read_meta
from sarwmix.data.patches import PatchDataset
from sarwmix.data.synthetic import convert_synthetic
from sarwmix.errors import ConfigError, DataError, SarwmixError

logger = logging.getLogger(__name__)



class _RawItems(torch.utils.data.Dataset):
    """Full-size items of a reader for conversion: bad patches become None (if skipped) instead of
    being replaced by a neighbour, so the packed copy holds no duplicates."""

    def __init__(self, reader: PatchDataset, skip_bad: bool) -> None:
        self.reader, self.skip_bad = reader, skip_bad

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        try:
            sar_db, target = self.reader.read_patch(i)
        except DataError as err:
            if not self.skip_bad:
                raise
            logger.warning("convert: skipped %s: %s", self.reader.names[i], err)
            return None
        return self.reader.names[i], sar_db, target


def convert(source: str, src: str | Path, out: str | Path, *, splits: tuple[str, ...] = PACKED_SPLITS,
            dtype: str = "float32", shard_size: int = 4096, num_workers: int = 0, skip_bad: bool = False,
            include_snow_cloud: bool = False, split_file: str | None = None) -> Path:
    """Pack splits of a BigEarthNet source (v1 sources keep 43-class labels, v2 sources 19).

    Returns:
        the packed folder.
    """
    spec = DATASETS.get(source)
    if spec is None or spec.pack_label_set is None:
        raise ConfigError(f"--source {source!r}: expected one of {sources()}")
    writer = PackedWriter(out, dtype, shard_size)
    label_set = spec.pack_label_set
    skipped = 0
    for split in splits:
        reader = build_dataset(source, data_path=str(src), split=split, input_size=120, split_file=split_file,
                               include_snow_cloud=include_snow_cloud, label_set=label_set)
        loader = torch.utils.data.DataLoader(_RawItems(reader, skip_bad), batch_size=64, shuffle=False,
                                             num_workers=num_workers, collate_fn=list)
        for batch in tqdm(loader, desc=f"pack {split}", unit="batch"):
            for item in batch:
                if item is None:
                    skipped += 1
                    continue
                writer.add(item[0], "val" if split == "validation" else split, item[1], item[2])
    if skipped:
        logger.warning("convert: %d bad patches skipped (listed above)", skipped)
    return writer.close(stats=spec.pack_stats, source=f"{source}:{src}")


def sources() -> tuple[str, ...]:
    """What ``convert --source`` takes: the data sets that can be packed, and the synthetic generator."""
    return dataset_names(synthetic=True) + tuple(n for n, s in DATASETS.items() if s.pack_label_set is not None)


def main(argv: list[str] | None = None) -> int:
    """``python -m sarwmix.data.packed convert --source SOURCE [SRC] OUT [options]``."""
    parser = ArgumentParser(prog="python -m sarwmix.data.packed", description="Build a packed data set.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("convert", help="convert a source format (or synthetic data) to packed")
    cmd.add_argument("--source", required=True, choices=sources())
    cmd.add_argument("paths", nargs="+", metavar="SRC OUT", help="source folder and output folder "
                     "(synthetic: output folder only)")
    cmd.add_argument("--split", nargs="+", default=list(PACKED_SPLITS), choices=PACKED_SPLITS)
    cmd.add_argument("--split_file", default=None, help="v1: split list; v2: metadata parquet/CSV")
    cmd.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    cmd.add_argument("--shard_size", type=count(1), default=4096)
    cmd.add_argument("--num_workers", type=count(0), default=0, help="reader processes")
    cmd.add_argument("--skip_bad", action="store_true", help="skip and count bad patches")
    cmd.add_argument("--include_snow_cloud", action="store_true")
    cmd.add_argument("--n", type=count(1), default=512, help="synthetic: number of patches")
    cmd.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        generated = DATASETS[args.source].synthetic
        if len(args.paths) != (1 if generated else 2):
            raise ConfigError(f"--source {args.source}: expected {'OUT' if generated else 'SRC OUT'}"
                              f", got {args.paths}")
        if generated:
            out = convert_synthetic(args.paths[0], args.n, args.seed, args.dtype, args.shard_size)
        else:
            out = convert(args.source, args.paths[0], args.paths[1], splits=tuple(args.split), dtype=args.dtype,
                          shard_size=args.shard_size, num_workers=args.num_workers, skip_bad=args.skip_bad,
                          include_snow_cloud=args.include_snow_cloud, split_file=args.split_file)
    except SarwmixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = read_meta(out)
    print(f"{out}: {meta['n']} patches {meta['splits']} in {len(meta['shards'])} shard(s), {meta['dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
