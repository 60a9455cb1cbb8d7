#!/usr/bin/env python
"""Cityscapes label files for detectron2: labelTrainIds PNGs and the panoptic PNGs + json.

From the official download (``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
``gtFine/{split}/{city}/*_gtFine_{polygons.json,labelIds.png,instanceIds.png,color.png}``) under
``$DETECTRON2_DATASETS/cityscapes`` this writes, with cityscapesscripts' own functions:

* ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png``: ``json2labelImg(..., "trainIds")`` on every
  polygons json, which is what ``createTrainIdLabelImgs`` does (that script walks every split of
  ``$CITYSCAPES_DATASET``, gtCoarse included, so its loop is not reused);
* ``gtFine/cityscapes_panoptic_{split}/*_gtFine_panoptic.png`` and ``gtFine/cityscapes_panoptic_{split}.json``:
  ``createPanopticImgs.convert2panoptic`` (dataset category ids, as detectron2 expects).

    python datasets/prepare_cityscapes.py [--root $DETECTRON2_DATASETS] [--splits train val]
"""
import argparse
import glob
import logging
import os
import sys

from qsegformers.data.datasets.common import datasets_root, require_paths

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")
POLYGONS_SUFFIX = "_polygons.json"
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"


def create_train_id_labels(gt_fine: str, split: str) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` next to every polygons json of ``gt_fine/split``; returns the count."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    files = sorted(glob.glob(os.path.join(gt_fine, split, "*", "*_gt*" + POLYGONS_SUFFIX)))
    if not files:
        raise FileNotFoundError(f"No *_gtFine{POLYGONS_SUFFIX} under {os.path.abspath(os.path.join(gt_fine, split))}: "
                                f"the gtFine download is missing or incomplete (see datasets/README.md).")
    for path in files:
        json2labelImg(path, path[: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX, "trainIds")
    return len(files)


def create_panoptic(gt_fine: str, split: str) -> None:
    """``gt_fine/cityscapes_panoptic_{split}/`` PNGs and ``gt_fine/cityscapes_panoptic_{split}.json``."""
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    convert2panoptic(cityscapesPath=gt_fine, outputFolder=gt_fine, useTrainId=False, setNames=[split])


def main(argv=None) -> int:
    """Prepare the requested splits; returns the number of images processed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding cityscapes/ (default: $DETECTRON2_DATASETS)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to prepare")
    args = parser.parse_args(argv)
    gt_fine = os.path.join(args.root if args.root is not None else datasets_root(), "cityscapes", "gtFine")
    total = 0
    for split in args.splits:
        require_paths(f"Cityscapes ({split}, gtFine)", (os.path.join(gt_fine, split),))
        count = create_train_id_labels(gt_fine, split)
        create_panoptic(gt_fine, split)
        logger.info("%s: %d labelTrainIds PNGs and %s", split, count,
                    os.path.join(gt_fine, f"cityscapes_panoptic_{split}.json"))
        total += count
    return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
