"""ADE20K registrations with Mask2Former's names, layout and metadata.

Registered (root ``$DETECTRON2_DATASETS``, default ``datasets``; layouts in ``datasets/README.md``):

* ``ade20k_sem_seg_{train,val}``: 150-class semantic segmentation (``sem_seg``). detectron2 registers
  these at import without ``stuff_colors`` and without an existence check; they are re-registered
  here with both, same files and class names.
* ``ade20k_full_sem_seg_{train,val}``: ADE20K-full, 847 classes, 16-bit TIFF labels, ignore 65535. The
  class names are read, when the metadata is accessed, from ``ADE20K_2021_17_01/ade20k_full_categories.json``
  (written by ``datasets/prepare_ade20k_full_sem_seg.py``); placeholders when that file is absent.
* ``ade20k_panoptic_{train,val}``: 150 classes (100 things + 50 stuff), ``ade20k_panoptic_seg``,
  with the semantic labels of ``annotations_detectron2`` and the instance json for INSTANCE_ON.
* ``ade20k_instance_{train,val}``: the 100 thing classes (``coco``).

As in Mask2Former, the panoptic ``thing_dataset_id_to_contiguous_id`` maps into the 150 contiguous ids
(the model predicts all 150 classes), whereas the instance datasets map the 100 things to 0..99.

The readers of the raw releases (instance-challenge PNGs, category mapping, ADE-full category list) live
here too, shared by the ``datasets/prepare_ade20k_*.py`` scripts.
"""
import functools
import json
import os

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .common import (
    datasets_root,
    load_panoptic_with_sem_seg,
    load_sem_seg_by_labels,
    register_or_replace,
    require_paths,
)

__all__ = [
    "ADE20K_150_CLASSES",
    "ADE20K_150_COLORS",
    "ADE20K_FULL_IGNORE_LABEL",
    "ADE20K_FULL_NUM_CLASSES",
    "ADE20K_THING_IDS",
    "ADE20K_DATASET_NAMES",
    "ADE20K_FULL_SOURCE",
    "ADE20K_INSTANCE_SOURCE",
    "ade20k_full_classes",
    "ade20k_paths",
    "instance_segments",
    "load_full_categories",
    "read_instance_catid_mapping",
    "register_all_ade20k",
    "require_raw_input",
]

ADE20K_ROOT = "ADEChallengeData2016"
ADE20K_FULL_ROOT = "ADE20K_2021_17_01"
SPLITS = {"train": "training", "val": "validation"}
IGNORE_LABEL = 255
ADE20K_FULL_IGNORE_LABEL = 65535  # labels are 16-bit: 847 classes do not fit in uint8
ADE20K_FULL_NUM_CLASSES = 847
ADE20K_FULL_COLOR_SEED = 847
LABEL_DIVISOR = 1000
ADE20K_INSTANCE_MAPPING = "ade20k_instance_catid_mapping.txt"  # instance id (1..100) -> ADE150 id (1..150)
ADE20K_INSTANCE_CATEGORIES = "ade20k_instance_imgCatIds.json"  # COCO-style list of the 100 categories
ADE20K_FULL_CATEGORIES = "ade20k_full_categories.json"  # written by prepare_ade20k_full_sem_seg.py
ADE20K_INSTANCE_SOURCE = (
    "ADE20K instance-segmentation challenge: http://sceneparsing.csail.mit.edu/data/ChallengeData2017/"
    "annotations_instance.tar (PNGs); the two devkit files ade20k_instance_catid_mapping.txt and "
    "ade20k_instance_imgCatIds.json ship with Mask2Former (datasets/) and the challenge devkit"
)
ADE20K_FULL_SOURCE = "ADE20K 2021 release ADE20K_2021_17_01.zip from https://ade20k.csail.mit.edu (registration)"

ADE20K_150_CLASSES = list(ADE20K_SEM_SEG_CATEGORIES)  # detectron2's names (== MaskFormer's)

# The usual ADE20K palette (mmsegmentation / Mask2Former), index = contiguous class id.
ADE20K_150_COLORS = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
]

# Contiguous ids (0..149) of the 100 "thing" classes of ADE20K panoptic/instance (Mask2Former's
# ADE20K_150_CATEGORIES isthing=1); the panoptic and instance json files use these as category ids.
ADE20K_THING_IDS = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37,
    38, 39, 41, 42, 43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67,
    69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92,
    93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
    125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)

ADE20K_DATASET_NAMES = {
    "sem_seg": {s: f"ade20k_sem_seg_{s}" for s in SPLITS},
    "full_sem_seg": {s: f"ade20k_full_sem_seg_{s}" for s in SPLITS},
    "panoptic": {s: f"ade20k_panoptic_{s}" for s in SPLITS},
    "instance": {s: f"ade20k_instance_{s}" for s in SPLITS},
}


def load_full_categories(path: str) -> list:
    """ADE-full categories ``[{"trainId", "id", "name"}]`` sorted by trainId (0..N-1, checked).

    ``path`` is our ``ade20k_full_categories.json`` (``{"categories": [...]}``) or a bare list in the same
    format as Mask2Former's ``ADE20K_SEM_SEG_FULL_CATEGORIES`` (``name``, ``id`` = ADE object index,
    ``trainId``).
    """
    with open(path) as f:
        data = json.load(f)
    cats = sorted(data["categories"] if isinstance(data, dict) else data, key=lambda c: c["trainId"])
    if [c["trainId"] for c in cats] != list(range(len(cats))):
        raise ValueError(f"{path}: the trainId values must be 0..{len(cats) - 1}, each once.")
    if len(cats) >= ADE20K_FULL_IGNORE_LABEL:
        raise ValueError(f"{path}: {len(cats)} categories do not fit below the ignore label "
                         f"{ADE20K_FULL_IGNORE_LABEL}.")
    return cats


@functools.lru_cache(maxsize=4)
def _full_names_from_file(path: str, mtime_ns: int) -> tuple:
    return tuple(c["name"] for c in load_full_categories(path))


def ade20k_full_classes(categories_json: str = None) -> list:
    """ADE-full class names, index = train id.

    From ``categories_json`` when given and present (re-read when the file changes); otherwise the
    placeholders ``ade20k_full_000``..``846`` (the official 847 names are not reproduced here).
    """
    if categories_json is not None and os.path.isfile(categories_json):
        return list(_full_names_from_file(categories_json, os.stat(categories_json).st_mtime_ns))
    return [f"ade20k_full_{i:03d}" for i in range(ADE20K_FULL_NUM_CLASSES)]


def ade20k_full_colors(num_classes: int = ADE20K_FULL_NUM_CLASSES) -> list:
    rng = np.random.default_rng(ADE20K_FULL_COLOR_SEED)
    return rng.integers(0, 256, size=(num_classes, 3)).tolist()


class _Ade20kFullMetadata(Metadata):
    """Metadata whose ``stuff_classes``/``stuff_colors`` are read from ``categories_json`` on access.

    Registration must not touch the disk, yet the names are only known once the prepare script has
    run; a property makes every reader (SemSegEvaluator at construction, Visualizer, demo) see them.
    """

    @property
    def stuff_classes(self) -> list:
        return ade20k_full_classes(self.__dict__.get("categories_json"))

    @property
    def stuff_colors(self) -> list:
        return ade20k_full_colors(len(self.stuff_classes))


def require_raw_input(path: str, what: str, source: str) -> None:
    """FileNotFoundError naming ``path`` (one raw input of a prepare script) and where to get it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {os.path.abspath(path)} does not exist. Get it from the "
                                f"{source}; the expected layout is in datasets/README.md.")


def read_instance_catid_mapping(path: str) -> dict:
    """``{instance-challenge id (1..100): contiguous ADE150 id (0..149)}`` from the devkit mapping file.

    The file has a header line, then one line per category whose first two whitespace-separated
    columns are the instance id and the 1-based ADE150 id (further columns, a name, are ignored).
    The ADE150 ids must be exactly the 100 ``ADE20K_THING_IDS`` (+1), which the loaders use.
    """
    require_raw_input(path, "ADE20K instance category mapping", ADE20K_INSTANCE_SOURCE)
    mapping = {}
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    for num, line in enumerate(lines, start=2):
        cols = line.split()
        if not cols:
            continue
        if len(cols) < 2 or not (cols[0].isdigit() and cols[1].isdigit()):
            raise ValueError(f"{path}:{num}: expected '<instance id> <ADE150 id> ...', got {line!r}")
        mapping[int(cols[0])] = int(cols[1]) - 1
    if sorted(mapping.values()) != sorted(ADE20K_THING_IDS):
        raise ValueError(f"{path}: the ADE150 ids (minus 1) must be the 100 thing ids ADE20K_THING_IDS, got "
                         f"{sorted(set(mapping.values()))}")
    return mapping


def instance_segments(ins_rgb: np.ndarray, mapping: dict, path: str = "") -> list:
    """``[(mask, category)]`` per instance of an instance-challenge PNG, in increasing instance id.

    ``ins_rgb``: H x W x 3 uint8, R = instance-challenge category (1..100), G = instance id (0 = none).
    ``mask``: H x W bool; ``category``: contiguous ADE150 id (0..149) through ``mapping``.
    """
    cat_ids, ins_ids = ins_rgb[..., 0], ins_rgb[..., 1]
    out = []
    for ins_id in np.unique(ins_ids):
        if ins_id == 0:
            continue
        mask = ins_ids == ins_id
        cats = np.unique(cat_ids[mask])
        if len(cats) != 1 or int(cats[0]) not in mapping:
            raise ValueError(f"{path}: instance {int(ins_id)} has category value(s) {cats.tolist()}; expected "
                             f"one instance-challenge id in 1..{max(mapping)}")
        out.append((mask, mapping[int(cats[0])]))
    return out


def ade20k_paths(root: str, split: str) -> dict:
    """Every path of one split (nothing is touched on disk). ``split`` is "train" or "val"."""
    ade, full, dirname = os.path.join(root, ADE20K_ROOT), os.path.join(root, ADE20K_FULL_ROOT), SPLITS[split]
    return {
        "image_root": os.path.join(ade, "images", dirname),
        "raw_sem_seg_root": os.path.join(ade, "annotations", dirname),
        "sem_seg_root": os.path.join(ade, "annotations_detectron2", dirname),
        "raw_instance_root": os.path.join(ade, "annotations_instance", dirname),
        "instance_mapping": os.path.join(ade, ADE20K_INSTANCE_MAPPING),
        "instance_categories": os.path.join(ade, ADE20K_INSTANCE_CATEGORIES),
        "panoptic_root": os.path.join(ade, f"ade20k_panoptic_{split}"),
        "panoptic_json": os.path.join(ade, f"ade20k_panoptic_{split}.json"),
        "instances_json": os.path.join(ade, f"ade20k_instance_{split}.json"),
        "full_root": full,
        "full_categories_json": os.path.join(full, ADE20K_FULL_CATEGORIES),
        "full_image_root": os.path.join(full, "images_detectron2", dirname),
        "full_sem_seg_root": os.path.join(full, "annotations_detectron2", dirname),
    }


def _load_instances(name: str, paths: dict, thing_map: dict) -> list:
    """COCO-format instances with contiguous category ids (0..99).

    ``load_coco_json`` is called without the dataset name so that it does not overwrite
    ``thing_classes`` with the json's category names (which differ in spelling between releases).
    """
    require_paths(name, (paths["instances_json"], paths["image_root"]))
    dicts = load_coco_json(paths["instances_json"], paths["image_root"])
    for record in dicts:
        for anno in record["annotations"]:
            if anno["category_id"] not in thing_map:
                raise ValueError(f"{paths['instances_json']}: category id {anno['category_id']} is not one of "
                                 f"the 100 ADE20K thing ids (ADE20K_THING_IDS).")
            anno["category_id"] = thing_map[anno["category_id"]]
    return dicts


def register_all_ade20k(root: str = None) -> list:
    """(Re-)register every ADE20K dataset under ``root`` (default ``$DETECTRON2_DATASETS``); returns names."""
    root = root if root is not None else datasets_root()
    classes, colors = ADE20K_150_CLASSES, ADE20K_150_COLORS
    things = [classes[i] for i in ADE20K_THING_IDS]
    thing_colors = [colors[i] for i in ADE20K_THING_IDS]
    pan_thing_map = {i: i for i in ADE20K_THING_IDS}
    pan_stuff_map = {i: i for i in range(len(classes))}
    inst_thing_map = {d: i for i, d in enumerate(ADE20K_THING_IDS)}
    for split in SPLITS:
        paths = ade20k_paths(root, split)
        name = ADE20K_DATASET_NAMES["sem_seg"][split]
        register_or_replace(
            name, functools.partial(load_sem_seg_by_labels, name, paths["sem_seg_root"], paths["image_root"]),
            stuff_classes=list(classes), stuff_colors=colors, image_root=paths["image_root"],
            sem_seg_root=paths["sem_seg_root"], evaluator_type="sem_seg", ignore_label=IGNORE_LABEL)

        name = ADE20K_DATASET_NAMES["full_sem_seg"][split]
        register_or_replace(
            name, functools.partial(load_sem_seg_by_labels, name, paths["full_sem_seg_root"],
                                    paths["full_image_root"], "tif", "jpg"))
        MetadataCatalog[name] = _Ade20kFullMetadata(name=name).set(
            categories_json=paths["full_categories_json"], image_root=paths["full_image_root"],
            sem_seg_root=paths["full_sem_seg_root"], evaluator_type="sem_seg",
            ignore_label=ADE20K_FULL_IGNORE_LABEL)

        name = ADE20K_DATASET_NAMES["panoptic"][split]
        register_or_replace(
            name, functools.partial(load_panoptic_with_sem_seg, name, paths, pan_thing_map, pan_stuff_map),
            stuff_classes=list(classes), stuff_colors=colors, thing_classes=things, thing_colors=thing_colors,
            thing_dataset_id_to_contiguous_id=pan_thing_map, stuff_dataset_id_to_contiguous_id=pan_stuff_map,
            image_root=paths["image_root"], panoptic_root=paths["panoptic_root"],
            panoptic_json=paths["panoptic_json"], sem_seg_root=paths["sem_seg_root"],
            json_file=paths["instances_json"], evaluator_type="ade20k_panoptic_seg",
            ignore_label=IGNORE_LABEL, label_divisor=LABEL_DIVISOR)

        name = ADE20K_DATASET_NAMES["instance"][split]
        register_or_replace(
            name, functools.partial(_load_instances, name, paths, inst_thing_map),
            thing_classes=things, thing_colors=thing_colors, thing_dataset_id_to_contiguous_id=inst_thing_map,
            image_root=paths["image_root"], json_file=paths["instances_json"], evaluator_type="coco")
    return [n for kind in ADE20K_DATASET_NAMES.values() for n in kind.values()]


register_all_ade20k()
