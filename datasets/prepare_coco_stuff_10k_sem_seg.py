#!/usr/bin/env python
"""COCO-Stuff-10K (cocostuff-10k-v1.1) for detectron2: ``.mat`` labels -> 171-class PNGs, images per split.

Reads ``coco/coco_stuff_10k/{imageLists/{train,test}.txt, images/<name>.jpg, annotations/<name>.mat}``
(the ``S`` array: 0 = unlabelled, 1..182 = COCO-Stuff ids) and writes
``images_detectron2/<split>/<name>.jpg`` and ``annotations_detectron2/<split>/<name>.png`` with the
contiguous ids 0..170 (80 things, then 91 stuff) and 255 for unlabelled or unused ids.

    python datasets/prepare_coco_stuff_10k_sem_seg.py [--root $DETECTRON2_DATASETS]
"""
import argparse
import logging
import os
import shutil
import sys

import numpy as np
from PIL import Image
from scipy.io import loadmat

from qsegformers.data.datasets.coco import COCO_STUFF_171_DATASET_IDS, IGNORE_LABEL, coco_stuff_10k_paths
from qsegformers.data.datasets.common import datasets_root, require_paths

logger = logging.getLogger(__name__)
SPLITS = ("train", "test")
MAT_KEY = "S"


def stuff_ids_to_contiguous(label: np.ndarray) -> np.ndarray:
    """H x W COCO-Stuff dataset ids (0 unlabelled) -> uint8 contiguous ids, ``IGNORE_LABEL`` elsewhere."""
    lut = np.full(max(COCO_STUFF_171_DATASET_IDS) + 1, IGNORE_LABEL, dtype=np.uint8)
    lut[COCO_STUFF_171_DATASET_IDS] = np.arange(len(COCO_STUFF_171_DATASET_IDS))
    label = label.astype(np.int64)
    out = np.full(label.shape, IGNORE_LABEL, dtype=np.uint8)
    valid = (label >= 0) & (label < len(lut))
    out[valid] = lut[label[valid]]
    return out


def convert_split(paths: dict) -> int:
    require_paths("COCO-Stuff-10K (raw)", (paths["image_list"], paths["raw_image_root"], paths["raw_annotation_root"]))
    with open(paths["image_list"]) as f:
        names = [line.strip() for line in f if line.strip()]
    os.makedirs(paths["image_root"], exist_ok=True)
    os.makedirs(paths["sem_seg_root"], exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(paths["raw_image_root"], name + ".jpg"),
                        os.path.join(paths["image_root"], name + ".jpg"))
        label = loadmat(os.path.join(paths["raw_annotation_root"], name + ".mat"))[MAT_KEY]
        Image.fromarray(stuff_ids_to_contiguous(label)).save(os.path.join(paths["sem_seg_root"], name + ".png"))
    return len(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding coco/ (default: $DETECTRON2_DATASETS)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    total = sum(convert_split(coco_stuff_10k_paths(root, split)) for split in SPLITS)
    logger.info("wrote %d images and label files", total)
    return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
