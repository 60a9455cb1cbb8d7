"""COCO registrations beyond detectron2's built-ins, with Mask2Former's names and metadata.

Registered (root ``$DETECTRON2_DATASETS``, default ``datasets``; layouts in ``datasets/README.md``):

* ``coco_2017_{train,val}_panoptic_with_sem_seg``: COCO panoptic (133 classes, ``coco_panoptic_seg``)
  plus the semantic labels written by ``datasets/prepare_coco_semantic_annos_from_panoptic.py``
  (``coco/panoptic_semseg_{train,val}2017``), so one dataset serves PANOPTIC_ON, SEMANTIC_ON and
  INSTANCE_ON (``json_file`` = the instances json). Mask2Former trains on detectron2's
  ``coco_2017_train_panoptic`` and tests on ``coco_2017_val_panoptic_with_sem_seg``.
* ``coco_2017_{train,test}_stuff_10k_sem_seg``: COCO-Stuff-10K, 171 classes (80 things + 91 stuff),
  labels written by ``datasets/prepare_coco_stuff_10k_sem_seg.py``.

* ``coco_2017_{train,val}``: detectron2's built-in COCO instances (80 classes, ``coco``), re-registered
  with the same metadata and detectron2's ``load_coco_json``, after a check that the json and the image
  folder exist (detectron2 registers them at import, under the root of that moment, unchecked).

The COCO panoptic datasets themselves (``coco_2017_*_panoptic``) are detectron2's built-ins.
"""
import functools
import os

from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata

from .common import (
    datasets_root,
    load_panoptic_with_sem_seg,
    load_sem_seg_by_labels,
    register_or_replace,
    require_paths,
)

__all__ = [
    "COCO_PANOPTIC_CLASSES",
    "COCO_STUFF_171_DATASET_IDS",
    "COCO_STUFF_171_CLASSES",
    "COCO_DATASET_NAMES",
    "COCO_INSTANCE_NAMES",
    "coco_panoptic_paths",
    "coco_stuff_10k_paths",
    "register_all_coco_extra",
    "register_all_coco_instances",
]

IGNORE_LABEL = 255
LABEL_DIVISOR = 1000
SPLITS = ("train", "val")
STUFF_10K_SPLITS = ("train", "test")

COCO_PANOPTIC_CLASSES = [c["name"] for c in COCO_CATEGORIES]
COCO_PANOPTIC_COLORS = [c["color"] for c in COCO_CATEGORIES]

# COCO-Stuff: dataset ids 1..90 are the 80 things (10 ids unused), 92..182 the 91 stuff classes.
COCO_THING_NAMES = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
COCO_STUFF_91_NAMES = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
]
COCO_STUFF_FIRST_STUFF_ID = 92
# index = contiguous class id (0..170); value = COCO-Stuff dataset id (1..182)
COCO_STUFF_171_DATASET_IDS = sorted(COCO_THING_NAMES) + list(
    range(COCO_STUFF_FIRST_STUFF_ID, COCO_STUFF_FIRST_STUFF_ID + len(COCO_STUFF_91_NAMES)))
COCO_STUFF_171_CLASSES = [COCO_THING_NAMES[i] for i in sorted(COCO_THING_NAMES)] + COCO_STUFF_91_NAMES
_PANOPTIC_COLOR = {c["name"]: c["color"] for c in COCO_CATEGORIES}
COCO_STUFF_171_COLORS = [
    _PANOPTIC_COLOR.get(name, [(37 * i) % 256, (91 * i) % 256, (173 * i) % 256])
    for i, name in enumerate(COCO_STUFF_171_CLASSES)
]

COCO_DATASET_NAMES = {
    "panoptic_with_sem_seg": {s: f"coco_2017_{s}_panoptic_with_sem_seg" for s in SPLITS},
    "stuff_10k_sem_seg": {s: f"coco_2017_{s}_stuff_10k_sem_seg" for s in STUFF_10K_SPLITS},
}
COCO_INSTANCE_NAMES = {s: f"coco_2017_{s}" for s in SPLITS}  # detectron2's built-in names


def coco_panoptic_paths(root: str, split: str) -> dict:
    """Paths of COCO 2017 panoptic ``split`` ("train"/"val"), as detectron2's built-ins expect them."""
    coco = os.path.join(root, "coco")
    return {
        "image_root": os.path.join(coco, f"{split}2017"),
        "panoptic_root": os.path.join(coco, f"panoptic_{split}2017"),
        "panoptic_json": os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
        "sem_seg_root": os.path.join(coco, f"panoptic_semseg_{split}2017"),
        "instances_json": os.path.join(coco, "annotations", f"instances_{split}2017.json"),
    }


def coco_stuff_10k_paths(root: str, split: str) -> dict:
    """Paths of COCO-Stuff-10K ``split`` ("train"/"test"); raw files are those of cocostuff-10k-v1.1."""
    base = os.path.join(root, "coco", "coco_stuff_10k")
    return {
        "raw_image_root": os.path.join(base, "images"),
        "raw_annotation_root": os.path.join(base, "annotations"),
        "image_list": os.path.join(base, "imageLists", f"{split}.txt"),
        "image_root": os.path.join(base, "images_detectron2", split),
        "sem_seg_root": os.path.join(base, "annotations_detectron2", split),
    }


def register_all_coco_extra(root: str = None) -> list:
    """(Re-)register the COCO datasets of this module under ``root``; returns their names."""
    root = root if root is not None else datasets_root()
    thing_ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    # As Mask2Former: both maps go to the 133 contiguous ids (the model predicts all 133 classes).
    contiguous = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    thing_map = {d: contiguous[d] for d in thing_ids}
    for split in SPLITS:
        paths = coco_panoptic_paths(root, split)
        name = COCO_DATASET_NAMES["panoptic_with_sem_seg"][split]
        register_or_replace(
            name, functools.partial(load_panoptic_with_sem_seg, name, paths, thing_map, dict(contiguous)),
            thing_classes=[COCO_PANOPTIC_CLASSES[contiguous[d]] for d in thing_ids],
            thing_colors=[COCO_PANOPTIC_COLORS[contiguous[d]] for d in thing_ids],
            stuff_classes=list(COCO_PANOPTIC_CLASSES), stuff_colors=list(COCO_PANOPTIC_COLORS),
            thing_dataset_id_to_contiguous_id=thing_map, stuff_dataset_id_to_contiguous_id=dict(contiguous),
            image_root=paths["image_root"], panoptic_root=paths["panoptic_root"],
            panoptic_json=paths["panoptic_json"], sem_seg_root=paths["sem_seg_root"],
            json_file=paths["instances_json"], evaluator_type="coco_panoptic_seg",
            ignore_label=IGNORE_LABEL, label_divisor=LABEL_DIVISOR)
    for split in STUFF_10K_SPLITS:
        paths = coco_stuff_10k_paths(root, split)
        name = COCO_DATASET_NAMES["stuff_10k_sem_seg"][split]
        register_or_replace(
            name, functools.partial(load_sem_seg_by_labels, name, paths["sem_seg_root"], paths["image_root"]),
            stuff_classes=list(COCO_STUFF_171_CLASSES), stuff_colors=COCO_STUFF_171_COLORS,
            image_root=paths["image_root"], sem_seg_root=paths["sem_seg_root"],
            evaluator_type="sem_seg", ignore_label=IGNORE_LABEL)
    return [n for kind in COCO_DATASET_NAMES.values() for n in kind.values()]


def _load_instances(name: str, json_file: str, image_root: str) -> list:
    """detectron2's loader; with ``name`` it checks the json's categories against the metadata."""
    require_paths(name, (json_file, image_root))
    return load_coco_json(json_file, image_root, name)


def register_all_coco_instances(root: str = None) -> list:
    """(Re-)register detectron2's ``coco_2017_{train,val}`` under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    root = root if root is not None else datasets_root()
    for split in SPLITS:
        paths = coco_panoptic_paths(root, split)
        name = COCO_INSTANCE_NAMES[split]
        register_or_replace(
            name, functools.partial(_load_instances, name, paths["instances_json"], paths["image_root"]),
            json_file=paths["instances_json"], image_root=paths["image_root"], evaluator_type="coco",
            **_get_builtin_metadata("coco"))
    return list(COCO_INSTANCE_NAMES.values())


register_all_coco_extra()
register_all_coco_instances()
