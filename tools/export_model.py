#!/usr/bin/env python
"""Export a semantic-segmentation model to ONNX and/or TorchScript (tracing) and check the exported
model against PyTorch on a sample image.

Examples::

    python tools/export_model.py --config-file configs/toy/semantic-segmentation/maskformer2_R18_toy.yaml \\
        --output export/ --sample-image photo.jpg --opts MODEL.WEIGHTS output/toy_semantic/model_final.pth
    python tools/export_model.py --config-file CFG --output export/ --input-size 512 512 --format onnx

The exported graph (``qsegformers/utils/export.py``) takes ``image``: 1 x 3 x H x W, normalised with
``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` and padded to the size divisibility, and returns ``sem_seg``:
1 x K x H x W class scores (crop to the image and resize to the original size afterwards). It is fixed to
the sample's padded size. The export runs on the CPU with ``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL
pytorch`` (``F.grid_sample``; ONNX opset 17), because the compiled deformable-attention op has no ONNX
symbolic. The check runs the ONNX file with onnxruntime (and reloads the TorchScript file) on the sample
and fails (exit status 1) when the largest absolute difference to PyTorch exceeds ``--atol``.
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from qsegformers.engine.checkpoint import QsegCheckpointer
from qsegformers.utils.export import (
    ONNX_OPSET,
    SemanticSegmentationExport,
    preprocess_for_export,
    export_quietly,
)
from qsegformers.utils.image_io import read_image_any
from qsegformers.utils.tool_setup import setup_tool_cfg

logger = logging.getLogger("qsegformers.tools.export_model")

FORMATS = ("onnx", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
INPUT_NAME, OUTPUT_NAME = "image", "sem_seg"
EXPORT_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL", "pytorch"]
PIXEL_MAX = 255.0
SEED = 0


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--sample-image", help="image to export and check with (default: a random image)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="size of the random sample, or the size the sample image is resized to")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted |exported - PyTorch|")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def sample_image(args, cfg) -> torch.Tensor:
    """3 x H x W float image in 0-255, in the model's input format."""
    if args.sample_image:
        image = torch.as_tensor(read_image_any(args.sample_image, format=cfg.INPUT.FORMAT).astype("float32"))
        image = image.permute(2, 0, 1)
        if args.input_size:
            image = torch.nn.functional.interpolate(image[None], size=tuple(args.input_size), mode="bilinear",
                                                    align_corners=False)[0]
        return image
    h, w = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(SEED)) * PIXEL_MAX


def export_onnx(wrapper, x: torch.Tensor, path: str) -> np.ndarray:
    """Write ``path`` and return onnxruntime's output on ``x``."""
    import onnx
    import onnxruntime

    export_quietly(torch.onnx.export, wrapper, (x,), path, dynamo=False, opset_version=ONNX_OPSET,
                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    onnx.checker.check_model(onnx.load(path))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]


def export_torchscript(wrapper, x: torch.Tensor, path: str) -> np.ndarray:
    """Write ``path`` (traced) and return the reloaded module's output on ``x``."""
    traced = export_quietly(torch.jit.trace, wrapper, (x,), check_trace=False)
    export_quietly(torch.jit.save, traced, path)
    with torch.no_grad():
        return export_quietly(torch.jit.load, path)(x).numpy()


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def main(argv=None) -> Dict[str, Dict]:
    """Returns, per format, the output path and the largest absolute difference to PyTorch."""
    args = get_parser().parse_args(argv)
    cfg = setup_tool_cfg(args.config_file, list(args.opts) + EXPORT_OPTS)
    model = build_model(cfg).eval()
    QsegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    wrapper = SemanticSegmentationExport(model).eval()
    x = preprocess_for_export(model, sample_image(args, cfg))
    with torch.no_grad():
        reference = wrapper(x).numpy()
    os.makedirs(args.output, exist_ok=True)
    results = {}
    for fmt in args.format:
        path = os.path.join(args.output, FILE_NAMES[fmt])
        exported = EXPORTERS[fmt](wrapper, x, path)
        diff = float(np.abs(exported - reference).max())
        results[fmt] = {"path": path, "max_abs_diff": diff, "ok": diff <= args.atol,
                        "input_shape": list(x.shape), "output_shape": list(reference.shape)}
    rows = [[fmt, r["path"], f"{r['max_abs_diff']:.2e}", "ok" if r["ok"] else f"FAIL (> {args.atol})"]
            for fmt, r in results.items()]
    sys.stdout.write(tabulate(rows, headers=["format", "file", "max |diff| vs PyTorch", "check"], tablefmt="pipe")
                     + f"\ninput {INPUT_NAME}: {list(x.shape)}, output {OUTPUT_NAME}: {list(reference.shape)}\n")
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="qsegformers")
    sys.exit(0 if all(r["ok"] for r in main().values()) else 1)
