"""The dataset checker behind ``tools/check_dataset.py``: read every annotation of a registered dataset
and report, before training, what would make training or evaluation fail or go wrong.

For a dataset (any registered one: ``DATASETS.CUSTOM``, built-in, toy) it checks, per the metadata:

* the COCO json files (``json_file``, ``panoptic_json``): category ids not in ``categories``, empty or
  degenerate masks (polygons under 3 points or of zero area, empty RLE, RLE of another size, boxes of
  zero size), a panoptic set with no stuff (or no thing) class;
* every record (``DatasetCatalog.get``; when the loader refuses the files, the records the jsons or
  label folder describe): the image exists and decodes, and matches its stated size; the semantic label
  PNG is single-channel (not RGB colour), holds only ids ``0..K-1`` or the ignore label, has a labelled
  pixel and the image's size; the panoptic PNG has the image's size, a pixel for every segment of its
  ``segments_info`` and no unlisted segment.

Every :class:`~.custom_check_files.Problem` names its file.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from tabulate import tabulate
from tqdm import tqdm

from .custom_check_files import (
    PROBLEM_KINDS,
    Problem,
    check_image,
    check_instances_json,
    check_label_png,
    check_panoptic_json,
    check_panoptic_png,
    instance_records,
    panoptic_records,
)

__all__ = ["check_dataset", "format_summary", "summarize"]

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_LABEL = 255  # detectron2's convention when the metadata has no ignore_label
LOADER_ERRORS = (OSError, ValueError, KeyError, AssertionError)  # what dataset loaders raise on bad files


def _sem_seg_pairs(sem_seg_root: str, image_root: str) -> List[Dict]:
    """Records pairing each label file with the image of the same stem (any extension)."""
    images = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(image_root))} if os.path.isdir(image_root) else {}
    records = []
    for name in sorted(os.listdir(sem_seg_root)):
        stem = os.path.splitext(name)[0]
        records.append({"file_name": os.path.join(image_root, images.get(stem, stem + ".jpg")),
                        "sem_seg_file_name": os.path.join(sem_seg_root, name)})
    return records


def _fallback_records(meta) -> List[Dict]:
    """The records the dataset's files describe, without its loader's strictness."""
    if meta.get("panoptic_json") and os.path.isfile(meta.panoptic_json):
        return panoptic_records(meta.panoptic_json, meta.get("image_root", ""), meta.get("panoptic_root", ""),
                                meta.get("sem_seg_root", ""))
    if meta.get("json_file") and os.path.isfile(meta.json_file):
        return instance_records(meta.json_file, meta.get("image_root", ""))
    if meta.get("sem_seg_root") and os.path.isdir(meta.sem_seg_root):
        return _sem_seg_pairs(meta.sem_seg_root, meta.get("image_root", ""))
    return []


def _records(name: str, meta) -> Tuple[List[Dict], List[Problem]]:
    try:
        return DatasetCatalog.get(name), []
    except LOADER_ERRORS as e:
        source = meta.get("panoptic_json") or meta.get("json_file") or meta.get("sem_seg_root") or name
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return _fallback_records(meta), [Problem("unloadable", source, f"the loader of {name!r} failed: {message}")]


def _check_record(record: Dict, classes: list, ignore_label: int) -> List[Problem]:
    size = (record["height"], record["width"]) if "height" in record and "width" in record else None
    problems, image_size = check_image(record["file_name"], size)
    if "sem_seg_file_name" in record:
        problems += check_label_png(record["sem_seg_file_name"], image_size, len(classes), ignore_label)
    if "pan_seg_file_name" in record:
        problems += check_panoptic_png(record["pan_seg_file_name"], image_size, record.get("segments_info", []))
    return problems


def check_dataset(name: str, progress: bool = True) -> Tuple[List[Problem], int]:
    """Every problem of registered dataset ``name`` and its record count. ``progress`` shows a progress
    bar on a terminal."""
    if name not in DatasetCatalog.list():
        return [Problem("unloadable", name, f"dataset {name!r} is not registered: describe it in DATASETS.CUSTOM "
                                            f"of a config and pass the config")], 0
    meta = MetadataCatalog.get(name)
    problems = []
    if meta.get("json_file"):
        problems += check_instances_json(meta.json_file)
    if meta.get("panoptic_json"):
        thing_map = meta.get("thing_dataset_id_to_contiguous_id")
        problems += check_panoptic_json(meta.panoptic_json, set(thing_map) if thing_map is not None else None)
    records, load_problems = _records(name, meta)
    problems += load_problems
    classes = meta.get("stuff_classes") or meta.get("thing_classes") or []
    ignore_label = meta.get("ignore_label", DEFAULT_IGNORE_LABEL)
    for record in tqdm(records, desc=f"checking {name}", unit="image", disable=None if progress else True):
        problems += _check_record(record, classes, ignore_label)
    logger.debug("Dataset %r: %d records, %d problem(s).", name, len(records), len(problems))
    return problems, len(records)


def summarize(problems: List[Problem]) -> "OrderedDict[str, List[Problem]]":
    """Problems grouped by kind, in PROBLEM_KINDS order."""
    groups = OrderedDict((kind, []) for kind in PROBLEM_KINDS)
    for problem in problems:
        groups[problem.kind].append(problem)
    return OrderedDict((k, v) for k, v in groups.items() if v)


def format_summary(problems: List[Problem], max_listed: int = 20) -> str:
    """Each problem (at most ``max_listed`` per kind), then a table: kind, count, first file."""
    groups = summarize(problems)
    lines = []
    for kind, found in groups.items():
        lines += [f"[{kind}] {p}" for p in found[:max_listed]]
        if len(found) > max_listed:
            lines.append(f"[{kind}] ... and {len(found) - max_listed} more")
    rows = [(PROBLEM_KINDS[k], len(v), v[0].file) for k, v in groups.items()]
    if not rows:
        return ""
    return "\n".join(lines + ["", tabulate(rows, headers=("problem", "count", "first file"), tablefmt="pipe")])
