#!/usr/bin/env python
"""Convert a torchvision ResNet (18, 34, 50, 101, 152) state dict into detectron2's ResNet layout.

Usage::

    python tools/convert_torchvision_resnet_to_d2.py resnet50-0676ba61.pth R-50-torchvision.pkl

Renaming, as detectron2's ``tools/convert-torchvision-to-d2.py``: ``conv1`` -> ``stem.conv1``, ``bn1`` ->
``stem.conv1.norm``, ``layerN.M.convK`` -> ``res<N+1>.M.convK``, ``layerN.M.bnK`` -> ``res<N+1>.M.convK.norm``,
``downsample.0`` / ``downsample.1`` -> ``shortcut`` / ``shortcut.norm``. Unlike that script, the classifier
``fc`` is dropped. Names carry no ``backbone.`` prefix (like detectron2's model-zoo ``R-50.pkl``): the output
sets ``"matching_heuristics": True`` and detectron2 matches them by suffix. BN ``num_batches_tracked``
buffers are kept; a FrozenBN model has no such buffer and ignores them.

detectron2 settings that reproduce torchvision's network (the script logs them for the input):
MODEL.RESNETS.DEPTH (18/34/50/101/152), MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision strides in the 3x3
conv), MODEL.RESNETS.RES2_OUT_CHANNELS 64 for 18/34, MODEL.RESNETS.NORM "FrozenBN" (or "BN"/"SyncBN").
torchvision weights expect RGB images normalised with ImageNet statistics in 0-255 units, not detectron2's
default BGR caffe values: INPUT.FORMAT "RGB", MODEL.PIXEL_MEAN [123.675, 116.28, 103.53],
MODEL.PIXEL_STD [58.395, 57.12, 57.375].

Output: ``.pkl`` (``{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics":
True}``) or ``.pth`` (the same with tensors).
"""
import argparse
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

from qsegformers.utils.checkpoint_files import load_flat_state_dict, save_d2_checkpoint

logger = logging.getLogger("convert_torchvision_resnet_to_d2")

AUTHOR = "torchvision"
DROPPED_PREFIXES = ("fc.",)  # ImageNet classifier
STEM_KEY = re.compile(r"^(conv1|bn1)\.(.+)$")
BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$")
# Blocks per stage (res2..res5) -> depth, for BasicBlock and Bottleneck ResNets.
BASIC_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
BASIC_RES2_OUT_CHANNELS = 64  # detectron2 requires this for ResNet-18/34


def rename_torchvision_key(key: str) -> str:
    """One torchvision ResNet parameter/buffer name -> detectron2 ResNet name."""
    stem = STEM_KEY.match(key)
    if stem:
        module, rest = stem.groups()
        return f"stem.conv1.{rest}" if module == "conv1" else f"stem.conv1.norm.{rest}"
    block = BLOCK_KEY.match(key)
    if not block:
        raise ValueError(f"Not a torchvision ResNet key: {key!r}")
    stage, index, module, rest = block.groups()
    if module.startswith("conv"):
        name = module
    elif module.startswith("bn"):
        name = f"conv{module[2:]}.norm"
    else:
        name = "shortcut" if module.endswith("0") else "shortcut.norm"
    return f"res{int(stage) + 1}.{index}.{name}.{rest}"


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Rename a torchvision ResNet state dict; returns (detectron2 state dict, MODEL.RESNETS settings)."""
    converted = {
        rename_torchvision_key(k): v.detach().clone()
        for k, v in state_dict.items()
        if not k.startswith(DROPPED_PREFIXES)
    }
    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.")}) for stage in range(1, 5)
    )
    bottleneck = any(".conv3." in k for k in state_dict)
    depth = (BOTTLENECK_DEPTHS if bottleneck else BASIC_DEPTHS).get(blocks)
    if depth is None:
        raise ValueError(f"Unknown ResNet with {blocks} blocks per stage (bottleneck: {bottleneck})")
    settings = {"DEPTH": depth, "STRIDE_IN_1X1": False}
    if not bottleneck:
        settings["RES2_OUT_CHANNELS"] = BASIC_RES2_OUT_CHANNELS
    return converted, settings




def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet state dict (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl or .pth)")
    args = parser.parse_args(argv)
    if not args.output.endswith((".pkl", ".pth")):
        parser.error(f"output {args.output!r} must end in .pkl or .pth")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"No checkpoint file at {args.input}")
    converted, settings = convert_torchvision_resnet(load_flat_state_dict(args.input))
    save_d2_checkpoint(converted, args.output, AUTHOR)
    logger.info("Wrote %d tensors to %s (fc dropped)", len(converted), args.output)
    logger.info(
        "Use: %s INPUT.FORMAT RGB MODEL.PIXEL_MEAN [123.675,116.28,103.53] MODEL.PIXEL_STD [58.395,57.12,57.375]",
        " ".join(f"MODEL.RESNETS.{k} {v}" for k, v in settings.items()),
    )
    return settings


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
