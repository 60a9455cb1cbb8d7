#!/usr/bin/env python
"""ADE20K-150 panoptic annotations (panopticapi format) from the semantic and instance-challenge PNGs.

Inputs, under ``<root>/ADEChallengeData2016/`` (``--root`` defaults to ``$DETECTRON2_DATASETS``, else
``datasets``):

* ``images/{training,validation}/<stem>.jpg`` (only the size is read) and
  ``annotations/{training,validation}/<stem>.png``: SceneParsing labels, 0 = other, 1..150;
* ``annotations_instance/{training,validation}/<stem>.png`` from the instance-segmentation challenge
  (``annotations_instance.tar``): RGB, R = instance-challenge category 1..100, G = instance id
  (0 = no instance);
* ``ade20k_instance_catid_mapping.txt`` (``--mapping`` to read it elsewhere): header line, then
  ``<instance id> <ADE150 id> ...`` per line.

Outputs, next to the inputs: ``ade20k_panoptic_{train,val}/<stem>.png`` (panopticapi RGB encoding,
id = R + 256 G + 256^2 B, 0 = void) and ``ade20k_panoptic_{train,val}.json`` with the 150 categories
(ids 0..149, ``isthing`` for the 100 mapped classes).

Each image: one stuff segment per stuff class of the semantic PNG, then one thing segment per
instance of the instance PNG, pasted over the stuff (thing pixels win where both are labelled); pixels of
thing classes without an instance stay void. Segment ids are 1, 2, ... in that order. This follows the
rule of Mask2Former's script of the same name as far as known here (its sources were not available to
verify); two deliberate differences: segment ids are sequential rather than random colours, and areas
and boxes are those of the final PNG (after the things are pasted), so the json and the PNG agree.

    python datasets/prepare_ade20k_pan_seg.py [--root DIR] [--splits train val] [--workers N]
"""
import argparse
import functools
import json
import logging
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image

from qsegformers.data.datasets.ade20k import (
    ADE20K_150_CLASSES,
    ADE20K_150_COLORS,
    ADE20K_INSTANCE_SOURCE,
    ADE20K_THING_IDS,
    SPLITS,
    ade20k_paths,
    instance_segments,
    read_instance_catid_mapping,
    require_raw_input,
)
from qsegformers.data.datasets.common import datasets_root

logger = logging.getLogger(__name__)
SCENE_PARSING_SOURCE = "SceneParsing benchmark: ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu)"
RAW_UNLABELLED = 0  # value of "other" in the SceneParsing PNGs
LOG_EVERY = 1000


def bbox_of(mask: np.ndarray) -> list:
    """``[x, y, w, h]`` (COCO) of the True pixels of an H x W bool mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def panoptic_from_raw(sem: np.ndarray, ins_rgb: np.ndarray, mapping: dict, path: str = "") -> tuple:
    """Compose one panoptic annotation.

    Args:
        sem: H x W uint8 SceneParsing labels (0 = other, 1..150).
        ins_rgb: H x W x 3 uint8 instance-challenge PNG.
        mapping: instance-challenge id -> contiguous ADE150 id (``read_instance_catid_mapping``).
    Returns:
        (H x W int64 segment ids, 0 = void; list of segments_info dicts with id, category_id (0..149),
        area, bbox, iscrowd).
    """
    if sem.shape != ins_rgb.shape[:2]:
        raise ValueError(f"{path}: instance PNG is {ins_rgb.shape[:2]}, semantic PNG is {sem.shape}")
    things = set(ADE20K_THING_IDS)
    layers = [(sem == v, int(v) - 1) for v in np.unique(sem)
              if v != RAW_UNLABELLED and int(v) - 1 not in things]
    layers += instance_segments(ins_rgb, mapping, path)
    pan = np.zeros(sem.shape, dtype=np.int64)
    for segment_id, (mask, _) in enumerate(layers, start=1):
        pan[mask] = segment_id
    segments = []
    for segment_id, (_, category) in enumerate(layers, start=1):
        mask = pan == segment_id
        if mask.any():  # a stuff segment may be covered entirely by things
            segments.append({"id": segment_id, "category_id": category, "area": int(mask.sum()),
                             "bbox": bbox_of(mask), "iscrowd": 0})
    return pan, segments


def _read(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def convert_image(stem: str, paths: dict, mapping: dict) -> tuple:
    """Write ``<panoptic_root>/<stem>.png``; return (images entry, annotations entry) of the json."""
    from panopticapi.utils import id2rgb

    image_path = os.path.join(paths["image_root"], stem + ".jpg")
    sem_path = os.path.join(paths["raw_sem_seg_root"], stem + ".png")
    ins_path = os.path.join(paths["raw_instance_root"], stem + ".png")
    require_raw_input(sem_path, "ADE20K semantic annotation", SCENE_PARSING_SOURCE)
    require_raw_input(ins_path, "ADE20K instance annotation", ADE20K_INSTANCE_SOURCE)
    with Image.open(image_path) as im:
        width, height = im.size
    sem, ins_rgb = _read(sem_path), _read(ins_path)[..., :3]
    if sem.shape != (height, width):
        raise ValueError(f"{sem_path} is {sem.shape}, its image {image_path} is {(height, width)}")
    pan, segments = panoptic_from_raw(sem, ins_rgb, mapping, ins_path)
    Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
    return ({"id": stem, "file_name": stem + ".jpg", "width": width, "height": height},
            {"image_id": stem, "file_name": stem + ".png", "segments_info": segments})


def panoptic_categories(mapping: dict) -> list:
    """The 150 categories of the json: id (0..149), name, isthing (a mapped instance class), color."""
    things = set(mapping.values())
    return [{"id": i, "name": name, "isthing": int(i in things), "color": ADE20K_150_COLORS[i]}
            for i, name in enumerate(ADE20K_150_CLASSES)]


def list_stems(image_root: str) -> list:
    return sorted(os.path.splitext(n)[0] for n in os.listdir(image_root) if n.endswith(".jpg"))


def map_images(fn, stems: list, workers: int, what: str) -> list:
    """``[fn(stem) for stem in stems]``, in a pool of ``workers`` processes when > 1, with progress logs."""
    results = []
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        it = pool.imap(fn, stems, chunksize=16) if pool else map(fn, stems)
        for i, result in enumerate(it, start=1):
            results.append(result)
            if i % LOG_EVERY == 0:
                logger.info("%s: %d / %d images", what, i, len(stems))
    finally:
        if pool:
            pool.close()
            pool.join()
    return results


def convert_split(root: str, split: str, mapping: dict, workers: int = 1) -> int:
    paths = ade20k_paths(root, split)
    for key in ("image_root", "raw_sem_seg_root"):
        require_raw_input(paths[key], "ADE20K folder", SCENE_PARSING_SOURCE)
    require_raw_input(paths["raw_instance_root"], "ADE20K instance annotation folder", ADE20K_INSTANCE_SOURCE)
    os.makedirs(paths["panoptic_root"], exist_ok=True)
    stems = list_stems(paths["image_root"])
    results = map_images(functools.partial(convert_image, paths=paths, mapping=mapping), stems, workers,
                         f"panoptic {split}")
    data = {"images": [r[0] for r in results], "annotations": [r[1] for r in results],
            "categories": panoptic_categories(mapping)}
    with open(paths["panoptic_json"], "w") as f:
        json.dump(data, f)
    logger.info("wrote %s and %d PNGs in %s", paths["panoptic_json"], len(stems), paths["panoptic_root"])
    return len(stems)


def build_parser(description: str) -> argparse.ArgumentParser:
    """``--root``, ``--splits``, ``--mapping``, ``--workers`` (shared with prepare_ade20k_ins_seg.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None,
                        help="folder holding ADEChallengeData2016 (default: $DETECTRON2_DATASETS, else datasets)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--mapping", default=None,
                        help="instance category mapping (default: <root>/ADEChallengeData2016/"
                             "ade20k_instance_catid_mapping.txt)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    return parser


def main(argv=None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    mapping = read_instance_catid_mapping(args.mapping or ade20k_paths(root, "train")["instance_mapping"])
    return sum(convert_split(root, split, mapping, args.workers) for split in args.splits)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
