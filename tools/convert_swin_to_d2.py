#!/usr/bin/env python
"""Convert an ImageNet Swin checkpoint (Microsoft or timm layout) for ``D2SwinTransformer`` / ``D2SeMaskSwinTransformer``.

Usage::

    python tools/convert_swin_to_d2.py swin_tiny_patch4_window7_224.pth swin_tiny_patch4_window7_224.pkl
    python tools/convert_swin_to_d2.py timm_swin_tiny.safetensors swin_tiny_d2.pkl

Input layouts (detected from the keys):

* Microsoft Swin (``{"model": state_dict}``, also what Mask2Former's and SeMask's READMEs point to as the
  ImageNet backbones): ``layers.{i}.downsample.*`` ends stage i (i < last), blocks may carry
  ``attn_mask`` buffers, plus ``norm.*`` and ``head.*``.
* timm (>= 0.9, incl. 1.0): ``layers.{i}.downsample.*`` *starts* stage i (i >= 1) and is moved to
  ``layers.{i-1}.downsample.*``; ``layers_{i}`` (features-only models) is read as ``layers.{i}``;
  ``relative_position_index`` is not stored by timm and is recomputed from the bias-table size; ``head.fc.*``.
  timm's PatchMerging concatenates the 2x2 neighbours in the same order as Microsoft's, so
  ``reduction``/``norm`` weights are copied unchanged (checked by tests/tools/test_convert_swin.py).

Dropped: the classifier (``head.*``), the final ``norm.*`` (ImageNet-only; the segmentation backbones have
per-stage norms instead) and ``attn_mask`` buffers (recomputed for every input size).

Loading the result reports exactly these missing keys, which is expected: the per-stage output norms
``norm0..norm3`` (new in the segmentation backbone, as in official Mask2Former), and for SeMask also every
``layers.{i}.semantic_layer.*`` parameter. No key is unexpected.

Output: ``.pkl`` (``{"model": {name: numpy array}, "__author__": "qsegformers", "matching_heuristics": True}``)
or ``.pth`` (the same with tensors), for ``MODEL.WEIGHTS``. Names carry no ``backbone.`` prefix by default,
like Mask2Former's converter: detectron2's checkpointer matches them by suffix (``--prefix backbone.`` gives
exact names instead). The script logs the MODEL.SWIN values the weights need.
"""
import argparse
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

from qsegformers.backbones.swin import relative_position_index
from qsegformers.utils.checkpoint_files import load_flat_state_dict, save_d2_checkpoint

logger = logging.getLogger("convert_swin_to_d2")

DEFAULT_PREFIX = ""
DROPPED = re.compile(r"^(head\..*|norm\.(weight|bias)|layers\.\d+\.blocks\.\d+\.attn_mask)$")
SUPPORTED_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)|absolute_pos_embed"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.(relative_position_bias_table|relative_position_index))$"
)
TIMM_STAGE = re.compile(r"^layers_(\d+)\.")
DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
BIAS_TABLE = re.compile(r"^(layers\.\d+\.blocks\.\d+\.attn\.)relative_position_bias_table$")




def is_timm_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    """timm puts PatchMerging at the start of stages 1..3 (no ``layers.0.downsample``); Microsoft at the end."""
    stages = {int(m.group(1)) for k in state_dict for m in [DOWNSAMPLE.match(k)] if m}
    return bool(stages) and 0 not in stages


def convert_swin(
    state_dict: Dict[str, torch.Tensor], *, prefix: str = DEFAULT_PREFIX
) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Map Microsoft or timm Swin weights to the D2SwinTransformer names.

    Returns (converted state dict, the MODEL.SWIN values the weights imply: EMBED_DIM, DEPTHS, NUM_HEADS,
    WINDOW_SIZE, PATCH_SIZE).
    """
    renamed = {TIMM_STAGE.sub(lambda m: f"layers.{m.group(1)}.", k): v for k, v in state_dict.items()}
    timm_layout = is_timm_layout(renamed)
    kept = {}
    for key, value in renamed.items():
        if DROPPED.match(key):
            continue
        match = DOWNSAMPLE.match(key)
        if timm_layout and match:
            stage = int(match.group(1))
            key = f"layers.{stage - 1}.downsample." + key[match.end() :]
        kept[key] = value
    unsupported = sorted(k for k in kept if not SUPPORTED_KEY.match(k))
    if unsupported:
        raise ValueError(f"Not a Swin (v1) checkpoint this converter knows; unsupported keys: {unsupported}")
    if "patch_embed.proj.weight" not in kept:
        raise ValueError("The checkpoint lacks 'patch_embed.proj.weight'; is it a Swin backbone?")
    window = None
    for key in [k for k in kept if BIAS_TABLE.match(k)]:
        table_rows, _ = kept[key].shape
        window = (int(round(table_rows**0.5)) + 1) // 2
        index_key = BIAS_TABLE.match(key).group(1) + "relative_position_index"
        kept.setdefault(index_key, relative_position_index(window))
    embed_dim, _, patch_size, _ = kept["patch_embed.proj.weight"].shape
    stages = sorted({int(k.split(".")[1]) for k in kept if k.startswith("layers.")})
    depths = [len({k.split(".")[3] for k in kept if k.startswith(f"layers.{i}.blocks.")}) for i in stages]
    heads = [kept[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in stages]
    settings = {
        "EMBED_DIM": embed_dim,
        "DEPTHS": depths,
        "NUM_HEADS": heads,
        "WINDOW_SIZE": window,
        "PATCH_SIZE": patch_size,
    }
    logger.info("Input layout: %s", "timm" if timm_layout else "Microsoft Swin")
    return {prefix + k: v.detach().clone() for k, v in kept.items()}, settings




def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="Swin checkpoint (.pth, .pt, .bin or .safetensors)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="prepended to every name (default: none)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"No checkpoint file at {args.input}")
    converted, settings = convert_swin(load_flat_state_dict(args.input), prefix=args.prefix)
    save_d2_checkpoint(converted, args.output)
    logger.info("Wrote %d tensors to %s (classifier and final norm dropped)", len(converted), args.output)
    logger.info("Use: %s", " ".join(f"MODEL.SWIN.{k} {v}" for k, v in settings.items()))
    return settings


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
