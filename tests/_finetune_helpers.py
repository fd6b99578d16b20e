"""Helpers of the finetuning tests: released-format checkpoints from the compat manifests, SEN12 pairs.

A "released-format" checkpoint is what users hold: ``{"model", "optimizer", "epoch", "scaler",
"args"}`` with ``args`` an ``argparse.Namespace``. The tensors here are random (seeded); only names,
shapes and dtypes come from the manifests in ``tests/data/compat``. ``relative_position_index`` entries get
Swin's real index for their window, so a model that loads them still computes a valid forward pass.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from conftest import COMPAT

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Entries ``(key, shape, dtype)`` of ``tests/data/compat/<name>.json``."""
    data = json.loads((COMPAT / f"{name}.json").read_text())
    return [(k, tuple(shape), dtype) for k, shape, dtype in data["entries"]]


def state_from_manifest(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict with exactly the keys, shapes and dtypes of a manifest."""
    from util.pos_embed import relative_position_index

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in manifest(name):
        if key.endswith("relative_position_index"):
            state[key] = relative_position_index(math.isqrt(shape[0]))
        else:
            state[key] = (torch.randn(shape, generator=g) * 0.02).to(DTYPES[dtype])
    return state


def released_checkpoint(path: Path, state: dict[str, torch.Tensor], epoch: int, **args) -> Path:
    """Save ``state`` the way the released files are: Namespace args, int epoch, optimizer dict."""
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch, "scaler": None,
            "args": argparse.Namespace(**args)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_sen12_pairs(root: Path, pairs: dict[str, list[tuple[str, int]]], seed: int = 0) -> Path:
    """Write SEN12-FLOOD pair files ``<root>/<split>/<seq>__<f1>__<f2>__<label>.npy``.

    Args:
        pairs: split -> list of (sequence, label). Each pair is float32 (2, 2, 512, 512) linear power
            (about -19 / -12 dB for VH / VV); a flooded second date is darker over a block.
    """
    rng = np.random.default_rng(seed)
    for split, items in pairs.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for k, (seq, label) in enumerate(items):
            level = np.array([0.012, 0.056], np.float32)[None, :, None, None]
            pair = level * rng.gamma(4.4, 1 / 4.4, size=(2, 2, 512, 512)).astype(np.float32)
            if label:
                pair[1, :, 128:384, 64:448] *= 0.08  # open water on the second date
            np.save(folder / f"{seq}__S1A_{k}a__S1A_{k}b__{label}.npy", pair)
    return root


# --- a 2-process evaluation (spawned workers import this light module, not the test module) ----------

def toy_dataset(n: int = 7) -> torch.utils.data.TensorDataset:
    """``n`` samples of (2, 4, 4) inputs and 3-class multi-hot targets (7: the two ranks get 4 and 3)."""
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 2, 4, 4, generator=g),
                                          (torch.rand(n, 3, generator=g) > 0.5).float())


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))


def eval_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """Worker of ``mp.spawn``: evaluate this rank's shard of 7 and of 1 sample (rank 1 gets none); rank 0
    writes the gathered metrics as JSON ``[metrics of 7, metrics of 1]``."""
    import engine_finetune as E

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for n in (7, 1):
        loader = E.eval_loader(toy_dataset(n), batch_size=2, num_workers=0, world_size=world, rank=rank)
        results.append(E.evaluate(toy_model(), loader, torch.device("cpu"), "ben", [0.0, 0.0], [1.0, 1.0]))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
