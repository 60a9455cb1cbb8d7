#!/usr/bin/env python
"""Parameters, FLOPs and activations of a config's model, per part (backbone, pixel decoder, transformer
decoder, inference post-processing, total).

Examples::

    python tools/analyze_model.py --config-file configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml \\
        --input-size 512 512
    python tools/analyze_model.py --config-file CFG --image photo.jpg --json cost.json --opts MODEL.DEVICE cpu

The model runs one inference (semantic output only, as Mask2Former's FLOP numbers) on a random image of
``--input-size`` (or on ``--image``, resized to ``--input-size`` when both are given). Weights do not
change the counts, so ``MODEL.WEIGHTS`` is ignored. FLOPs: fvcore's count (one multiply-add = one FLOP)
with detectron2's convention that elementwise ops count 0; those ops and any op fvcore cannot count are
listed under the table (see ``qsegformers/utils/flop_count.py`` for the deformable-attention formulas).
"""
import argparse
import json
import logging
import sys

import cv2
import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from qsegformers.utils.flop_count import PARTS, ModelCost, analyze_model_cost
from qsegformers.utils.image_io import read_image_any
from qsegformers.utils.tool_setup import setup_tool_cfg

logger = logging.getLogger("qsegformers.tools.analyze_model")

SEMANTIC_ONLY = [
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
    "MODEL.WEIGHTS", "",
]
GIGA, MEGA = 1e9, 1e6
PIXEL_MAX = 255.0
SEED = 0
DEFAULT_SIZE = (512, 512)  # ADE20K's test crop, the size of Mask2Former's reported FLOPs


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="image size (default 512 512)")
    parser.add_argument("--image", help="analyse on this image instead of a random one")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def input_image(args, input_format: str) -> torch.Tensor:
    """3 x H x W float image in 0-255, in the model's input format."""
    if args.image:
        image = read_image_any(args.image, format=input_format)
        if args.input_size:
            h, w = args.input_size
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    h, w = args.input_size or DEFAULT_SIZE
    generator = torch.Generator().manual_seed(SEED)
    return torch.rand(3, h, w, generator=generator) * PIXEL_MAX


def format_table(cost: ModelCost) -> str:
    rows = [
        [part, f"{cost.params[part] / MEGA:.3f}", f"{cost.flops[part] / GIGA:.3f}",
         f"{cost.activations[part] / MEGA:.3f}"]
        for part in cost.params
    ]
    h, w = cost.input_size
    table = tabulate(rows, headers=["part", "params (M)", f"GFLOPs @{h}x{w}", "activations (M)"], tablefmt="pipe")
    lines = [table, "", f"exact parameter count: {cost.params['total']}"]
    zero = ", ".join(f"{op} x{n}" for op, n in cost.zero_flop_ops.items()) or "none"
    lines.append(f"ops counted as 0 FLOPs (elementwise, detectron2 convention): {zero}")
    unsupported = ", ".join(f"{op} x{n}" for op, n in cost.unsupported_ops.items()) or "none"
    lines.append(f"ops NOT counted (no FLOP handle in fvcore): {unsupported}")
    return "\n".join(lines)


def main(argv=None) -> ModelCost:
    args = get_parser().parse_args(argv)
    cfg = setup_tool_cfg(args.config_file, list(args.opts) + SEMANTIC_ONLY)
    model = build_model(cfg).eval()
    image = input_image(args, cfg.INPUT.FORMAT)
    with torch.no_grad():
        cost = analyze_model_cost(model, image)
    missing = [part for part, path in PARTS.items() if cost.params[part] == 0]
    if missing:
        logger.warning("no module found for %s (expected at %s)", missing, [PARTS[p] for p in missing])
    sys.stdout.write(format_table(cost) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cost.as_dict(), f, indent=2)
    return cost


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="qsegformers")
    main()
