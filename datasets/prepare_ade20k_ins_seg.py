#!/usr/bin/env python
"""ADE20K instance annotations (COCO json) from the instance-segmentation challenge PNGs.

Inputs, under ``<root>/ADEChallengeData2016/`` (``--root`` defaults to ``$DETECTRON2_DATASETS``, else
``datasets``):

* ``images/{training,validation}/<stem>.jpg`` (only the size is read);
* ``annotations_instance/{training,validation}/<stem>.png`` (``annotations_instance.tar`` of the
  challenge): RGB, R = instance-challenge category 1..100, G = instance id (0 = no instance);
* ``ade20k_instance_catid_mapping.txt`` (``--mapping``): header line, then ``<instance id> <ADE150 id> ...``;
* optionally ``ade20k_instance_imgCatIds.json`` (``--categories``): its ``categories`` (ids 1..100) give
  the names written to the json; without it the names are detectron2's ADE20K-150 names.

Output: ``ade20k_instance_{train,val}.json``: ``images`` (id = file stem, file_name, height, width),
``annotations`` (one per instance: id 1, 2, ... over the split, category_id = 0-based ADE150 id, RLE
``segmentation``, ``area`` = pixel count, ``bbox`` [x, y, w, h], iscrowd 0) and ``categories`` (the 100
things, ids 0-based ADE150 ids) -- the format of Mask2Former's script of the same name as far as known
here (its sources were not available to verify).

    python datasets/prepare_ade20k_ins_seg.py [--root DIR] [--splits train val] [--workers N]
"""
import functools
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling script below, also when imported

from prepare_ade20k_pan_seg import bbox_of, build_parser, list_stems, map_images  # noqa: E402

from qsegformers.data.datasets.ade20k import (  # noqa: E402
    ADE20K_150_CLASSES,
    ADE20K_INSTANCE_SOURCE,
    ade20k_paths,
    instance_segments,
    read_instance_catid_mapping,
    require_raw_input,
)
from qsegformers.data.datasets.common import datasets_root  # noqa: E402

logger = logging.getLogger(__name__)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO RLE (``counts`` as str, json-ready) of an H x W bool mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def convert_image(stem: str, paths: dict, mapping: dict) -> tuple:
    """(images entry, annotations without ``id``) of one image."""
    image_path = os.path.join(paths["image_root"], stem + ".jpg")
    ins_path = os.path.join(paths["raw_instance_root"], stem + ".png")
    require_raw_input(ins_path, "ADE20K instance annotation", ADE20K_INSTANCE_SOURCE)
    with Image.open(image_path) as im:
        width, height = im.size
    with Image.open(ins_path) as im:
        ins_rgb = np.asarray(im)[..., :3]
    if ins_rgb.shape[:2] != (height, width):
        raise ValueError(f"{ins_path} is {ins_rgb.shape[:2]}, its image {image_path} is {(height, width)}")
    annotations = [{"image_id": stem, "category_id": category, "segmentation": encode_mask(mask),
                    "area": int(mask.sum()), "bbox": bbox_of(mask), "iscrowd": 0}
                   for mask, category in instance_segments(ins_rgb, mapping, ins_path)]
    return {"id": stem, "file_name": stem + ".jpg", "height": height, "width": width}, annotations


def instance_categories(mapping: dict, categories_json: str) -> list:
    """The 100 categories (id = 0-based ADE150 id), names from the devkit json when it exists."""
    names = {ade: ADE20K_150_CLASSES[ade] for ade in mapping.values()}
    if os.path.isfile(categories_json):
        with open(categories_json) as f:
            for cat in json.load(f)["categories"]:
                if cat["id"] not in mapping:
                    raise ValueError(f"{categories_json}: category id {cat['id']} is not in the mapping file")
                names[mapping[cat["id"]]] = cat["name"]
    else:
        logger.info("%s not found: writing detectron2's ADE20K-150 names", categories_json)
    return [{"id": ade, "name": names[ade]} for ade in sorted(names)]


def convert_split(root: str, split: str, mapping: dict, categories_json: str, workers: int = 1) -> int:
    paths = ade20k_paths(root, split)
    require_raw_input(paths["image_root"], "ADE20K image folder", "ADEChallengeData2016.zip")
    require_raw_input(paths["raw_instance_root"], "ADE20K instance annotation folder", ADE20K_INSTANCE_SOURCE)
    stems = list_stems(paths["image_root"])
    results = map_images(functools.partial(convert_image, paths=paths, mapping=mapping), stems, workers,
                         f"instances {split}")
    annotations = [a for _, annos in results for a in annos]
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    data = {"images": [r[0] for r in results], "annotations": annotations,
            "categories": instance_categories(mapping, categories_json)}
    with open(paths["instances_json"], "w") as f:
        json.dump(data, f)
    logger.info("wrote %s: %d images, %d instances", paths["instances_json"], len(stems), len(annotations))
    return len(annotations)


def main(argv=None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--categories", default=None,
                        help="devkit category list, optional (default: "
                             "<root>/ADEChallengeData2016/ade20k_instance_imgCatIds.json)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    paths = ade20k_paths(root, "train")
    mapping = read_instance_catid_mapping(args.mapping or paths["instance_mapping"])
    categories_json = args.categories or paths["instance_categories"]
    if args.categories:
        require_raw_input(args.categories, "ADE20K instance category list", ADE20K_INSTANCE_SOURCE)
    return sum(convert_split(root, split, mapping, categories_json, args.workers) for split in args.splits)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
