"""Drop SEN12-FLOOD pairs with partial coverage: any channel of either date with >= 25 % exact zeros.

Exact zeros are the no-data of the S1 scenes (outside the swath, or outside the footprint after
alignment); a pair whose image is largely empty says nothing about a flood.
Pruned pairs are moved to ``OUT/_pruned/<split>/`` (or deleted with ``--delete``).

    python -m sarwmix.prep.sen12_prune_partial_pairs OUT [--threshold 0.25] [--dry_run] [--delete]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from sarwmix.cli import ArgumentParser
from sarwmix.errors import ConfigError, DataError, SarwmixError

PRUNED_DIR = "_pruned"
PAIR_SPLITS = ("train", "val", "test")


def zero_fractions(path: Path) -> np.ndarray:
    """Fraction of exact zeros of each (date, channel) image of a pair file.

    Returns:
        float64 ``(2, 2)``.

    Raises:
        DataError: the file is not a ``.npy`` array of shape ``(2, 2, H, W)``.
    """
    try:
        pair = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy pair file: {exc}") from exc
    if pair.ndim != 4 or pair.shape[:2] != (2, 2):
        raise DataError(f"{path} has shape {pair.shape}; expected (2 dates, 2 channels, H, W)")
    return (np.asarray(pair) == 0).mean(axis=(-2, -1))


def is_partial(path: Path, threshold: float = 0.25) -> bool:
    """True when any channel of either date has a zero fraction >= ``threshold``."""
    return bool((zero_fractions(path) >= threshold).any())


def prune_pairs(out: Path, threshold: float = 0.25, dry_run: bool = False,
                delete: bool = False) -> dict[str, dict[str, int]]:
    """Find partial-coverage pairs in ``out/{train,val,test}`` and move them away (or delete them).

    Args:
        out: the pair root written by ``sen12_data_prep``.
        threshold: zero fraction from which an image counts as partial, in (0, 1].
        dry_run: only count.
        delete: delete instead of moving to ``out/_pruned/<split>/``.

    Returns:
        ``{split: {"kept": n, "pruned": m}}`` for each split folder present.
    """
    out = Path(out)
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    splits = [s for s in PAIR_SPLITS if (out / s).is_dir()]
    if not splits:
        raise DataError(f"{out} has none of the split folders {PAIR_SPLITS}; expected sen12_data_prep output")
    counts = {}
    for split in splits:
        partial = [p for p in sorted((out / split).glob("*.npy")) if is_partial(p, threshold)]
        total = len(list((out / split).glob("*.npy")))
        counts[split] = {"kept": total - len(partial), "pruned": len(partial)}
        if dry_run:
            continue
        if not delete:
            (out / PRUNED_DIR / split).mkdir(parents=True, exist_ok=True)
        for path in partial:
            if delete:
                path.unlink()
            else:
                shutil.move(path, out / PRUNED_DIR / split / path.name)
    return counts


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Drop SEN12-FLOOD pairs with >= 25% zeros in a channel.")
    parser.add_argument("out", type=Path, help="pair root with train/ and test/ (sen12_data_prep output)")
    parser.add_argument("--threshold", type=float, default=0.25, help="zero fraction that makes a pair partial")
    parser.add_argument("--dry_run", action="store_true", help="only report the counts")
    parser.add_argument("--delete", action="store_true", help=f"delete instead of moving to OUT/{PRUNED_DIR}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        counts = prune_pairs(args.out, args.threshold, args.dry_run, args.delete)
    except SarwmixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "would prune" if args.dry_run else ("deleted" if args.delete else f"moved to {PRUNED_DIR}")
    for split, c in counts.items():
        print(f"{split}: kept {c['kept']}, {verb} {c['pruned']} pairs with >= {args.threshold:.0%} zeros")
    return 0


if __name__ == "__main__":
    sys.exit(main())
