"""Cityscapes registrations: detectron2's built-in names, loaders and metadata, with existence checks.

Registered (root ``$DETECTRON2_DATASETS``, default ``datasets``; layout in ``datasets/README.md``):

* ``cityscapes_fine_sem_seg_{train,val}``: 19 classes, ``*_gtFine_labelTrainIds.png`` (``cityscapes_sem_seg``);
* ``cityscapes_fine_instance_seg_{train,val}``: 8 thing classes from ``*_gtFine_polygons.json``
  (``cityscapes_instance``);
* ``cityscapes_fine_panoptic_{train,val}``: ``gtFine/cityscapes_panoptic_{split}{/,.json}`` plus the
  labelTrainIds (``cityscapes_panoptic_seg``).

detectron2 registers the same names at import, under the root of that moment and without any check;
they are re-registered here with the same metadata and detectron2's own loaders, which run only after
the folders (and the files written by ``datasets/prepare_cityscapes.py``) are found.
"""
import functools
import glob
import os

from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES, _get_builtin_metadata
from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic

from .common import README_HINT, datasets_root, register_or_replace, require_paths

__all__ = ["CITYSCAPES_DATASET_NAMES", "cityscapes_paths", "cityscapes_panoptic_metadata", "register_all_cityscapes"]

SPLITS = ("train", "val")
IGNORE_LABEL = 255
LABEL_DIVISOR = 1000
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
PREPARE_SCRIPT = "datasets/prepare_cityscapes.py"

CITYSCAPES_DATASET_NAMES = {
    "sem_seg": {s: f"cityscapes_fine_sem_seg_{s}" for s in SPLITS},
    "instance_seg": {s: f"cityscapes_fine_instance_seg_{s}" for s in SPLITS},
    "panoptic": {s: f"cityscapes_fine_panoptic_{s}" for s in SPLITS},
}


def cityscapes_paths(root: str, split: str) -> dict:
    """Every path of one split (nothing is touched on disk), as detectron2's built-ins join them."""
    base = os.path.join(root, "cityscapes")
    return {
        "image_dir": os.path.join(base, "leftImg8bit", split) + os.sep,
        "gt_dir": os.path.join(base, "gtFine", split) + os.sep,
        "panoptic_root": os.path.join(base, "gtFine", f"cityscapes_panoptic_{split}"),
        "panoptic_json": os.path.join(base, "gtFine", f"cityscapes_panoptic_{split}.json"),
    }


def cityscapes_panoptic_metadata() -> dict:
    """detectron2's panoptic metadata: all 19 classes as both things and stuff, dataset id -> trainId."""
    names = [c["name"] for c in CITYSCAPES_CATEGORIES]
    colors = [c["color"] for c in CITYSCAPES_CATEGORIES]
    return {
        "thing_classes": list(names),
        "thing_colors": list(colors),
        "stuff_classes": list(names),
        "stuff_colors": list(colors),
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if not c["isthing"]},
    }


def _require_train_ids(name: str, gt_dir: str) -> None:
    """The labelTrainIds PNGs are not part of the download: ask for the prepare script if none exists."""
    if next(glob.iglob(os.path.join(gt_dir, "*", "*" + TRAIN_ID_SUFFIX)), None) is None:
        raise FileNotFoundError(
            f"Dataset {name!r} needs the *{TRAIN_ID_SUFFIX} files under {os.path.abspath(gt_dir)}, which do "
            f"not exist yet: run `python {PREPARE_SCRIPT}` (see {README_HINT})."
        )


def _load_semantic(name: str, paths: dict) -> list:
    require_paths(name, (paths["image_dir"], paths["gt_dir"]))
    _require_train_ids(name, paths["gt_dir"])
    return load_cityscapes_semantic(paths["image_dir"], paths["gt_dir"])


def _load_instances(name: str, paths: dict) -> list:
    require_paths(name, (paths["image_dir"], paths["gt_dir"]))
    return load_cityscapes_instances(paths["image_dir"], paths["gt_dir"], from_json=True, to_polygons=True)


def _load_panoptic(name: str, paths: dict, meta: dict) -> list:
    require_paths(name, (paths["image_dir"], paths["gt_dir"]))
    if not os.path.exists(paths["panoptic_json"]):
        raise FileNotFoundError(
            f"Dataset {name!r} expects {os.path.abspath(paths['panoptic_json'])} and the PNG folder "
            f"{os.path.abspath(paths['panoptic_root'])}: run `python {PREPARE_SCRIPT}` (see {README_HINT})."
        )
    require_paths(name, (paths["panoptic_root"],))
    _require_train_ids(name, paths["gt_dir"])
    return load_cityscapes_panoptic(paths["image_dir"], paths["panoptic_root"], paths["panoptic_json"], meta)


def register_all_cityscapes(root: str = None) -> list:
    """(Re-)register the Cityscapes train/val datasets under ``root`` (default ``$DETECTRON2_DATASETS``).

    Returns the registered names.
    """
    root = root if root is not None else datasets_root()
    panoptic_meta = cityscapes_panoptic_metadata()
    for split in SPLITS:
        paths = cityscapes_paths(root, split)
        image_dir, gt_dir = paths["image_dir"], paths["gt_dir"]

        name = CITYSCAPES_DATASET_NAMES["instance_seg"][split]
        register_or_replace(
            name, functools.partial(_load_instances, name, paths), image_dir=image_dir, gt_dir=gt_dir,
            evaluator_type="cityscapes_instance", **_get_builtin_metadata("cityscapes"))

        name = CITYSCAPES_DATASET_NAMES["sem_seg"][split]
        register_or_replace(
            name, functools.partial(_load_semantic, name, paths), image_dir=image_dir, gt_dir=gt_dir,
            evaluator_type="cityscapes_sem_seg", ignore_label=IGNORE_LABEL, **_get_builtin_metadata("cityscapes"))

        name = CITYSCAPES_DATASET_NAMES["panoptic"][split]
        register_or_replace(
            name, functools.partial(_load_panoptic, name, paths, panoptic_meta),
            panoptic_root=paths["panoptic_root"], image_root=paths["image_dir"].rstrip(os.sep),
            panoptic_json=paths["panoptic_json"], gt_dir=gt_dir.rstrip(os.sep),
            evaluator_type="cityscapes_panoptic_seg", ignore_label=IGNORE_LABEL, label_divisor=LABEL_DIVISOR,
            **panoptic_meta)
    return [n for kind in CITYSCAPES_DATASET_NAMES.values() for n in kind.values()]


register_all_cityscapes()
