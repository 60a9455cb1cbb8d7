"""COCO instance segmentation (detectron2's ``coco_2017_val``, re-registered) on a miniature copy.

``coco/val2017/*.jpg`` + ``coco/annotations/instances_val2017.json`` in the official format (all 80
categories, xywh boxes, areas): image 1 holds a "person" (rows 2-11, columns 2-13) and a "dog" (rows
14-21, columns 18-29) as polygons; image 2 a "person" (rows 4-19, columns 4-11) as compressed RLE and a
crowd of people (rows 4-19, columns 20-29) as uncompressed RLE with ``iscrowd`` 1, as COCO stores crowds.
"""
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import _DatasetCatalog, _MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import Boxes, Instances
from PIL import Image

from qsegformers.data.datasets.coco import coco_panoptic_paths, register_all_coco_instances
from qsegformers.data.mappers import build_dataset_mapper
from qsegformers.engine.evaluators import build_evaluator

from dataset_test_utils import evaluate, evaluator_cfg
from eval_only_utils import check_eval_only

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

H, W = 24, 32
PERSON, DOG, CAT = 1, 18, 17  # COCO category ids
THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
CONTIGUOUS = {c["id"]: i for i, c in enumerate(THINGS)}
# image id -> [(category id, (y0, y1, x0, x1) inclusive, encoding, iscrowd)]
ANNOTATIONS = {
    1: [(PERSON, (2, 11, 2, 13), "polygon", 0), (DOG, (14, 21, 18, 29), "polygon", 0)],
    2: [(PERSON, (4, 19, 4, 11), "rle", 0), (PERSON, (4, 19, 20, 29), "uncompressed_rle", 1)],
}


def _mask(box):
    y0, y1, x0, x1 = box
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1 + 1, x0:x1 + 1] = 1
    return mask


def _segmentation(box, encoding):
    y0, y1, x0, x1 = box
    if encoding == "polygon":  # pixel edges, so that pycocotools rasterises exactly the rectangle
        return [[x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]]
    mask = _mask(box)
    if encoding == "rle":
        rle = mask_util.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # uncompressed: run lengths of the column-major flattened mask, starting with a run of zeros
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": [H, W], "counts": counts if flat[0] == 0 else [0] + counts}


def _make_coco(root):
    paths = coco_panoptic_paths(root, "val")
    os.makedirs(paths["image_root"])
    os.makedirs(os.path.dirname(paths["instances_json"]))
    images, annotations = [], []
    for image_id, objects in ANNOTATIONS.items():
        file_name = f"{image_id:012d}.jpg"
        image = np.random.default_rng(image_id).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(paths["image_root"], file_name))
        images.append({"id": image_id, "file_name": file_name, "height": H, "width": W, "license": 1,
                       "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
        for cat, box, encoding, iscrowd in objects:
            y0, y1, x0, x1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "segmentation": _segmentation(box, encoding), "area": float(_mask(box).sum()),
                                "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                                "iscrowd": iscrowd})
    categories = [{"supercategory": "thing", "id": c["id"], "name": c["name"]} for c in THINGS]
    with open(paths["instances_json"], "w") as f:
        json.dump({"info": {"description": "miniature COCO 2017", "year": 2017}, "licenses": [{"id": 1, "name": "x"}],
                   "images": images, "annotations": annotations, "categories": categories}, f)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    _make_coco(root)
    register_all_coco_instances(root)
    yield root
    register_all_coco_instances()


def test_metadata_same_as_detectron2(coco_root, monkeypatch):
    """What detectron2 v0.6's ``register_all_coco`` gives these names (in throw-away catalogs)."""
    import detectron2.data.datasets.builtin as builtin
    import detectron2.data.datasets.coco as d2_coco

    metadata = _MetadataCatalog()
    monkeypatch.setattr(d2_coco, "DatasetCatalog", _DatasetCatalog())
    monkeypatch.setattr(d2_coco, "MetadataCatalog", metadata)
    for name in ("coco_2017_train", "coco_2017_val"):
        image_root, json_file = builtin._PREDEFINED_SPLITS_COCO["coco"][name]
        d2_coco.register_coco_instances(name, builtin._get_builtin_metadata("coco"),
                                        os.path.join(coco_root, json_file), os.path.join(coco_root, image_root))
        assert MetadataCatalog.get(name).as_dict() == metadata.get(name).as_dict()


def _outputs(relabel=None):
    """Predicted instances of each image from the non-crowd ground truth, ``relabel``: COCO id -> id."""
    relabel = relabel or {}
    outputs = []
    for objects in ANNOTATIONS.values():
        kept = [(relabel.get(cat, cat), box) for cat, box, _, iscrowd in objects if not iscrowd]
        inst = Instances((H, W))
        inst.pred_masks = torch.stack([torch.as_tensor(_mask(box), dtype=torch.bool) for _, box in kept])
        inst.pred_boxes = Boxes(torch.zeros(len(kept), 4))
        inst.scores = torch.ones(len(kept))
        inst.pred_classes = torch.tensor([CONTIGUOUS[cat] for cat, _ in kept])
        outputs.append({"instances": inst})
    return outputs


def test_coco_instances(coco_root, tmp_path):
    name = "coco_2017_val"
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and len(meta.thing_classes) == 80
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 2]
    assert [(a["category_id"], a["iscrowd"]) for a in dicts[1]["annotations"]] == [
        (CONTIGUOUS[PERSON], 0), (CONTIGUOUS[PERSON], 1)]

    cfg = evaluator_cfg(name, "mask_former_instance", tmp_path, (H, W), semantic=False, instance=True)
    mapper = build_dataset_mapper(cfg, True)
    for record, objects in zip(dicts, ANNOTATIONS.values()):
        gt = mapper(record)["instances"]
        kept = [(cat, box) for cat, box, _, iscrowd in objects if not iscrowd]  # crowds are not targets
        assert sorted(gt.gt_classes.tolist()) == sorted(CONTIGUOUS[cat] for cat, _ in kept)
        # polygon and RLE decode to exactly the rectangles (up to the training flip)
        areas = sorted(gt.gt_masks.sum((1, 2)).tolist())
        assert areas == sorted(int(_mask(box).sum()) for _, box in kept)

    evaluator = build_evaluator(cfg, name, str(tmp_path))
    res = evaluate(evaluator, dicts, _outputs())["segm"]
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)

    # dog called cat: person AP 1, dog (ground truth, no detection) 0; cat has no ground truth, so
    # COCO leaves it out of the mean (its false positive counts nowhere): AP = (1 + 0) / 2
    res = evaluate(evaluator, dicts, _outputs({DOG: CAT}))["segm"]
    assert res["AP"] == pytest.approx(50.0) and res["AP50"] == pytest.approx(50.0)
    assert res["AP-person"] == pytest.approx(100.0) and res["AP-dog"] == pytest.approx(0.0)
    assert math.isnan(res["AP-cat"])


def test_missing_folder_names_path_and_readme(tmp_path):
    register_all_coco_instances(str(tmp_path / "nowhere"))
    try:
        for name in ("coco_2017_train", "coco_2017_val"):
            with pytest.raises(FileNotFoundError, match=r"nowhere.*instances_.*2017\.json.*datasets/README\.md"):
                DatasetCatalog.get(name)
    finally:
        register_all_coco_instances()


def test_eval_only_from_checkpoint(coco_root, tmp_path):
    register_all_coco_instances(coco_root)  # other tests re-register with other roots
    check_eval_only("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml", tmp_path, {"segm"})
