"""ADE20K (150, full 847, panoptic, instance) on a miniature copy in the official layout.

Each val image: row 0 unlabelled; columns 0-15 "wall" (stuff), columns 16-31 "bed" (rows 1-11) over
"chair" (rows 12-23), both things. Prepare script -> DatasetCatalog -> training mapper -> evaluator on
the ground truth (100) and on a prediction that calls the chair something else (values by hand).
"""
import json
import os
from fractions import Fraction

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from qsegformers.data.datasets.ade20k import (
    ADE20K_150_CLASSES,
    ADE20K_FULL_IGNORE_LABEL,
    ADE20K_FULL_NUM_CLASSES,
    ADE20K_THING_IDS,
    ade20k_paths,
    register_all_ade20k,
)
from qsegformers.data.mappers import build_dataset_mapper
from qsegformers.engine.evaluators import build_evaluator

from dataset_test_utils import evaluate, evaluator_cfg, load_prepare_script

H, W = 24, 32
WALL, BED, CHAIR, LAMP = 0, 7, 19, 36  # contiguous ids (== dataset ids of ADE20K panoptic/instance)
IGNORE = 255
NUM_CLASSES = len(ADE20K_150_CLASSES)
SEGMENT_IDS = {WALL: 11, BED: 22, CHAIR: 33}
# panopticapi's pq_compute leaves its multiprocessing pool to the garbage collector
UNCLOSED_POOL = "ignore:unclosed running multiprocessing pool:ResourceWarning"
SPLITS = {"train": ("training", 2), "val": ("validation", 1)}


def _label_layout():
    """H x W contiguous labels (255 = unlabelled) and the boolean mask of each class."""
    label = np.full((H, W), IGNORE, dtype=np.int64)
    label[1:, :16] = WALL
    label[1:12, 16:] = BED
    label[12:, 16:] = CHAIR
    return label, {c: label == c for c in SEGMENT_IDS}


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def _make_ade(root):
    """ADEChallengeData2016 images/annotations (raw: 0 = other, 1..150) and panoptic/instance files."""
    from panopticapi.utils import id2rgb

    label, masks = _label_layout()
    raw = np.where(label == IGNORE, 0, label + 1).astype(np.uint8)
    categories = [{"id": i, "name": n, "isthing": int(i in ADE20K_THING_IDS), "color": [i, i, i]}
                  for i, n in enumerate(ADE20K_150_CLASSES)]
    for split, (dirname, count) in SPLITS.items():
        paths = ade20k_paths(root, split)
        for key in ("image_root", "raw_sem_seg_root", "panoptic_root"):
            os.makedirs(paths[key])
        images, pan_anns, inst_anns, inst_images = [], [], [], []
        for i in range(1, count + 1):
            stem = f"ADE_{split}_{i:08d}"
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                os.path.join(paths["image_root"], stem + ".jpg"))
            Image.fromarray(raw).save(os.path.join(paths["raw_sem_seg_root"], stem + ".png"))
            pan = np.zeros((H, W), dtype=np.uint32)
            segments = []
            for cls, mask in masks.items():
                pan[mask] = SEGMENT_IDS[cls]
                segments.append({"id": SEGMENT_IDS[cls], "category_id": cls, "area": int(mask.sum()),
                                 "bbox": _bbox(mask), "iscrowd": 0})
                if cls in ADE20K_THING_IDS:
                    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    inst_anns.append({"id": len(inst_anns) + 1, "image_id": i, "category_id": cls,
                                      "segmentation": rle, "area": int(mask.sum()), "bbox": _bbox(mask),
                                      "iscrowd": 0})
            Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
            images.append({"id": stem, "file_name": stem + ".jpg", "height": H, "width": W})
            inst_images.append({"id": i, "file_name": stem + ".jpg", "height": H, "width": W})
            pan_anns.append({"image_id": stem, "file_name": stem + ".png", "segments_info": segments})
        _write_json(paths["panoptic_json"], {"images": images, "annotations": pan_anns, "categories": categories})
        _write_json(paths["instances_json"], {
            "images": inst_images, "annotations": inst_anns,
            # names spelled differently from the registered thing_classes, as in Mask2Former's json
            "categories": [dict(c, name=c["name"].upper()) for c in categories if c["isthing"]]})
    return label, masks


def _make_ade_full(root, labels):
    """ADE20K_2021_17_01 with one 16-bit TIFF label image per split."""
    for split in SPLITS:
        paths = ade20k_paths(root, split)
        os.makedirs(paths["full_image_root"])
        os.makedirs(paths["full_sem_seg_root"])
        Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(os.path.join(paths["full_image_root"], "a.jpg"))
        Image.fromarray(labels.astype(np.uint16)).save(os.path.join(paths["full_sem_seg_root"], "a.tif"))


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    label, masks = _make_ade(root)
    full = np.full((H, W), ADE20K_FULL_IGNORE_LABEL, dtype=np.int64)
    full[1:, :16], full[1:, 16:] = 300, ADE20K_FULL_NUM_CLASSES - 1
    _make_ade_full(root, full)
    load_prepare_script("prepare_ade20k_sem_seg").main(["--root", root])
    register_all_ade20k(root)
    yield {"root": root, "label": label, "masks": masks, "full": full}
    register_all_ade20k()


def _one_hot(label, num_classes, fill):
    """num_classes x H x W scores whose argmax is ``label`` (``fill`` where label is out of range)."""
    label = torch.as_tensor(np.where(label < num_classes, label, fill))
    return torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()


def test_prepare_script_shifts_labels(ade_root):
    paths = ade20k_paths(ade_root["root"], "val")
    with Image.open(os.path.join(paths["sem_seg_root"], "ADE_val_00000001.png")) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), ade_root["label"])


def test_sem_seg_150(ade_root, tmp_path):
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == IGNORE
    assert len(meta.stuff_classes) == len(meta.stuff_colors) == NUM_CLASSES
    assert len(DatasetCatalog.get("ade20k_sem_seg_train")) == 2
    dicts = DatasetCatalog.get("ade20k_sem_seg_val")
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["ADE_val_00000001.jpg"]

    cfg = evaluator_cfg("ade20k_sem_seg_train", "mask_former_semantic", tmp_path, (H, W))
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("ade20k_sem_seg_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == [WALL, BED, CHAIR]
    assert tuple(out["sem_seg"].shape) == (32, 32)

    evaluator = build_evaluator(cfg, "ade20k_sem_seg_val", str(tmp_path))
    label = ade_root["label"]
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(label, NUM_CLASSES, LAMP)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)

    wrong = label.copy()
    wrong[label == CHAIR] = BED  # bed IoU 176 / (176 + 192); chair 0; wall 1; lamp (ignore pixels) uncounted
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(wrong, NUM_CLASSES, LAMP)}])["sem_seg"]
    expected = (1 + Fraction(11 * 16, 23 * 16) + 0) / 3
    assert res["mIoU"] == pytest.approx(100 * float(expected))
    assert res["IoU-bed"] == pytest.approx(100 * 11 / 23) and res["IoU-chair"] == 0


def test_sem_seg_full_847_keeps_16_bit_labels(ade_root, tmp_path):
    meta = MetadataCatalog.get("ade20k_full_sem_seg_val")
    assert meta.ignore_label == ADE20K_FULL_IGNORE_LABEL and len(meta.stuff_classes) == ADE20K_FULL_NUM_CLASSES
    cfg = evaluator_cfg("ade20k_full_sem_seg_train", "mask_former_semantic", tmp_path, (H, W))
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("ade20k_full_sem_seg_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == [300, ADE20K_FULL_NUM_CLASSES - 1]

    dicts = DatasetCatalog.get("ade20k_full_sem_seg_val")
    evaluator = build_evaluator(cfg, "ade20k_full_sem_seg_val", str(tmp_path))
    full = ade_root["full"]
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(full, ADE20K_FULL_NUM_CLASSES, 0)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    wrong = np.where(full == ADE20K_FULL_NUM_CLASSES - 1, 300, full)  # class 300: IoU 1/2; class 846: 0
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(wrong, ADE20K_FULL_NUM_CLASSES, 0)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(25.0)


def _panoptic_output(masks, relabel=None):
    relabel = relabel or {}
    pan = torch.zeros((H, W), dtype=torch.int32)
    segments = []
    for cls, mask in masks.items():
        pan[torch.as_tensor(mask)] = SEGMENT_IDS[cls]
        pred = relabel.get(cls, cls)
        segments.append({"id": SEGMENT_IDS[cls], "category_id": pred, "isthing": pred in ADE20K_THING_IDS})
    return pan, segments


@pytest.mark.filterwarnings(UNCLOSED_POOL)
def test_panoptic(ade_root, tmp_path):
    meta = MetadataCatalog.get("ade20k_panoptic_val")
    assert meta.evaluator_type == "ade20k_panoptic_seg"
    assert len(meta.thing_classes) == 100 and len(meta.stuff_classes) == NUM_CLASSES
    assert meta.thing_dataset_id_to_contiguous_id[BED] == BED
    dicts = DatasetCatalog.get("ade20k_panoptic_val")
    assert {s["category_id"]: s["isthing"] for s in dicts[0]["segments_info"]} == {WALL: False, BED: True, CHAIR: True}

    cfg = evaluator_cfg("ade20k_panoptic_train", "mask_former_panoptic", tmp_path, (H, W), semantic=True, panoptic=True)
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("ade20k_panoptic_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == [WALL, BED, CHAIR]

    evaluator = build_evaluator(cfg, "ade20k_panoptic_val", str(tmp_path))
    label, masks = ade_root["label"], ade_root["masks"]
    res = evaluate(evaluator, dicts, [{"panoptic_seg": _panoptic_output(masks),
                                        "sem_seg": _one_hot(label, NUM_CLASSES, LAMP)}])
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0) and res["sem_seg"]["mIoU"] == pytest.approx(100.0)
    # chair called lamp: wall and bed are true positives, chair a false negative, lamp a false positive
    res = evaluate(evaluator, dicts, [{"panoptic_seg": _panoptic_output(masks, {CHAIR: LAMP}),
                                        "sem_seg": _one_hot(label, NUM_CLASSES, LAMP)}])
    assert res["panoptic_seg"]["PQ"] == pytest.approx(50.0)
    assert res["panoptic_seg"]["PQ_th"] == pytest.approx(100 / 3)
    assert res["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)


def _instances_output(masks, relabel=None):
    relabel = relabel or {}
    things = [c for c in masks if c in ADE20K_THING_IDS]
    contiguous = {d: i for i, d in enumerate(ADE20K_THING_IDS)}
    inst = Instances((H, W))
    inst.pred_masks = torch.stack([torch.as_tensor(masks[c]) for c in things])
    inst.pred_boxes = Boxes(torch.zeros(len(things), 4))
    inst.scores = torch.ones(len(things))
    inst.pred_classes = torch.tensor([contiguous[relabel.get(c, c)] for c in things])
    return {"instances": inst}


def test_instance(ade_root, tmp_path):
    meta = MetadataCatalog.get("ade20k_instance_val")
    assert meta.evaluator_type == "coco" and len(meta.thing_classes) == 100
    cfg = evaluator_cfg("ade20k_instance_train", "mask_former_instance", tmp_path, (H, W))
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("ade20k_instance_train")[0])
    contiguous = {d: i for i, d in enumerate(ADE20K_THING_IDS)}
    assert sorted(out["instances"].gt_classes.tolist()) == [contiguous[BED], contiguous[CHAIR]]

    dicts = DatasetCatalog.get("ade20k_instance_val")
    evaluator = build_evaluator(cfg, "ade20k_instance_val", str(tmp_path))
    masks = ade_root["masks"]
    assert evaluate(evaluator, dicts, [_instances_output(masks)])["segm"]["AP"] == pytest.approx(100.0)
    # chair called lamp: bed AP 100, chair AP 0, lamp has no ground truth (not averaged)
    res = evaluate(evaluator, dicts, [_instances_output(masks, {CHAIR: LAMP})])
    assert res["segm"]["AP"] == pytest.approx(50.0)


def test_missing_folder_names_path_and_readme(tmp_path):
    register_all_ade20k(str(tmp_path / "nowhere"))
    try:
        for name in ("ade20k_sem_seg_val", "ade20k_full_sem_seg_val", "ade20k_panoptic_val", "ade20k_instance_val"):
            with pytest.raises(FileNotFoundError, match=r"nowhere.*datasets/README\.md"):
                DatasetCatalog.get(name)
    finally:
        register_all_ade20k()


def test_prepare_script_names_missing_raw_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016/annotations/training.*datasets/README\.md"):
        load_prepare_script("prepare_ade20k_sem_seg").main(["--root", str(tmp_path)])


def test_instance_evaluation_on_the_panoptic_dataset(ade_root, tmp_path):
    """Panoptic thing ids are not 0..N-1 (ADE20K things live among the 150 ids): detectron2's
    COCOEvaluator asserts there, qsegformers' InstanceSegEvaluator maps them itself."""
    register_all_ade20k(ade_root["root"])  # earlier tests re-register with other roots
    cfg = evaluator_cfg("ade20k_panoptic_train", "mask_former_panoptic", tmp_path, (H, W), semantic=False, instance=True)
    evaluator = build_evaluator(cfg, "ade20k_panoptic_val", str(tmp_path))
    dicts = DatasetCatalog.get("ade20k_panoptic_val")
    masks = ade_root["masks"]

    def output(relabel=None):
        out = _instances_output(masks)
        things = [c for c in masks if c in ADE20K_THING_IDS]
        out["instances"].pred_classes = torch.tensor([(relabel or {}).get(c, c) for c in things])
        return out

    assert evaluate(evaluator, dicts, [output()])["segm"]["AP"] == pytest.approx(100.0)
    assert evaluate(evaluator, dicts, [output({CHAIR: LAMP})])["segm"]["AP"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="not a thing class"):
        evaluate(evaluator, dicts, [output({CHAIR: 0})])  # class 0 (wall) is stuff
