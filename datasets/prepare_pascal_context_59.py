#!/usr/bin/env python
"""PASCAL-Context-59 labels for detectron2: ``SegmentationClassContext`` -> ``annotations_detectron2/pc59_<split>``.

Input: mmsegmentation's PASCAL-Context PNGs (``VOCdevkit/VOC2010/SegmentationClassContext/<name>.png``,
0 = background, 1..59; written by mmsegmentation's ``tools/dataset_converters/pascal_context.py``
from ``trainval_merged.json``) and the split lists ``ImageSets/SegmentationContext/{train,val}.txt``.
Output: ``label - 1`` with background -> 255, for the images of each split.

    python datasets/prepare_pascal_context_59.py [--root $DETECTRON2_DATASETS]
"""
import argparse
import logging
import os
import sys

import numpy as np
from PIL import Image

from qsegformers.data.datasets.common import datasets_root, reduce_zero_label, require_paths
from qsegformers.data.datasets.pascal_context import SPLITS, pascal_context_paths

logger = logging.getLogger(__name__)


def convert_split(paths: dict) -> int:
    require_paths("PASCAL-Context (raw)", (paths["image_list"], paths["raw_sem_seg_root"]))
    with open(paths["image_list"]) as f:
        names = [line.strip() for line in f if line.strip()]
    os.makedirs(paths["sem_seg_root"], exist_ok=True)
    for name in names:
        with Image.open(os.path.join(paths["raw_sem_seg_root"], name + ".png")) as im:
            label = np.asarray(im)
        Image.fromarray(reduce_zero_label(label)).save(os.path.join(paths["sem_seg_root"], name + ".png"))
    return len(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding VOCdevkit/ (default: $DETECTRON2_DATASETS)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    total = sum(convert_split(pascal_context_paths(root, split)) for split in SPLITS)
    logger.info("wrote %d label files", total)
    return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
