#!/usr/bin/env python
"""COCO semantic labels from COCO panoptic: ``panoptic_{split}2017`` -> ``panoptic_semseg_{split}2017``.

Each pixel of a listed segment (crowd segments included, as in Mask2Former's script) gets the
contiguous id (0..132, order of detectron2's ``COCO_CATEGORIES``) of the segment's category; void
pixels (segment id 0, or ids not listed) get 255. Reads ``coco/annotations/panoptic_{split}2017.json``.

    python datasets/prepare_coco_semantic_annos_from_panoptic.py [--root $DETECTRON2_DATASETS]
"""
import argparse
import json
import logging
import os
import sys

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image

from qsegformers.data.datasets.coco import IGNORE_LABEL, coco_panoptic_paths
from qsegformers.data.datasets.common import datasets_root, require_paths

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")


def panoptic_to_semantic(pan_rgb: np.ndarray, segments_info: list, id_map: dict) -> np.ndarray:
    """H x W uint8 semantic labels from an H x W x 3 panoptic PNG (panopticapi RGB encoding)."""
    from panopticapi.utils import rgb2id

    pan = rgb2id(pan_rgb)
    out = np.full(pan.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        out[pan == seg["id"]] = id_map[seg["category_id"]]
    return out


def convert_split(paths: dict) -> int:
    require_paths("COCO panoptic (raw)", (paths["panoptic_json"], paths["panoptic_root"]))
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    id_map = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    os.makedirs(paths["sem_seg_root"], exist_ok=True)
    for ann in data["annotations"]:
        with Image.open(os.path.join(paths["panoptic_root"], ann["file_name"])) as im:
            pan_rgb = np.asarray(im.convert("RGB"))
        sem = panoptic_to_semantic(pan_rgb, ann["segments_info"], id_map)
        Image.fromarray(sem).save(os.path.join(paths["sem_seg_root"], ann["file_name"]))
    return len(data["annotations"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding coco/ (default: $DETECTRON2_DATASETS)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    total = sum(convert_split(coco_panoptic_paths(root, split)) for split in args.splits)
    logger.info("wrote %d semantic label files", total)
    return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
