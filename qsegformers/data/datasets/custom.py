"""Registration of the datasets described by ``DATASETS.CUSTOM.{TRAIN,TEST}`` (keys: ``custom_config.py``).

Called at start-up (:func:`qsegformers.engine.defaults.adapt_cfg_to_machine`, i.e. ``train_net.py`` and
the tools), before the config is validated. Unlike the built-in registrations this reads the disk: the
folders must exist and the json categories give the metadata, so a wrong path or an inconsistent class
list is a start-up error naming the key and the file. The records are loaded lazily, by detectron2's
loaders where they exist (``load_coco_json``; the sem_seg pairing of ``common.load_sem_seg_by_labels``),
so the evaluators are detectron2's own.

Metadata per format (contiguous class id = position of the category in the json sorted by id, or the
label id for ``sem_seg``):

* ``coco_instance``: ``thing_classes``/``thing_colors``/``thing_dataset_id_to_contiguous_id`` from the
  json, ``json_file``, evaluator ``coco``;
* ``coco_panoptic``: as Mask2Former's COCO panoptic, ``stuff_*`` covers every class and ``thing_*`` the
  things (``isthing`` of the json, else ``THING_CLASSES``); ``panoptic_root``/``panoptic_json``,
  ``sem_seg_root`` and ``json_file`` when given, evaluator ``coco_panoptic_seg``;
* ``sem_seg``: ``stuff_classes`` = ``CLASS_NAMES``, evaluator ``sem_seg``.

Colours come from the json categories' ``color``, else ``COLORS``, else detectron2's palette.
"""
import functools
import json
import logging
import os
from typing import List, Optional

from detectron2.data.datasets import load_coco_json
from detectron2.utils.colormap import colormap

from .common import load_sem_seg_by_labels, register_or_replace
from .custom_config import CUSTOM_SLOTS, NUM_CLASSES_FROM_DATASET

__all__ = [
    "CustomDatasetError",
    "FORMAT_EVALUATORS",
    "custom_slots",
    "register_custom_dataset",
    "register_custom_datasets",
]

logger = logging.getLogger(__name__)

FORMAT_EVALUATORS = {"coco_instance": "coco", "coco_panoptic": "coco_panoptic_seg", "sem_seg": "sem_seg"}
LABEL_DIVISOR = 1000  # panoptic inference encodes class * LABEL_DIVISOR + instance
CONFIG_KEY_FIELD = "config_key"  # metadata field naming the DATASETS.CUSTOM slot a dataset came from


class CustomDatasetError(ValueError):
    """A ``DATASETS.CUSTOM`` slot that cannot be registered; the message names the key and the file."""


def custom_slots(cfg) -> List[tuple]:
    """``(config key, slot node)`` of every used slot (non-empty ``NAME``) of ``cfg.DATASETS.CUSTOM``."""
    custom = cfg.DATASETS.get("CUSTOM")
    if custom is None:
        return []
    return [(f"DATASETS.CUSTOM.{s}", custom[s]) for s in CUSTOM_SLOTS if custom[s].NAME]


def _require(key: str, slot, fields: tuple) -> None:
    """Each of ``fields`` must be set and name an existing path."""
    for field in fields:
        path = slot[field]
        if not path:
            raise CustomDatasetError(f"{key}.FORMAT = {slot.FORMAT!r} needs {key}.{field} (it is empty).")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{key}.{field} = {path!r}: {os.path.abspath(path)} does not exist.")


def _read_categories(key: str, path: str) -> List[dict]:
    """The json's ``categories`` sorted by id; errors name the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CustomDatasetError(f"{key}.JSON: cannot read {path} as json ({e}).") from e
    categories = data.get("categories") if isinstance(data, dict) else None
    if not categories:
        raise CustomDatasetError(f"{key}.JSON: {path} has no 'categories' list; COCO json files list them.")
    ids = [c.get("id") for c in categories]
    if len(set(ids)) != len(ids) or any(not isinstance(i, int) for i in ids):
        raise CustomDatasetError(f"{key}.JSON: the category ids of {path} must be distinct integers; got {ids}.")
    return sorted(categories, key=lambda c: c["id"])


def _check_names(key: str, slot, names: List[str], source: str) -> None:
    if slot.CLASS_NAMES and list(slot.CLASS_NAMES) != names:
        raise CustomDatasetError(
            f"{key}.CLASS_NAMES = {list(slot.CLASS_NAMES)} differs from the categories of {source} "
            f"({names}); the json decides: remove {key}.CLASS_NAMES or make it equal.")


def _colors(key: str, slot, count: int, categories: Optional[List[dict]] = None) -> List[list]:
    """One [R, G, B] per class: the categories' ``color``, else ``COLORS``, else detectron2's palette."""
    if categories and all("color" in c for c in categories):
        return [list(c["color"]) for c in categories]
    if slot.COLORS:
        if len(slot.COLORS) != count or any(len(c) != 3 for c in slot.COLORS):
            raise CustomDatasetError(f"{key}.COLORS must hold {count} [R, G, B] triples (one per class); "
                                     f"got {len(slot.COLORS)} entries.")
        return [list(c) for c in slot.COLORS]
    palette = colormap(rgb=True, maximum=255).astype(int).tolist()
    return [palette[i % len(palette)] for i in range(count)]


def _evaluator_type(slot) -> str:
    return slot.EVALUATOR_TYPE or FORMAT_EVALUATORS[slot.FORMAT]


# ---------------------------------------------------------------- loaders (lazy, per DatasetCatalog.get)


def _load_instances(name: str, json_file: str, image_root: str) -> List[dict]:
    """detectron2's ``load_coco_json``, with its bare KeyError for an unknown category id turned into a
    message that names the json."""
    try:
        return load_coco_json(json_file, image_root, name)
    except KeyError as e:
        raise ValueError(f"{json_file}: {e.args[0]} Run tools/check_dataset.py to list every problem.") from e


def _load_panoptic(json_file: str, image_root: str, panoptic_root: str, sem_seg_root: str,
                   thing_map: dict, stuff_map: dict) -> List[dict]:
    """COCO panoptic records: image path and size from the json's ``images``, contiguous ``category_id``
    and ``isthing`` in ``segments_info``, and ``sem_seg_file_name`` when ``sem_seg_root`` is given."""
    with open(json_file) as f:
        data = json.load(f)
    images = {img["id"]: img for img in data.get("images", [])}
    dicts = []
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            raise ValueError(f"{json_file}: annotation {ann['file_name']} has image_id {ann['image_id']}, "
                             f"which is not in 'images'.")
        segments = []
        for seg in ann["segments_info"]:
            if seg["category_id"] not in stuff_map:
                raise ValueError(f"{json_file}: segment {seg['id']} of {ann['file_name']} has category_id "
                                 f"{seg['category_id']}, which is not in 'categories'. Run "
                                 f"tools/check_dataset.py to list every problem.")
            segments.append(dict(seg, category_id=stuff_map[seg["category_id"]],
                                 isthing=seg["category_id"] in thing_map))
        record = {"file_name": os.path.join(image_root, image["file_name"]), "image_id": ann["image_id"],
                  "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]), "segments_info": segments}
        if "height" in image and "width" in image:
            record.update(height=image["height"], width=image["width"])
        if sem_seg_root:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, os.path.splitext(ann["file_name"])[0] + ".png")
        dicts.append(record)
    return dicts


# ---------------------------------------------------------------- registration per format


def _register_instances(key: str, slot) -> int:
    _require(key, slot, ("IMAGE_ROOT", "JSON"))
    categories = _read_categories(key, slot.JSON)
    names = [c["name"] for c in categories]
    _check_names(key, slot, names, slot.JSON)
    register_or_replace(
        slot.NAME, functools.partial(_load_instances, slot.NAME, slot.JSON, slot.IMAGE_ROOT),
        thing_classes=names, thing_colors=_colors(key, slot, len(names), categories),
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
        json_file=slot.JSON, image_root=slot.IMAGE_ROOT, evaluator_type=_evaluator_type(slot),
        **{CONFIG_KEY_FIELD: key})
    return len(names)


def _is_thing(key: str, slot, category: dict, path: str) -> bool:
    if "isthing" in category:
        return bool(category["isthing"])
    if not slot.THING_CLASSES:
        raise CustomDatasetError(
            f"{key}.JSON: category {category['name']!r} of {path} has no 'isthing'; list the thing classes "
            f"in {key}.THING_CLASSES (the others are stuff).")
    return category["name"] in slot.THING_CLASSES


def _register_panoptic(key: str, slot) -> int:
    _require(key, slot, ("IMAGE_ROOT", "JSON", "PANOPTIC_ROOT")
             + tuple(f for f in ("SEM_SEG_ROOT", "INSTANCE_JSON") if slot[f]))
    categories = _read_categories(key, slot.JSON)
    names = [c["name"] for c in categories]
    _check_names(key, slot, names, slot.JSON)
    unknown = sorted(set(slot.THING_CLASSES) - set(names))
    if unknown:
        raise CustomDatasetError(f"{key}.THING_CLASSES names {unknown}, which are not categories of {slot.JSON}.")
    colors = _colors(key, slot, len(names), categories)
    things = [i for i, c in enumerate(categories) if _is_thing(key, slot, c, slot.JSON)]
    thing_map = {categories[i]["id"]: i for i in things}
    stuff_map = {c["id"]: i for i, c in enumerate(categories)}
    optional = {"sem_seg_root": slot.SEM_SEG_ROOT, "json_file": slot.INSTANCE_JSON}
    register_or_replace(
        slot.NAME, functools.partial(_load_panoptic, slot.JSON, slot.IMAGE_ROOT, slot.PANOPTIC_ROOT,
                                     slot.SEM_SEG_ROOT, thing_map, stuff_map),
        stuff_classes=names, stuff_colors=colors, thing_classes=[names[i] for i in things],
        thing_colors=[colors[i] for i in things], thing_dataset_id_to_contiguous_id=thing_map,
        stuff_dataset_id_to_contiguous_id=stuff_map, image_root=slot.IMAGE_ROOT,
        panoptic_root=slot.PANOPTIC_ROOT, panoptic_json=slot.JSON, evaluator_type=_evaluator_type(slot),
        ignore_label=slot.IGNORE_LABEL, label_divisor=LABEL_DIVISOR,
        **{k: v for k, v in optional.items() if v}, **{CONFIG_KEY_FIELD: key})
    return len(names)


def _register_sem_seg(key: str, slot) -> int:
    _require(key, slot, ("IMAGE_ROOT", "SEM_SEG_ROOT"))
    if not slot.CLASS_NAMES:
        raise CustomDatasetError(f"{key}.CLASS_NAMES is empty: label PNGs hold only ids, so list the class "
                                 f"names (id 0 first), e.g. {key}.CLASS_NAMES ['background', 'cat'].")
    names = list(slot.CLASS_NAMES)
    loader = functools.partial(load_sem_seg_by_labels, slot.NAME, slot.SEM_SEG_ROOT, slot.IMAGE_ROOT,
                               slot.LABEL_EXT.lstrip("."), slot.IMAGE_EXT.lstrip("."))
    register_or_replace(
        slot.NAME, loader, stuff_classes=names, stuff_colors=_colors(key, slot, len(names)),
        image_root=slot.IMAGE_ROOT, sem_seg_root=slot.SEM_SEG_ROOT, ignore_label=slot.IGNORE_LABEL,
        evaluator_type=_evaluator_type(slot), **{CONFIG_KEY_FIELD: key})
    return len(names)


_REGISTER = {"coco_instance": _register_instances, "coco_panoptic": _register_panoptic, "sem_seg": _register_sem_seg}


def register_custom_dataset(key: str, slot) -> int:
    """Register the dataset of one ``DATASETS.CUSTOM`` slot (``key`` names it in errors); returns its
    class count. Raises CustomDatasetError / FileNotFoundError naming the key and the file."""
    if slot.FORMAT not in _REGISTER:
        raise CustomDatasetError(f"{key}.FORMAT = {slot.FORMAT!r}: choose one of {', '.join(_REGISTER)}.")
    count = _REGISTER[slot.FORMAT](key, slot)
    logger.info("Registered dataset %r (%s, %d classes) from %s.", slot.NAME, slot.FORMAT, count, key)
    return count


def _derive_num_classes(cfg) -> List[str]:
    """With ``NUM_CLASSES`` at the sentinel, set it from the first dataset that lists its classes."""
    from ...engine.validation import dataset_classes  # the engine's rule: which class list a dataset trains

    for dataset_name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        field, classes = dataset_classes(cfg, dataset_name)
        if classes is not None:
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(classes)
            return [f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {NUM_CLASSES_FROM_DATASET} -> {len(classes)}: the "
                    f"{field} of dataset {dataset_name!r}."]
    return []  # left at the sentinel: validation reports it


def register_custom_datasets(cfg) -> List[str]:
    """Register every used ``DATASETS.CUSTOM`` slot of the unfrozen ``cfg``; then, if
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` is -1, set it from the datasets. Returns one note per config change."""
    custom = cfg.DATASETS.get("CUSTOM", {})
    for slot_name in CUSTOM_SLOTS if custom else ():
        if custom[slot_name].FORMAT and not custom[slot_name].NAME:
            raise CustomDatasetError(f"DATASETS.CUSTOM.{slot_name}.FORMAT is set but its NAME is empty: name "
                                     f"the dataset and list it in DATASETS.{slot_name}.")
    for key, slot in custom_slots(cfg):
        register_custom_dataset(key, slot)
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == NUM_CLASSES_FROM_DATASET:
        return _derive_num_classes(cfg)
    return []
