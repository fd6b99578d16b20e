"""A checkpoint loaded as a function of windows: raw dB windows in, one value per class or feature out.

``load_predictor`` reads a checkpoint safely (``weights_only=True``) and tells what it is:

- a ``main_finetune.py`` checkpoint of BigEarthNet (``ben``): the task's model, sigmoid class probabilities
  (multi-label), one per class of its label set;
- a ``main_finetune.py`` checkpoint of SEN12-FLOOD (``sen12flood``): the pair model on two dates, softmax
  probabilities of no flood and flood;
- a pretraining checkpoint (MixMIM or SimMIM, ``encoder``): the backbone's encoder, its final tokens
  averaged (the feature a finetuning head sees).

The task, backbone, input size and channels come from the checkpoint's recorded ``args``; a file that does
not record them (the released ones) is read from its tensors: the head size tells the task (2 outputs:
SEN12-FLOOD), the encoder's keys and shapes the backbone. Windows are normalised with the checkpoint's stored
statistics (``--stats`` for a file that has none), after a bilinear resize to the model's input size, as the
training data were (``sarwmix.data.patches.resize_db``, ``engine_finetune.prepare_input``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import backbones
from modes import MODES
from sarwmix.constants import CHANNELS, DATASET_STATS
from sarwmix.data.geotiff import PATCH_SIZE
from sarwmix.errors import CheckpointError, ConfigError
from tasks import TASKS, Task
from util.augment import normalize
from util.checkpoint import StoredArgs, checkpoint_args, load_checkpoint, model_state
from util.distributed import wants_cuda
from util.pretrained import PRETRAIN_ONLY, filter_state, load_pretrained

log = logging.getLogger("sarwmix")
ENCODER = "encoder"  # what a pretraining checkpoint predicts: no task, the encoder's pooled embedding


@dataclass
class Predictor:
    """A model ready for windows.

    Attributes:
        task: the finetuning task of the model (``tasks.Task``), None for a pretraining checkpoint's encoder.
        names: one per output value (class names, or ``embedding_<k>``).
        channels: the model's input channels; ``channel_index``: their positions in ``CHANNELS``.
        input_size: side the windows are resized to; ``default_window``: the window side read by default.
    """

    task: Task | None
    model: nn.Module
    model_name: str
    names: list[str]
    channels: tuple[str, ...]
    input_size: int
    default_window: int
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def kind(self) -> str:
        return kind_of(self.task)

    @property
    def title(self) -> str:
        return title(self.kind)

    @property
    def dates(self) -> int:
        """Images per window (2 for SEN12-FLOOD pairs)."""
        return self.task.dates if self.task is not None else 1

    @property
    def channel_index(self) -> list[int]:
        return [CHANNELS.index(c) for c in self.channels]

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """(B, dates, C, S, S) raw dB (``channels`` order) -> (B, len(names)) float32."""
        x = torch.from_numpy(windows).to(self.device, non_blocking=True).float()
        b, dates, c, h, w = x.shape
        x = x.view(b * dates, c, h, w)
        if (h, w) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=False)
        x = normalize(x, self.mean, self.std)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            if self.task is None:
                out = self.model.forward_features(x).float().mean(dim=1)
            else:
                out = self.task.probabilities(self.model(x.view(b, dates, c, *x.shape[-2:]) if dates > 1 else x)
                                              .float())
        return out.cpu().numpy()


def kind_of(task: Task | None) -> str:
    """What a model predicts, by name: its task's, or ``encoder`` for a pretraining checkpoint's encoder."""
    return task.name if task is not None else ENCODER


def title(kind: str) -> str:
    """What a task name (or ``encoder``) stands for, in messages."""
    return TASKS[kind].title if kind in TASKS else "pretrained encoder"


def checkpoint_task(state: dict[str, torch.Tensor], args: StoredArgs, path: str | Path) -> Task | None:
    """The task of a finetuned checkpoint (recorded, else the one whose class counts fit its head), or None for
    a pretraining checkpoint (its encoder gives embeddings)."""
    keys = [k.removeprefix("module.") for k in state]
    if "head.weight" in keys:
        if args.get("task") in TASKS:
            return TASKS[args.get("task")]
        outputs = state[next(k for k in state if k.endswith("head.weight"))].shape[0]
        single = next(t for t in TASKS.values() if t.dates == 1)  # a head of another size: one image per window
        return next((t for t in TASKS.values() if outputs in t.class_counts), single)
    if any(PRETRAIN_ONLY.match(k) for k in keys) or args.get("mode") in MODES:
        return None
    raise CheckpointError(f"{path}: neither a finetuned model (no head.weight) nor a pretraining checkpoint (no "
                          f"decoder or mask token); expected a main_finetune.py or main_pretrain.py checkpoint")


def _in_chans(state: dict[str, torch.Tensor], args: StoredArgs, path: str | Path) -> int:
    """Input channels: as recorded, else from the Swin's patch-embedding convolution (released files)."""
    if args.channels is not None:
        return len(args.channels)
    proj = next((v for k, v in state.items() if k.endswith("patch_embed.proj.weight")), None)
    if proj is None or proj.ndim != 4:
        raise CheckpointError(f"{path}: records no channels and has no patch-embedding convolution "
                              f"(patch_embed.proj.weight) to read them from; not a model of this project?")
    return int(proj.shape[1])


def _channels(args: StoredArgs, in_chans: int, path: str | Path) -> tuple[str, ...]:
    channels = args.channels or (CHANNELS if in_chans == len(CHANNELS) else None)
    if channels is None or len(channels) != in_chans or not set(channels) <= set(CHANNELS):
        raise CheckpointError(f"{path}: takes {in_chans} channel(s) but records channels {channels}; expected a "
                              f"subset of {' '.join(CHANNELS)}")
    return tuple(channels)


def _stats(ckpt: dict, stats: str | None, channels: tuple[str, ...], path: str | Path) -> tuple[list, list]:
    """(mean, std) in dB of ``channels``: the checkpoint's, or the named data set's when it has none."""
    stored = ckpt.get("stats")
    if isinstance(stored, dict) and "mean" in stored and "std" in stored:
        if stats is not None:
            log.warning("--stats %s ignored: %s records its own statistics (%s)", stats, path, stored.get("name"))
        return list(stored["mean"]), list(stored["std"])
    if stats is None:
        raise CheckpointError(f"{path}: records no normalisation statistics (a released checkpoint?): pass --stats "
                              f"benv1 (BigEarthNet v1 and SEN12-FLOOD models) or --stats benv2")
    if stats not in DATASET_STATS:
        raise ConfigError(f"--stats {stats!r}: expected one of {list(DATASET_STATS)}")
    idx = [CHANNELS.index(c) for c in channels]
    return [DATASET_STATS[stats]["mean"][i] for i in idx], [DATASET_STATS[stats]["std"][i] for i in idx]


def _backbone_name(args: StoredArgs, state: dict[str, torch.Tensor], in_chans: int, size: int) -> str:
    if args.model in backbones.BACKBONES:
        return args.model
    return backbones.infer_swin_name(filter_state(state, keep_head=False)[0], in_chans, size)


def build_model(task: Task | None, name: str, args: StoredArgs, state: dict, in_chans: int, path: str | Path
                ) -> tuple[nn.Module, int, list[str]]:
    """The model of a checkpoint with its weights, its input size and output names."""
    if task is None:
        size = args.input_size or 128
        bb = backbones.get(name, "finetune")
        if bb.timm_name is not None:
            raise CheckpointError(f"{path}: embeddings of the timm backbone {name} are not supported; use a "
                                  f"{', '.join(backbones.names('mixmim'))} or ViT checkpoint")
        model = bb.encoder(size, in_chans)
        load_pretrained(model, state, path)
        with torch.inference_mode():
            dim = model.forward_features(torch.zeros(1, in_chans, size, size)).shape[-1]
        return model, size, [f"embedding_{k}" for k in range(dim)]
    size = args.input_size or task.default_input_size
    config = SimpleNamespace(model=name, input_size=size, tile_size=args.get("tile_size") or 128,
                             patch_op=args.get("patch_op") or "avg")
    n_classes = int(state[next(k for k in state if k.endswith("head.weight"))].shape[0])
    model = task.finetune_model(config, n_classes, in_chans=in_chans, drop_path_rate=0.0)
    load_pretrained(model, state, path, keep_head=True)
    return model, size, task.class_names(n_classes)


def load_predictor(path: str | Path, *, task: str | None = None, stats: str | None = None,
                   sha256: str | None = None, device: str = "auto", amp: str = "auto") -> Predictor:
    """Read a checkpoint and build its predictor.

    Args:
        task: what the checkpoint must be (``ben``, ``sen12flood``, ``encoder``); a checkpoint of another kind
            is a CheckpointError. None: whatever it is.
        stats: ``DATASET_STATS`` key used only when the checkpoint records no statistics.
        device: ``auto`` (the GPU when there is one), ``cuda`` or ``cpu``; amp: ``auto`` (bf16 on a GPU),
            ``bf16`` or ``off``.
    """
    ckpt = load_checkpoint(path, sha256=sha256)
    state, args = model_state(ckpt, path), checkpoint_args(ckpt)
    found = checkpoint_task(state, args, path)
    kind = kind_of(found)
    if task is not None and task != kind:
        raise CheckpointError(f"{path}: a {title(kind)} checkpoint ({kind}), but --task {task} asks for a "
                              f"{title(task)} one")
    in_chans = _in_chans(state, args, path)
    channels = _channels(args, in_chans, path)
    mean, std = _stats(ckpt, stats, channels, path)
    name = _backbone_name(args, state, in_chans, args.input_size or 128)
    model, size, names = build_model(found, name, args, state, in_chans, path)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    dev = torch.device("cuda" if wants_cuda(device) else "cpu")
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and dev.type == "cuda") else None
    window = found.scene_window(size) if found is not None else PATCH_SIZE
    return Predictor(found, model.to(dev).eval(), name, names, channels, size, window,
                     torch.tensor(mean, device=dev), torch.tensor(std, device=dev), dev, amp_dtype)
