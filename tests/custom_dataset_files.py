"""Small datasets written on disk in the three ``DATASETS.CUSTOM`` formats, for the custom-dataset and
dataset-checker tests (real JPEG images, PNG labels, COCO json with polygons, compressed and uncompressed
RLE, COCO panoptic PNGs).

Scene ``i`` (``H`` x ``W``): "sky" above a random row, "grass" below it (the row itself is unlabelled:
``IGNORE`` / panoptic void), a red "box" (rectangle) in the left half and a yellow "disc" in the right
half. Dataset category ids are not contiguous and not sorted like the names, so the id mappings are
exercised: box 3, disc 7 (things), sky 20, grass 21 (stuff); contiguous ids follow the ids: box 0,
disc 1, sky 2, grass 3. In the instances json the box is a polygon, the disc a compressed RLE, except
in image 0 where it is an uncompressed RLE.
"""
import json
import os
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

H, W = 48, 64
IGNORE = 255
CATEGORIES = [  # sorted by id: the contiguous order
    {"id": 3, "name": "box", "isthing": 1, "color": [220, 40, 40]},
    {"id": 7, "name": "disc", "isthing": 1, "color": [240, 220, 30]},
    {"id": 20, "name": "sky", "isthing": 0, "color": [90, 140, 230]},
    {"id": 21, "name": "grass", "isthing": 0, "color": [60, 160, 50]},
]
CLASS_NAMES = [c["name"] for c in CATEGORIES]
THINGS = [c for c in CATEGORIES if c["isthing"]]
SPLITS = {"train": 0, "val": 1000}  # seed offset per split
SEGMENT_STRIDE = 100  # panoptic segment id = category id * stride + running number


def _box_mask(rng) -> tuple:
    y0, x0 = int(rng.integers(4, H - 20)), int(rng.integers(2, W // 2 - 16))
    h, w = int(rng.integers(8, 16)), int(rng.integers(8, 14))
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask, (x0, y0, w, h)


def _disc_mask(rng) -> np.ndarray:
    cy, cx, r = int(rng.integers(12, H - 12)), int(rng.integers(W // 2 + 10, W - 10)), int(rng.integers(6, 9))
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def scene(index: int) -> Dict:
    """``image`` (H x W x 3 uint8), ``label`` (H x W uint8 contiguous ids, IGNORE), ``horizon`` row,
    ``box`` / ``disc`` (H x W bool masks) and ``box_xywh`` of scene ``index``."""
    rng = np.random.default_rng(index)
    horizon = int(rng.integers(16, 32))
    box, box_xywh = _box_mask(rng)
    disc = _disc_mask(rng)
    label = np.full((H, W), CLASS_NAMES.index("grass"), dtype=np.uint8)
    label[:horizon] = CLASS_NAMES.index("sky")
    label[horizon] = IGNORE
    label[box] = CLASS_NAMES.index("box")
    label[disc] = CLASS_NAMES.index("disc")
    colors = np.array([c["color"] for c in CATEGORIES] + [[128, 128, 128]], dtype=np.float64)
    image = colors[np.where(label == IGNORE, len(CATEGORIES), label)]
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return {"image": image, "label": label, "horizon": horizon, "box": box, "disc": disc, "box_xywh": box_xywh}


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F").astype(np.uint8)  # run lengths, column-major, starting with zeros
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": [H, W], "counts": counts if flat[0] == 0 else [0] + counts}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


def write_dataset(root: str, split: str, count: int) -> Dict[str, str]:
    """Write ``count`` scenes of ``split`` in all three formats under ``root``; returns the paths::

        images/<split>/<stem>.jpg      panoptic_<split>/<stem>.png   panoptic_<split>.json
        labels/<split>/<stem>.png      panoptic_semseg_<split>/<stem>.png   instances_<split>.json
    """
    paths = {"image_root": os.path.join(root, "images", split), "sem_seg_root": os.path.join(root, "labels", split),
             "panoptic_root": os.path.join(root, f"panoptic_{split}"),
             "panoptic_sem_seg_root": os.path.join(root, f"panoptic_semseg_{split}"),
             "panoptic_json": os.path.join(root, f"panoptic_{split}.json"),
             "instances_json": os.path.join(root, f"instances_{split}.json")}
    for key in ("image_root", "sem_seg_root", "panoptic_root", "panoptic_sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    from panopticapi.utils import id2rgb

    images, instances, panoptic = [], [], []
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    for i in range(count):
        s, image_id, stem = scene(SPLITS[split] + i), i + 1, f"{split}_{i:03d}"
        Image.fromarray(s["image"]).save(os.path.join(paths["image_root"], stem + ".jpg"), quality=95)
        Image.fromarray(s["label"]).save(os.path.join(paths["sem_seg_root"], stem + ".png"))
        Image.fromarray(s["label"]).save(os.path.join(paths["panoptic_sem_seg_root"], stem + ".png"))
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": H, "width": W})
        x0, y0, w, h = s["box_xywh"]
        polygon = [float(v) for v in (x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h)]  # pixel edges
        for name, segm, mask in (("box", [polygon], s["box"]), ("disc", _rle(s["disc"], i > 0), s["disc"])):
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": ids[name],
                              "segmentation": segm, "area": float(mask.sum()), "bbox": _bbox(mask), "iscrowd": 0})
        pan = np.zeros((H, W), dtype=np.uint32)
        segments = []
        label = s["label"]
        for number, name in enumerate(("sky", "grass", "box", "disc"), start=1):
            mask = label == CLASS_NAMES.index(name)
            seg_id = ids[name] * SEGMENT_STRIDE + number
            pan[mask] = seg_id
            segments.append({"id": seg_id, "category_id": ids[name], "area": int(mask.sum()),
                             "bbox": _bbox(mask), "iscrowd": 0})
        Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
        panoptic.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments})
    _write_json(paths["instances_json"], {"images": images, "annotations": instances,
                                          "categories": [{k: c[k] for k in ("id", "name")} for c in THINGS]})
    _write_json(paths["panoptic_json"], {"images": images, "annotations": panoptic, "categories": CATEGORIES})
    return paths


def slot_opts(slot: str, fmt: str, name: str, paths: Dict[str, str]) -> List[str]:
    """``KEY VALUE`` overrides describing ``paths`` as ``DATASETS.CUSTOM.<slot>`` in format ``fmt``."""
    key = f"DATASETS.CUSTOM.{slot}"
    opts = [f"{key}.NAME", name, f"{key}.FORMAT", fmt, f"{key}.IMAGE_ROOT", paths["image_root"]]
    if fmt == "sem_seg":
        opts += [f"{key}.SEM_SEG_ROOT", paths["sem_seg_root"], f"{key}.CLASS_NAMES", repr(CLASS_NAMES)]
    elif fmt == "coco_instance":
        opts += [f"{key}.JSON", paths["instances_json"]]
    else:
        opts += [f"{key}.JSON", paths["panoptic_json"], f"{key}.PANOPTIC_ROOT", paths["panoptic_root"],
                 f"{key}.SEM_SEG_ROOT", paths["panoptic_sem_seg_root"], f"{key}.INSTANCE_JSON",
                 paths["instances_json"]]
    return opts
