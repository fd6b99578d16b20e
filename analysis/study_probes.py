"""The study's frozen-feature protocols: pooled features of each arm's encoder (extracted once, cached), the
hand-crafted floor, linear probe and k-NN per labelled fraction and seed, and the probe curves of the
pretraining checkpoints. Torch and the models are imported inside the functions, so that the driver's
process imports them only when a step needs them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.study_config import HANDCRAFTED, RANDOM_INIT, Study


def limit_own_threads(study: Study) -> int | None:
    """Torch threads of the driver's own steps (features, probes): ``--jobs`` x ``--threads``, the cores the
    runs side by side were given, when ``--threads`` is set; else torch's default. Without it two drivers on
    one machine each take every core, and the small L-BFGS solves of the probes crawl. Returns the count set."""
    if not study.threads:
        return None
    import torch

    torch.set_num_threads(max(1, study.jobs) * study.threads)
    return torch.get_num_threads()


def probe_curves(study: Study, ckpts: dict[str, Path], n_max: int = 512) -> pd.DataFrame:
    """k-NN and linear-probe mAP of every epoch's checkpoint of every arm (``probe_curves.csv``).

    On the first ``n_max`` labelled train and test patches, as the pretraining monitor measures them; the
    random-init encoder of seed 0 is epoch 0 of the ``random_init`` row. Cached in ``probe_curves.csv``.
    """
    import torch

    from util.probe import pooled_features, probe_metrics

    cache = study.out / "probe_curves.csv"
    if cache.is_file():
        return pd.read_csv(cache)
    data = {split: labelled_split(study, split) for split in ("train", "test")}
    subsets = {k: torch.utils.data.Subset(v, range(min(n_max, len(v)))) for k, v in data.items()}
    points = [(RANDOM_INIT, 0, None)]
    for arm, ckpt in ckpts.items():
        for path in sorted(ckpt.parent.glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1])):
            points.append((arm, int(path.stem.split("_")[1]), path))
    rows = []
    for arm, epoch, path in points:
        model = load_encoder(study, path, 0)
        (tx, ty), (vx, vy) = (pooled_features(model, subsets[k], data[k].stats["mean"], data[k].stats["std"],
                                              pooling=study.scale.probe_pooling)
                              for k in ("train", "test"))
        rows.append({"arm": arm, "epoch": epoch, **probe_metrics(tx, ty, vx, vy, c=study.scale.probe_c)})
    table = pd.DataFrame(rows)
    table.to_csv(cache, index=False, float_format="%.4f")
    return table


def labelled_split(study: Study, split: str):
    """The labelled data set of the study, one split, at 128 px."""
    from sarwmix.data.datasets import build_dataset

    dataset, path = study.data["labelled"]
    return build_dataset(dataset, data_path=path, split=split, input_size=study.scale.input_size)


def load_encoder(study: Study, ckpt: Path | None, seed: int):
    """The finetuning model of the study's encoder: pretrained weights from ``ckpt``, or a random init
    drawn from ``seed`` (None). Returns it in eval mode, on the CPU."""
    import torch

    from models_mixmim_ft import build_mixmim_ft
    from util.pretrained import load_pretrained_file

    torch.manual_seed(seed)
    model = build_mixmim_ft(study.scale.model, 19, img_size=study.scale.input_size)
    if ckpt is not None:
        load_pretrained_file(model, ckpt)
    return model.eval()


def features(study: Study, name: str, ckpt: Path | None, seed: int) -> dict[str, np.ndarray]:
    """Pooled features and targets of the labelled train and test splits (cached in ``features/``)."""
    cache = study.out / "features" / f"{name}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import torch

    from util.device import resolve_amp
    from util.probe import pooled_features

    model = load_encoder(study, ckpt, seed)
    device = "cuda" if study.device != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    amp = resolve_amp(study.amp, torch.device(device))
    out = {}
    for split in ("train", "test"):
        data = labelled_split(study, split)
        out[f"{split}_x"], out[f"{split}_y"] = pooled_features(model, data, data.stats["mean"], data.stats["std"],
                                                               device=device, num_workers=study.num_workers,
                                                               amp_dtype=amp, pooling=study.scale.probe_pooling)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def handcrafted(study: Study) -> dict[str, np.ndarray]:
    """Per-channel dB statistics and histograms of the labelled train and test splits (cached)."""
    cache = study.out / "features" / f"{HANDCRAFTED}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import torch

    from util.probe import handcrafted_features

    out = {}
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(labelled_split(study, split), batch_size=256,
                                             num_workers=study.num_workers)
        xs, ys = zip(*[(handcrafted_features(x.numpy()), y.numpy()) for x, y in loader], strict=True)
        out[f"{split}_x"], out[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def probe_rows(study: Study, arm: str, feats: dict[str, np.ndarray], seeds: tuple[int, ...]) -> list[dict]:
    """Linear-probe and k-NN test metrics of one feature set per labelled fraction and seed: mAP macro and
    micro, and the average precision of each class ``k`` as ``ap_k`` (NaN where the test split has no
    positive)."""
    from util.metrics import average_precision
    from util.probe import knn_scores, linear_probe_scores
    from util.subsets import fraction_indices

    rows = []
    n = len(feats["train_x"])
    for fraction in study.scale.probe_fractions:
        for seed in seeds:
            keep = fraction_indices(n, fraction, seed)
            x, y = feats["train_x"][keep], feats["train_y"][keep]
            scores = {"linear": linear_probe_scores(x, y, feats["test_x"], c=study.scale.probe_c, seed=seed,
                                                    solver=study.scale.probe_solver)}
            scores["knn"] = knn_scores(x, y, feats["test_x"], k=min(20, len(keep)))
            for protocol, score in scores.items():
                ap = average_precision(score, feats["test_y"])
                rows.append({"arm": arm, "protocol": protocol, "fraction": fraction, "seed": seed,
                             "n_labels": len(keep), "mAP_macro": ap["mAP_macro"], "mAP_micro": ap["mAP_micro"],
                             **{f"ap_{k}": v for k, v in enumerate(ap["per_class"])}})
    return rows


def probe_all(study: Study, ckpts: dict[str, Path]) -> list[dict]:
    """Probe rows of every arm: random init (one encoder per seed), pretrained arms, the floor.

    The rows of each arm are cached in ``probes/ARM.csv`` (a stopped study does not fit them again; a cache
    of other fractions or seeds is fitted again)."""
    rows = []
    wanted = {(float(f), int(s)) for f in study.scale.probe_fractions for s in study.scale.seeds}
    for arm in study.scale.arms:
        cache = study.out / "probes" / f"{arm}.csv"
        if cache.is_file():
            cached = pd.read_csv(cache)
            if set(zip(cached["fraction"].astype(float), cached["seed"].astype(int), strict=True)) == wanted:
                rows += cached.to_dict("records")
                continue
        if arm == RANDOM_INIT:
            arm_rows = []
            for seed in study.scale.seeds:  # each seed its own random encoder
                arm_rows += probe_rows(study, arm, features(study, f"{arm}_seed{seed}", None, seed), (seed,))
        elif arm == HANDCRAFTED:
            arm_rows = probe_rows(study, arm, handcrafted(study), study.scale.seeds)
        elif arm in ckpts:
            arm_rows = probe_rows(study, arm, features(study, arm, ckpts[arm], 0), study.scale.seeds)
        else:
            continue
        cache.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(arm_rows).to_csv(cache, index=False)
        rows += arm_rows
    return rows
