"""Checks of single dataset files for the dataset checker (:mod:`.custom_check`).

Each function reads one file (an image, a label PNG, a panoptic PNG, a COCO json) and returns the
:class:`Problem` list it finds; a problem names its file. Sizes are ``(height, width)``.
"""
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ...utils.image_io import ImageReadError, read_image_any

__all__ = [
    "PROBLEM_KINDS",
    "Problem",
    "check_image",
    "check_instances_json",
    "check_label_png",
    "check_panoptic_json",
    "check_panoptic_png",
    "instance_records",
    "panoptic_records",
]

# kind -> what it means (one row of the checker's summary table each)
PROBLEM_KINDS = {
    "missing_file": "missing image or annotation file",
    "unreadable_file": "unreadable image or annotation file",
    "rgb_label": "label PNG saved as RGB colour instead of class ids",
    "label_out_of_range": "label values outside the classes",
    "unlisted_segment": "panoptic PNG segment missing from segments_info",
    "empty_mask": "empty or degenerate mask",
    "unknown_category": "category id not in the category list",
    "no_stuff_class": "panoptic set with no stuff class",
    "no_thing_class": "panoptic set with no thing class",
    "size_mismatch": "image / label size mismatch",
    "unloadable": "dataset that cannot be registered or loaded",
    "config": "config problem (start-up validation)",
}
COLOR_CHANNELS = ("RGB", "RGBA")  # PIL modes of colour label files
MIN_POLYGON_COORDS = 6  # a polygon needs 3 (x, y) points
MAX_LISTED_VALUES = 10  # label values quoted in one message


class Problem(NamedTuple):
    """One problem: its ``kind`` (a key of PROBLEM_KINDS), the ``file`` it is in, and what is wrong."""

    kind: str
    file: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def _size_text(size: Tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]} (WxH)"


def check_image(path: str, record_size: Optional[Tuple[int, int]] = None) -> Tuple[List[Problem], Optional[tuple]]:
    """Decode the image at ``path`` as training does; returns ``(problems, (H, W) or None)``.

    ``record_size`` is the height/width the annotation states, compared with the decoded size.
    """
    if not os.path.isfile(path):
        return [Problem("missing_file", path, "image file does not exist")], None
    try:
        size = read_image_any(path, format="RGB").shape[:2]
    except ImageReadError as e:
        return [Problem("unreadable_file", path, f"cannot decode the image ({e})")], None
    if record_size is not None and tuple(record_size) != tuple(size):
        return [Problem("size_mismatch", path, f"image is {_size_text(size)}, its annotation says "
                                                f"{_size_text(record_size)}")], size
    return [], size


def _open_png(path: str, what: str) -> Tuple[List[Problem], Optional[Image.Image]]:
    if not os.path.isfile(path):
        return [Problem("missing_file", path, f"{what} does not exist")], None
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        return [Problem("unreadable_file", path, f"cannot decode the {what} ({e})")], None
    return [], image


def _size_problem(path: str, size: tuple, image_size: Optional[tuple], what: str) -> List[Problem]:
    if image_size is None or tuple(size) == tuple(image_size):
        return []
    return [Problem("size_mismatch", path, f"{what} is {_size_text(size)}, its image is {_size_text(image_size)}")]


def _values_text(values) -> str:
    values = [int(v) for v in values]
    more = f" and {len(values) - MAX_LISTED_VALUES} more" if len(values) > MAX_LISTED_VALUES else ""
    return f"{values[:MAX_LISTED_VALUES]}{more}"


def check_label_png(path: str, image_size: Optional[tuple], num_classes: int, ignore_label: int) -> List[Problem]:
    """A semantic label file: single channel of class ids ``0..num_classes-1`` or ``ignore_label``."""
    problems, image = _open_png(path, "label file")
    if image is None:
        return problems
    if image.mode in COLOR_CHANNELS:
        rgb = np.asarray(image)[..., :3]
        if (rgb == rgb[..., :1]).all():
            detail = "3-channel grey image; save the class ids as a single-channel (mode L or P) PNG"
        else:
            colours = np.unique(rgb.reshape(-1, 3), axis=0)
            detail = (f"RGB colour image ({len(colours)} colours, e.g. {tuple(int(c) for c in colours[-1])}) "
                      f"instead of class ids; map each colour to its class id and save a single-channel "
                      f"(mode L or P) PNG")
        return [Problem("rgb_label", path, detail)] + _size_problem(path, rgb.shape[:2], image_size, "label")
    label = np.asarray(image)
    problems = _size_problem(path, label.shape[:2], image_size, "label")
    values = np.unique(label)
    bad = [v for v in values if v != ignore_label and not 0 <= v < num_classes]
    if bad:
        problems.append(Problem("label_out_of_range", path,
                                f"label values {_values_text(bad)} are outside the {num_classes} classes "
                                f"(0..{num_classes - 1}) and not the ignore label {ignore_label}"))
    elif (values == ignore_label).all():
        problems.append(Problem("empty_mask", path, f"no labelled pixel (every pixel is {ignore_label})"))
    return problems


def check_panoptic_png(path: str, image_size: Optional[tuple], segments_info: List[dict]) -> List[Problem]:
    """A COCO panoptic PNG against its ``segments_info``: every segment has pixels, every id is listed."""
    from panopticapi.utils import rgb2id

    problems, image = _open_png(path, "panoptic file")
    if image is None:
        return problems
    ids = rgb2id(np.asarray(image.convert("RGB")))
    problems = _size_problem(path, ids.shape, image_size, "panoptic PNG")
    present = set(np.unique(ids).tolist()) - {0}
    listed = {s["id"] for s in segments_info}
    for segment in segments_info:
        if segment["id"] not in present:
            problems.append(Problem("empty_mask", path, f"segment {segment['id']} of segments_info has no "
                                                        f"pixel in the PNG"))
    unlisted = sorted(present - listed)
    if unlisted:
        problems.append(Problem("unlisted_segment", path, f"segment ids {_values_text(unlisted)} are in the PNG "
                                f"but not in its segments_info"))
    return problems


def _read_json(path: str) -> Tuple[List[Problem], Optional[dict]]:
    if not os.path.isfile(path):
        return [Problem("missing_file", path, "annotation json does not exist")], None
    try:
        with open(path) as f:
            return [], json.load(f)
    except (OSError, ValueError) as e:
        return [Problem("unreadable_file", path, f"cannot read the json ({e})")], None


def _segmentation_problems(ann: dict, image: dict) -> List[Tuple[str, str]]:
    """``(kind, detail)`` of a COCO annotation's segmentation and box (empty, degenerate, other size)."""
    segm, (height, width) = ann.get("segmentation"), (image.get("height"), image.get("width"))
    found = []
    if isinstance(segm, dict):
        if height is not None and list(segm.get("size", [])) != [height, width]:
            return [("size_mismatch", f"RLE size {segm.get('size')} differs from the image's "
                                      f"[{height}, {width}] (H, W)")]
        rle = mask_util.frPyObjects(segm, *segm["size"]) if isinstance(segm.get("counts"), list) else segm
        if mask_util.area(rle) == 0:
            found.append(("empty_mask", "RLE mask has no pixel"))
    elif isinstance(segm, list) and segm:
        valid = [p for p in segm if len(p) >= MIN_POLYGON_COORDS and len(p) % 2 == 0]
        if not valid:
            found.append(("empty_mask", "every polygon has fewer than 3 points"))
        elif height is not None and mask_util.area(mask_util.merge(mask_util.frPyObjects(valid, height, width))) == 0:
            found.append(("empty_mask", "polygon encloses no pixel (zero area)"))
    else:
        found.append(("empty_mask", "no segmentation"))
    bbox = ann.get("bbox")
    if bbox is not None and (len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0):
        found.append(("empty_mask", f"degenerate bbox {bbox} (width and height must be > 0)"))
    return found


def check_instances_json(path: str) -> List[Problem]:
    """A COCO instances json: category ids, image ids, and every annotation's mask and box."""
    problems, data = _read_json(path)
    if data is None:
        return problems
    category_ids = {c["id"] for c in data.get("categories", [])}
    images = {img["id"]: img for img in data.get("images", [])}
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id"))
        where = f"annotation {ann.get('id')}"
        if image is None:
            problems.append(Problem("missing_file", path, f"{where} refers to image_id {ann.get('image_id')}, "
                                                          f"which is not in 'images'"))
            continue
        where += f" of image {image.get('file_name')}"
        if ann.get("category_id") not in category_ids:
            problems.append(Problem("unknown_category", path, f"{where} has category_id {ann.get('category_id')}, "
                                    f"which is not in 'categories' (ids {sorted(category_ids)})"))
        for kind, detail in _segmentation_problems(ann, image):
            problems.append(Problem(kind, path, f"{where}: {detail}"))
    return problems


def check_panoptic_json(path: str, thing_ids: Optional[set] = None) -> List[Problem]:
    """A COCO panoptic json: a thing and a stuff class exist, every segment's category is listed.

    ``thing_ids``: the dataset's thing category ids (from its metadata); None reads ``isthing``.
    """
    problems, data = _read_json(path)
    if data is None:
        return problems
    categories = {c["id"]: c for c in data.get("categories", [])}
    if thing_ids is None:
        thing_ids = {i for i, c in categories.items() if c.get("isthing")}
    if categories and not set(categories) - set(thing_ids):
        problems.append(Problem("no_stuff_class", path, "every category is a thing (isthing 1): PQ_st cannot be "
                                "computed; add a stuff category or train it as FORMAT coco_instance"))
    if categories and not set(thing_ids) & set(categories):
        problems.append(Problem("no_thing_class", path, "no category is a thing (isthing 1): PQ_th cannot be "
                                "computed; add a thing category or train it as FORMAT sem_seg"))
    for ann in data.get("annotations", []):
        for segment in ann.get("segments_info", []):
            if segment.get("category_id") not in categories:
                problems.append(Problem("unknown_category", path, f"segment {segment.get('id')} of "
                                        f"{ann.get('file_name')} has category_id {segment.get('category_id')}, "
                                        f"which is not in 'categories' (ids {sorted(categories)})"))
    return problems


def panoptic_records(path: str, image_root: str, panoptic_root: str, sem_seg_root: str = "") -> List[Dict]:
    """Raw records of a panoptic json (dataset category ids kept) for files the loader refused."""
    _, data = _read_json(path)
    if data is None:
        return []
    images = {img["id"]: img for img in data.get("images", [])}
    records = []
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id"), {})
        record = {"file_name": os.path.join(image_root, image.get("file_name", os.path.splitext(ann["file_name"])[0]
                                                                    + ".jpg")),
                  "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
                  "segments_info": ann.get("segments_info", [])}
        if "height" in image and "width" in image:
            record.update(height=image["height"], width=image["width"])
        if sem_seg_root:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, os.path.splitext(ann["file_name"])[0] + ".png")
        records.append(record)
    return records


def instance_records(path: str, image_root: str) -> List[Dict]:
    """Image records of a COCO instances json, for files the loader refused."""
    _, data = _read_json(path)
    if data is None:
        return []
    return [dict({k: img[k] for k in ("height", "width") if k in img},
                 file_name=os.path.join(image_root, img["file_name"])) for img in data.get("images", [])]
