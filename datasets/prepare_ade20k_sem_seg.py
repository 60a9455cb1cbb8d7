#!/usr/bin/env python
"""ADE20K-150 semantic labels for detectron2: ``annotations/`` -> ``annotations_detectron2/``.

The official ADEChallengeData2016 PNGs hold 0 = "other" and 1..150; the loaders want 0..149 with
255 ignore, i.e. ``label - 1`` with 0 -> 255 (what Mask2Former's script of the same name does).

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]
"""
import argparse
import logging
import os
import sys

import numpy as np
from PIL import Image

from qsegformers.data.datasets.common import datasets_root, reduce_zero_label, require_paths

logger = logging.getLogger(__name__)
SPLIT_DIRS = ("training", "validation")


def convert_folder(src_dir: str, dst_dir: str) -> int:
    """Convert every PNG of ``src_dir`` into ``dst_dir``; returns the number of files written."""
    os.makedirs(dst_dir, exist_ok=True)
    count = 0
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".png"):
            continue
        with Image.open(os.path.join(src_dir, name)) as im:
            label = np.asarray(im)
        Image.fromarray(reduce_zero_label(label)).save(os.path.join(dst_dir, name))
        count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None,
                        help="folder holding ADEChallengeData2016 (default: $DETECTRON2_DATASETS)")
    args = parser.parse_args(argv)
    base = os.path.join(args.root if args.root is not None else datasets_root(), "ADEChallengeData2016")
    total = 0
    for split in SPLIT_DIRS:
        src = os.path.join(base, "annotations", split)
        require_paths("ADE20K (raw annotations)", (src,))
        total += convert_folder(src, os.path.join(base, "annotations_detectron2", split))
    logger.info("wrote %d label files under %s", total, os.path.join(base, "annotations_detectron2"))
    return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
