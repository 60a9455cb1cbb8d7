"""Helpers shared by the real-dataset registrations: root folder, lazy existence checks, loaders.

Registration never touches the disk: every loader checks its folders only when
``DatasetCatalog.get`` calls it, and a missing one raises a FileNotFoundError that names the expected
path and points to ``datasets/README.md``.
"""
import json
import os
from typing import Callable, Iterable, List

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "load_panoptic_with_sem_seg",
    "DATASETS_DEFAULT",
    "DATASETS_ENV",
    "README_HINT",
    "datasets_root",
    "load_json",
    "load_sem_seg_by_labels",
    "reduce_zero_label",
    "register_or_replace",
    "require_paths",
]

DATASETS_ENV = "DETECTRON2_DATASETS"
DATASETS_DEFAULT = "datasets"
README_HINT = "datasets/README.md"


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, else ``datasets`` (relative to the working directory, as detectron2)."""
    return os.environ.get(DATASETS_ENV, DATASETS_DEFAULT)


def require_paths(dataset_name: str, paths: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the first missing path of ``dataset_name`` and the README."""
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Dataset {dataset_name!r} expects {os.path.abspath(path)}, which does not exist. Set "
                f"${DATASETS_ENV} to the folder that holds the datasets (now {os.path.abspath(datasets_root())}) "
                f"and prepare the data as described in {README_HINT}."
            )


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_sem_seg_by_labels(dataset_name: str, gt_root: str, image_root: str, gt_ext: str = "png",
                           image_ext: str = "jpg") -> List[dict]:
    """Dicts (``file_name``, ``sem_seg_file_name``, ``height``/``width`` absent) for every label file.

    Unlike detectron2's ``load_sem_seg`` this lists only ``gt_root`` and builds each image path from
    the label's stem, so an image folder holding more images than the split (PASCAL VOC's
    ``JPEGImages``) is not scanned. A label without its image is an error naming both.
    """
    require_paths(dataset_name, (image_root, gt_root))
    dicts = []
    for name in sorted(os.listdir(gt_root)):
        stem, ext = os.path.splitext(name)
        if ext.lower() != "." + gt_ext:
            continue
        image = os.path.join(image_root, f"{stem}.{image_ext}")
        if not os.path.isfile(image):
            raise FileNotFoundError(
                f"Dataset {dataset_name!r}: label {os.path.join(gt_root, name)} has no image {image} "
                f"(see {README_HINT})."
            )
        dicts.append({"file_name": image, "sem_seg_file_name": os.path.join(gt_root, name), "image_id": stem})
    if not dicts:
        raise FileNotFoundError(
            f"Dataset {dataset_name!r}: no *.{gt_ext} label files in {os.path.abspath(gt_root)} "
            f"(see {README_HINT} for the preparation command)."
        )
    return dicts


def register_or_replace(name: str, loader: Callable[[], list], **metadata) -> None:
    """Register ``name`` (replacing an earlier registration, e.g. detectron2's builtin) with metadata."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def reduce_zero_label(label: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """H x W uint8 labels ``k - 1``, with 0 (unlabelled / background) -> ``ignore_label`` (ADE20K, PASCAL-Context)."""
    out = label.astype(np.int64) - 1
    out[label == 0] = ignore_label
    if out.max(initial=0) > np.iinfo(np.uint8).max:
        raise ValueError(f"label {int(label.max())} does not fit in an 8-bit label file after the shift")
    return out.astype(np.uint8)


def load_panoptic_with_sem_seg(name: str, paths: dict, thing_map: dict, stuff_map: dict) -> list:
    """Panoptic records (COCO panoptic json) with contiguous category ids, ``isthing`` and the semantic
    label file, as Mask2Former's COCO and ADE20K panoptic loaders produce.

    ``paths`` has ``panoptic_json``, ``image_root`` (``<stem>.jpg``), ``panoptic_root`` and
    ``sem_seg_root`` (``<stem>.png`` each); ``thing_map``/``stuff_map`` map dataset ids to contiguous ids.
    """
    require_paths(name, (paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], paths["sem_seg_root"]))
    dicts = []
    for ann in load_json(paths["panoptic_json"])["annotations"]:
        segments = []
        for seg in ann["segments_info"]:
            isthing = seg["category_id"] in thing_map
            contiguous = (thing_map if isthing else stuff_map)[seg["category_id"]]
            segments.append(dict(seg, category_id=contiguous, isthing=isthing))
        stem = os.path.splitext(ann["file_name"])[0]
        dicts.append({
            "file_name": os.path.join(paths["image_root"], stem + ".jpg"),
            "image_id": ann["image_id"],
            "pan_seg_file_name": os.path.join(paths["panoptic_root"], ann["file_name"]),
            "sem_seg_file_name": os.path.join(paths["sem_seg_root"], ann["file_name"]),
            "segments_info": segments,
        })
    return dicts
