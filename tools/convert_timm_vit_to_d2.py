#!/usr/bin/env python
"""Convert a timm ``VisionTransformer`` checkpoint into a detectron2 checkpoint for the ``D2ViT`` backbone.

Usage::

    python tools/convert_timm_vit_to_d2.py vit_base_patch16_384.safetensors vit_b16_384_d2.pkl
    python tools/convert_timm_vit_to_d2.py vit_base_patch16_224.pth vit_b16_d2.pkl --pretrain-img-size 512

Input: a timm ViT state dict (``.pth``/``.pt``/``.bin`` via ``torch.load``, or ``.safetensors``), bare or
wrapped under ``"state_dict"``/``"model"``, with an optional ``module.`` prefix. D2ViT uses timm's parameter
names, so the conversion only adds the ``--prefix`` (default ``backbone.``, the attribute name of the
backbone in detectron2 meta-architectures; timm names such as ``norm.weight`` are too generic for
detectron2's suffix matching without it: use ``--prefix ""`` only to load into a bare backbone). The
classifier (``head.*``, ``fc_norm.*``) is dropped. Blocks deeper than the model's deepest
MODEL.VIT.OUT_BLOCKS, and ``norm`` when MODEL.VIT.FINAL_NORM is off, are kept in the file and ignored
when loading. timm variants with parts D2ViT lacks (layer scale, register tokens, qk-norm, pre-norm, no
class token, position embedding without the class entry) are refused with the offending keys listed.

Position embedding: the file stores a square grid for one image size. Set MODEL.VIT.PRETRAIN_IMG_SIZE to
the size this script reports, or pass ``--pretrain-img-size`` to resample the grid here (bicubic, as
D2ViT does at run time). Loading a file whose grid differs from the config ends in an error naming the
key instead of a silently random ``pos_embed``.

Output: ``.pkl`` (``{"model": {name: numpy array}, "__author__": "qsegformers", "matching_heuristics":
True}``) or ``.pth`` (the same with tensors, loadable with ``torch.load(weights_only=True)``), for
``MODEL.WEIGHTS``. Image normalisation is the pretraining one, e.g. AugReg: INPUT.FORMAT "RGB",
MODEL.PIXEL_MEAN = MODEL.PIXEL_STD = [127.5, 127.5, 127.5].
"""
import argparse
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

from qsegformers.backbones.vit import NUM_PREFIX_TOKENS, interpolate_pos_embed
from qsegformers.utils.checkpoint_files import load_flat_state_dict, save_d2_checkpoint

logger = logging.getLogger("convert_timm_vit_to_d2")

DEFAULT_PREFIX = "backbone."
DROPPED_PREFIXES = ("head.", "head_drop.", "fc_norm.")  # image-classification head
SUPPORTED_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)




def convert_timm_vit(
    state_dict: Dict[str, torch.Tensor], *, pretrain_img_size: Optional[int] = None, prefix: str = DEFAULT_PREFIX
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Map timm ViT weights to D2ViT names.

    Args:
        state_dict: timm ``VisionTransformer`` state dict.
        pretrain_img_size: if given, resample ``pos_embed`` to a (size / patch)^2 grid.
        prefix: prepended to every name.
    Returns:
        (converted state dict, the MODEL.VIT values the weights need: PATCH_SIZE, EMBED_DIM, DEPTH,
        PRETRAIN_IMG_SIZE).
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    unsupported = sorted(k for k in kept if not SUPPORTED_KEY.match(k))
    if unsupported:
        raise ValueError(f"Not a plain timm ViT that D2ViT can load; unsupported keys: {unsupported}")
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in kept:
            raise ValueError(f"The checkpoint lacks {required!r}; D2ViT needs a timm ViT with a class token")
    embed_dim, _, patch_h, patch_w = kept["patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise ValueError(f"Non-square patches {patch_h}x{patch_w} are not supported")
    grid_entries = kept["pos_embed"].shape[1] - NUM_PREFIX_TOKENS
    grid = int(round(grid_entries**0.5))
    if grid * grid != grid_entries:
        raise ValueError(
            f"pos_embed has {kept['pos_embed'].shape[1]} entries, not 1 class entry + a square grid "
            "(timm models with no_embed_class or a non-square image size are not supported)"
        )
    if pretrain_img_size is not None:
        if pretrain_img_size % patch_h:
            raise ValueError(f"--pretrain-img-size {pretrain_img_size} is not a multiple of the patch size {patch_h}")
        grid = pretrain_img_size // patch_h
        kept["pos_embed"] = interpolate_pos_embed(kept["pos_embed"].float(), (grid, grid))
    depth = len({int(k.split(".")[1]) for k in kept if k.startswith("blocks.")})
    settings = {"PATCH_SIZE": patch_h, "EMBED_DIM": embed_dim, "DEPTH": depth, "PRETRAIN_IMG_SIZE": grid * patch_h}
    return {prefix + k: v.detach().clone() for k, v in kept.items()}, settings




def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="timm ViT checkpoint (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument("--pretrain-img-size", type=int, default=None, help="resample pos_embed to this image size")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="prepended to every name (default: backbone.)")
    args = parser.parse_args(argv)
    if not args.output.endswith((".pkl", ".pth")):
        parser.error(f"output {args.output!r} must end in .pkl or .pth")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"No checkpoint file at {args.input}")
    converted, settings = convert_timm_vit(
        load_flat_state_dict(args.input), pretrain_img_size=args.pretrain_img_size, prefix=args.prefix
    )
    save_d2_checkpoint(converted, args.output)
    logger.info("Wrote %d tensors to %s (classifier head dropped)", len(converted), args.output)
    logger.info("Use: %s", " ".join(f"MODEL.VIT.{k} {v}" for k, v in settings.items()))
    return settings


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
