#!/usr/bin/env python
"""ADE20K-full semantic labels (16-bit TIFF, train ids, 65535 = ignore) from the ADE20K 2021 release.

Inputs, under ``<root>/ADE20K_2021_17_01/`` (``--root`` defaults to ``$DETECTRON2_DATASETS``, else
``datasets``):

* ``index_ade20k.pkl``: a pickled dict with (at least) the lists ``filename``, ``folder`` (one per
  image; the folder relative to ``<root>``, e.g. ``ADE20K_2021_17_01/images/ADE/training/<scene>``) and
  ``objectnames``;
* ``images/ADE/{training,validation}/<scene>/<name>.jpg`` and ``<name>_seg.png``, where a pixel's object
  class is ``R // 10 * 256 + G`` (the ADE20K toolkit's ``loadAde20K``), 0 = unlabelled, ``k`` naming
  ``objectnames[k - 1]``.

The split of an image is the ``training``/``validation`` component of its folder (else ``_val_`` in
its file name).

Classes. With ``--categories FILE`` (a json list, or ``{"categories": [...]}``, of ``{"trainId", "id"
(= class value above), "name"}``, e.g. Mask2Former's 847-entry list dumped to json) that list is used.
Otherwise the classes are selected from the data with MaskFormer's rule as recalled here (not verified
against its code): keep the classes present in both the training and the validation split
(``--rule both``; ``train`` / ``any`` are the alternatives), "present" meaning in at least
``--min-images`` images of the split; train ids follow the class value. On the full release this should
give the 847 classes; the count is logged. Either way the list is written to
``ADE20K_2021_17_01/ade20k_full_categories.json``, from which qsegformers reads the class names.

Outputs: ``images_detectron2/{training,validation}/<name>.jpg`` and
``annotations_detectron2/{training,validation}/<name>.tif`` (uint16, train id, 65535 for unlabelled and
unselected classes). As in Mask2Former's script (recalled, unverified), images whose shorter side
exceeds ``--max-short-side`` (512) are resized to it (image bilinear, labels nearest); ``0`` keeps sizes.

    python datasets/prepare_ade20k_full_sem_seg.py [--root DIR] [--splits train val] [--categories FILE]
"""
import argparse
import collections
import functools
import json
import logging
import os
import pickle
import shutil
import sys

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling script below, also when imported

from prepare_ade20k_pan_seg import map_images  # noqa: E402

from qsegformers.data.datasets.ade20k import (  # noqa: E402
    ADE20K_FULL_IGNORE_LABEL,
    ADE20K_FULL_ROOT,
    ADE20K_FULL_SOURCE,
    SPLITS,
    ade20k_paths,
    load_full_categories,
    require_raw_input,
)
from qsegformers.data.datasets.common import datasets_root  # noqa: E402

logger = logging.getLogger(__name__)
INDEX_FILE = "index_ade20k.pkl"
SEG_SUFFIX = "_seg.png"
R_DIVISOR, G_RANGE = 10, 256  # class value = R // 10 * 256 + G
UNLABELLED = 0
RULES = ("both", "train", "any")
DEFAULT_MAX_SHORT_SIDE = 512


def decode_class_mask(seg_rgb: np.ndarray) -> np.ndarray:
    """H x W int64 ADE object class values (0 = unlabelled) of an H x W x 3 ``*_seg.png``."""
    r, g = seg_rgb[..., 0].astype(np.int64), seg_rgb[..., 1].astype(np.int64)
    return r // R_DIVISOR * G_RANGE + g


def split_of(folder: str, filename: str) -> str:
    """"train" or "val" for an index entry."""
    parts = os.path.normpath(folder).split(os.sep)
    for split, dirname in SPLITS.items():
        if dirname in parts:
            return split
    return "val" if "_val_" in filename else "train"


def read_index(full_root: str) -> tuple:
    """(``[(split, image path)]``, objectnames) from ``index_ade20k.pkl``."""
    index_path = os.path.join(full_root, INDEX_FILE)
    require_raw_input(index_path, "ADE20K index", ADE20K_FULL_SOURCE)
    with open(index_path, "rb") as f:
        index = pickle.load(f)
    missing = [k for k in ("filename", "folder", "objectnames") if k not in index]
    if missing:
        raise KeyError(f"{index_path} lacks the key(s) {missing}")
    root = os.path.dirname(os.path.normpath(full_root))
    entries = []
    for folder, filename in zip(index["folder"], index["filename"]):
        base = root if folder.split("/")[0] == ADE20K_FULL_ROOT else full_root
        entries.append((split_of(folder, filename), os.path.join(base, folder, filename)))
    return entries, list(index["objectnames"])


def read_class_mask(image_path: str) -> np.ndarray:
    seg_path = os.path.splitext(image_path)[0] + SEG_SUFFIX
    require_raw_input(seg_path, "ADE20K segmentation", ADE20K_FULL_SOURCE)
    with Image.open(seg_path) as im:
        return decode_class_mask(np.asarray(im.convert("RGB")))


def _present_classes(image_path: str) -> set:
    return set(np.unique(read_class_mask(image_path)).tolist()) - {UNLABELLED}


def select_classes(counts: dict, rule: str = "both", min_images: int = 1) -> list:
    """Sorted class values kept by ``rule``.

    ``counts``: {"train": Counter(class -> number of images), "val": ...}. A class is present in a split
    when it is in at least ``min_images`` of its images; ``both``: present in train and in val, ``train``:
    present in train, ``any``: present in either.
    """
    present = {s: {c for c, n in counts.get(s, {}).items() if n >= min_images} for s in SPLITS}
    if rule == "both":
        keep = present["train"] & present["val"]
    elif rule == "train":
        keep = present["train"]
    elif rule == "any":
        keep = present["train"] | present["val"]
    else:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    return sorted(keep)


def count_classes(entries: list, workers: int = 1) -> dict:
    """{split: Counter(class value -> number of images containing it)} over all entries."""
    present = map_images(_present_classes, [path for _, path in entries], workers, "counting classes")
    counts = {s: collections.Counter() for s in SPLITS}
    for (split, _), classes in zip(entries, present):
        counts[split].update(classes)
    return counts


def categories_from_selection(classes: list, objectnames: list) -> list:
    """``[{"trainId", "id", "name"}]``: train ids in class-value order, ``name = objectnames[id - 1]``."""
    return [{"trainId": t, "id": int(c), "name": objectnames[c - 1] if 0 < c <= len(objectnames) else str(c)}
            for t, c in enumerate(classes)]


def train_id_lut(categories: list) -> np.ndarray:
    """1-D uint16 lookup table: class value -> train id, ``ADE20K_FULL_IGNORE_LABEL`` elsewhere."""
    lut = np.full(max(c["id"] for c in categories) + 1, ADE20K_FULL_IGNORE_LABEL, dtype=np.uint16)
    for c in categories:
        lut[c["id"]] = c["trainId"]
    return lut


def resized_shape(height: int, width: int, max_short_side: int):
    """(h, w) with the shorter side ``max_short_side`` when it is longer than that, else None."""
    short = min(height, width)
    if max_short_side <= 0 or short <= max_short_side:
        return None
    scale = max_short_side / short
    return (max_short_side, round(width * scale)) if height <= width else (round(height * scale), max_short_side)


def convert_image(entry: tuple, lut: np.ndarray, out_dirs: dict, max_short_side: int) -> str:
    """Write ``<name>.jpg`` and ``<name>.tif`` of one index entry; returns the label path."""
    split, image_path = entry
    classes = read_class_mask(image_path)
    labels = np.full(classes.shape, ADE20K_FULL_IGNORE_LABEL, dtype=np.uint16)
    known = classes < len(lut)
    labels[known] = lut[classes[known]]
    stem = os.path.splitext(os.path.basename(image_path))[0]
    image_dir, label_dir = out_dirs[split]
    image_out = os.path.join(image_dir, stem + ".jpg")
    shape = resized_shape(*labels.shape, max_short_side)
    if shape is None:
        shutil.copyfile(image_path, image_out)
    else:
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        size = (shape[1], shape[0])
        Image.fromarray(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)).save(image_out)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    label_out = os.path.join(label_dir, stem + ".tif")
    Image.fromarray(labels).save(label_out)
    return label_out


def write_categories(path: str, categories: list, selection: dict) -> None:
    with open(path, "w") as f:
        json.dump({"selection": selection, "categories": categories}, f, indent=1)
    logger.info("wrote %d categories to %s", len(categories), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None,
                        help="folder holding ADE20K_2021_17_01 (default: $DETECTRON2_DATASETS, else datasets)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--categories", default=None,
                        help="json list of {trainId, id, name} to use instead of selecting classes from the data")
    parser.add_argument("--rule", default="both", choices=RULES,
                        help="class selection: present in both splits (default), in train, or in any")
    parser.add_argument("--min-images", type=int, default=1,
                        help="images of a split a class must appear in to count as present (default 1)")
    parser.add_argument("--max-short-side", type=int, default=DEFAULT_MAX_SHORT_SIDE,
                        help="resize images whose shorter side is longer (default 512; 0 = keep sizes)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    paths = {s: ade20k_paths(root, s) for s in SPLITS}
    full_root = paths["train"]["full_root"]
    entries, objectnames = read_index(full_root)
    if args.categories:
        require_raw_input(args.categories, "ADE20K-full category list", "--categories argument")
        categories = load_full_categories(args.categories)
        selection = {"source": os.path.abspath(args.categories)}
    else:
        counts = count_classes(entries, args.workers)
        classes = select_classes(counts, args.rule, args.min_images)
        categories = categories_from_selection(classes, objectnames)
        selection = {"rule": args.rule, "min_images": args.min_images}
    if not categories:
        raise ValueError(f"no class selected from {full_root} (rule {args.rule!r}, --min-images {args.min_images})")
    logger.info("%d classes", len(categories))
    write_categories(paths["train"]["full_categories_json"], categories, selection)

    out_dirs = {s: (paths[s]["full_image_root"], paths[s]["full_sem_seg_root"]) for s in args.splits}
    for image_dir, label_dir in out_dirs.values():
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
    todo = [e for e in entries if e[0] in out_dirs]
    fn = functools.partial(convert_image, lut=train_id_lut(categories), out_dirs=out_dirs,
                           max_short_side=args.max_short_side)
    written = map_images(fn, todo, args.workers, "converting")
    logger.info("wrote %d images and labels under %s", len(written), full_root)
    return len(written)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
