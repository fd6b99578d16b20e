"""Export the pretrained encoder of a checkpoint for finetuning elsewhere.

    python -m util.export_backbone output_dir/checkpoint.pth backbone.pth

Works for MixMIM and SimMIM pretraining checkpoints (this project's, or the released ``checkpoint_64.pth``)
and writes plain state dicts (``torch.load`` + ``load_state_dict(strict=True)``):

- timm Swin backbones (SimMIM): ``OUT`` holds the layout of
  ``timm.create_model(name, pretrained=False, in_chans=C, img_size=S, features_only=True)``
  (``patch_embed.*``, ``layers_<i>.*``; that model has no final norm), and ``OUT`` with the suffix ``_full``
  the layout of the same call with ``num_classes=0`` instead of ``features_only`` (``layers.<i>.*``,
  ``norm.*``). One file cannot serve both: timm renames ``layers.<i>`` to ``layers_<i>`` and drops the final
  norm in its feature-extraction wrapper.
- the project's Swin (``mixmim_*``): the ``SwinEncoder`` state (``patch_embed.*``, ``absolute_pos_embed``,
  ``layers.*``, ``norm.*``), i.e. a finetune model's state without its head.
- the plain ViT (``vit_*``): the ``models_vit.VisionTransformer`` state without head.

What each backbone exports is its entry of ``backbones.BACKBONES`` (``backbones.export_checkpoint``); this
module is the command line. A training run in SimMIM mode writes the same files under
``<output_dir>/backbone/``: ``backbone_final.pth`` at the end and ``backbone_epoch<N>.pth`` every
``--save_freq`` epochs.
"""
from __future__ import annotations

import sys

from backbones import export_checkpoint
from sarwmix.cli import ArgumentParser
from sarwmix.errors import SarwmixError


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser("python -m util.export_backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (checkpoint.pth, checkpoint_<N>.pth)")
    p.add_argument("out", help="output file, e.g. backbone.pth (timm backbones also get <stem>_full.pth)")
    a = p.parse_args(argv)
    try:
        for path in export_checkpoint(a.checkpoint, a.out):
            print(path)
    except SarwmixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
