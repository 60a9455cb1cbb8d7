"""ADE20K (150, full 847, panoptic, instance) on a miniature copy made by the prepare scripts.

Raw files in the official formats (``test_ade20k_prepare.py`` writes them) -> the four prepare scripts ->
DatasetCatalog -> training mapper -> evaluator on the ground truth (100) and on a prediction that calls
the chair something else (values by hand). Each image: row 0 unlabelled; columns 0-15 "wall" (stuff),
columns 16-31 "bed" (rows 1-11) over "chair" (rows 12-23), both things.
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
from eval_only_utils import check_eval_only
from test_ade20k_prepare import read_panoptic, read_tif, write_ade_full, write_ade_image, write_instance_devkit

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

H, W = 24, 32
WALL, BED, CHAIR, LAMP = 0, 7, 19, 36  # contiguous ids (== dataset ids of ADE20K panoptic/instance)
IGNORE = 255
NUM_CLASSES = len(ADE20K_150_CLASSES)
SEGMENT_IDS = {WALL: 11, BED: 22, CHAIR: 33}  # of the predictions
GT_SEGMENT_IDS = {WALL: 1, BED: 2, CHAIR: 3}  # the pan script numbers stuff, then instances in G order
# panopticapi's pq_compute leaves its multiprocessing pool to the garbage collector
UNCLOSED_POOL = "ignore:unclosed running multiprocessing pool:ResourceWarning"
SPLITS = {"train": ("training", 2), "val": ("validation", 1)}
FULL_WALL, FULL_BED, FULL_ONLY = 300, 700, {"train": 5, "val": 9}  # ADE-full class values
FULL_NAMES = [f"ade object {k}" for k in range(1, 800)]  # objectnames[k - 1] names class value k


def _label_layout():
    """H x W contiguous labels (255 = unlabelled) and the boolean mask of each class."""
    label = np.full((H, W), IGNORE, dtype=np.int64)
    label[1:, :16] = WALL
    label[1:12, 16:] = BED
    label[12:, 16:] = CHAIR
    return label, {c: label == c for c in SEGMENT_IDS}


def _make_ade(root):
    """Raw ADEChallengeData2016 (images, SceneParsing PNGs, instance-challenge PNGs: bed G = 1, chair G = 2,
    devkit files), then the four prepare scripts' outputs."""
    label, masks = _label_layout()
    write_instance_devkit(root)
    for split, (_, count) in SPLITS.items():
        for i in range(1, count + 1):
            write_ade_image(root, split, f"ADE_{split}_{i:08d}", label, [(masks[BED], BED), (masks[CHAIR], CHAIR)],
                            seed=i)
    load_prepare_script("prepare_ade20k_sem_seg").main(["--root", root])
    assert load_prepare_script("prepare_ade20k_pan_seg").main(["--root", root]) == 3
    assert load_prepare_script("prepare_ade20k_ins_seg").main(["--root", root]) == 6
    return label, masks


def _make_ade_full(root):
    """Raw ADE20K_2021_17_01 with the miniature layout: wall region = class value 300, bed region = 700,
    chair region = 5 in the training images and 9 in the validation image, row 0 unlabelled. Rule
    "both" keeps 300 (train id 0) and 700 (train id 1); 5 and 9 become 65535."""
    label, _ = _label_layout()
    images = []
    for split, (dirname, count) in SPLITS.items():
        values = np.select([label == WALL, label == BED, label == CHAIR],
                           [FULL_WALL, FULL_BED, FULL_ONLY[split]], 0)
        images += [(dirname, "bedroom", f"ADE_{split}_{i:08d}", values) for i in range(1, count + 1)]
    write_ade_full(root, images, FULL_NAMES)
    assert load_prepare_script("prepare_ade20k_full_sem_seg").main(["--root", root]) == 3
    full = np.full((H, W), ADE20K_FULL_IGNORE_LABEL, dtype=np.int64)
    full[label == WALL], full[label == BED] = 0, 1
    return full


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    label, masks = _make_ade(root)
    full = _make_ade_full(root)
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


def test_full_script_output_and_names(ade_root):
    with open(ade20k_paths(ade_root["root"], "val")["full_categories_json"]) as f:
        cats = json.load(f)["categories"]
    assert cats == [{"trainId": 0, "id": FULL_WALL, "name": "ade object 300"},
                    {"trainId": 1, "id": FULL_BED, "name": "ade object 700"}]
    for split in SPLITS:
        out = read_tif(os.path.join(ade20k_paths(ade_root["root"], split)["full_sem_seg_root"],
                                    f"ADE_{split}_00000001.tif"))
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, ade_root["full"])
    meta = MetadataCatalog.get("ade20k_full_sem_seg_val")
    assert meta.stuff_classes == ["ade object 300", "ade object 700"] and len(meta.stuff_colors) == 2


def test_sem_seg_full_keeps_16_bit_labels(ade_root, tmp_path):
    meta = MetadataCatalog.get("ade20k_full_sem_seg_val")
    assert meta.ignore_label == ADE20K_FULL_IGNORE_LABEL
    assert len(DatasetCatalog.get("ade20k_full_sem_seg_train")) == 2
    cfg = evaluator_cfg("ade20k_full_sem_seg_train", "mask_former_semantic", tmp_path, (H, W))
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("ade20k_full_sem_seg_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == [0, 1]

    dicts = DatasetCatalog.get("ade20k_full_sem_seg_val")
    evaluator = build_evaluator(cfg, "ade20k_full_sem_seg_val", str(tmp_path))
    full = ade_root["full"]
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(full, 2, 0)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    # bed region called wall: class 0 IoU 368 / (368 + 176), class 1 IoU 0; ignored pixels uncounted
    wrong = np.where(full == 1, 0, full)
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(wrong, 2, 1)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100 * 368 / 544 / 2)
    assert res["IoU-ade object 300"] == pytest.approx(100 * 368 / 544)


def _panoptic_output(masks, relabel=None):
    relabel = relabel or {}
    pan = torch.zeros((H, W), dtype=torch.int32)
    segments = []
    for cls, mask in masks.items():
        pan[torch.as_tensor(mask)] = SEGMENT_IDS[cls]
        pred = relabel.get(cls, cls)
        segments.append({"id": SEGMENT_IDS[cls], "category_id": pred, "isthing": pred in ADE20K_THING_IDS})
    return pan, segments


def test_pan_and_ins_script_outputs(ade_root):
    paths = ade20k_paths(ade_root["root"], "val")
    masks = ade_root["masks"]
    expected = np.zeros((H, W), dtype=np.int64)
    for cls, mask in masks.items():
        expected[mask] = GT_SEGMENT_IDS[cls]
    np.testing.assert_array_equal(read_panoptic(os.path.join(paths["panoptic_root"], "ADE_val_00000001.png")),
                                  expected)
    with open(paths["panoptic_json"]) as f:
        pan = json.load(f)
    assert pan["images"] == [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "width": W, "height": H}]
    assert pan["annotations"] == [{
        "image_id": "ADE_val_00000001", "file_name": "ADE_val_00000001.png", "segments_info": [
            {"id": 1, "category_id": WALL, "area": 23 * 16, "bbox": [0, 1, 16, 23], "iscrowd": 0},
            {"id": 2, "category_id": BED, "area": 11 * 16, "bbox": [16, 1, 16, 11], "iscrowd": 0},
            {"id": 3, "category_id": CHAIR, "area": 12 * 16, "bbox": [16, 12, 16, 12], "iscrowd": 0}]}]
    assert [(c["id"], c["name"], c["isthing"]) for c in pan["categories"][:8]] == [
        (i, ADE20K_150_CLASSES[i], int(i == BED)) for i in range(8)]

    with open(paths["instances_json"]) as f:
        ins = json.load(f)
    assert [(a["id"], a["image_id"], a["category_id"], a["area"], a["bbox"]) for a in ins["annotations"]] == [
        (1, "ADE_val_00000001", BED, 176, [16, 1, 16, 11]), (2, "ADE_val_00000001", CHAIR, 192, [16, 12, 16, 12])]
    for anno, cls in zip(ins["annotations"], (BED, CHAIR)):
        np.testing.assert_array_equal(mask_util.decode(anno["segmentation"]).astype(bool), masks[cls])
    # names from the devkit json (upper case in the generated one), ids = 0-based ADE150 ids
    assert {"id": BED, "name": ADE20K_150_CLASSES[BED].upper()} in ins["categories"]
    assert len(ins["categories"]) == 100
    with open(ade20k_paths(ade_root["root"], "train")["instances_json"]) as f:
        assert [a["id"] for a in json.load(f)["annotations"]] == [1, 2, 3, 4]  # unique over the split


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
        # no category list written yet: placeholder names for the 847 classes
        names = MetadataCatalog.get("ade20k_full_sem_seg_val").stuff_classes
        assert len(names) == ADE20K_FULL_NUM_CLASSES and names[300] == "ade20k_full_300"
    finally:
        register_all_ade20k()


def test_prepare_script_names_missing_raw_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016/annotations/training.*datasets/README\.md"):
        load_prepare_script("prepare_ade20k_sem_seg").main(["--root", str(tmp_path)])


def test_instance_evaluation_on_the_panoptic_dataset(ade_root, tmp_path):
    """Panoptic thing ids are not 0..N-1 (ADE20K things live among the 150 ids): detectron2's
    COCOEvaluator asserts there, qsegformers' InstanceSegEvaluator maps them itself."""
    register_all_ade20k(ade_root["root"])  # earlier tests re-register with other roots
    cfg = evaluator_cfg("ade20k_panoptic_train", "mask_former_panoptic", tmp_path, (H, W), semantic=False,
                        instance=True)
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


@pytest.mark.parametrize("config,tasks,opts", [
    ("ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml", {"sem_seg"}, ()),
    ("ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml", {"panoptic_seg", "sem_seg", "segm"}, ()),
    ("ade20k/instance-segmentation/maskformer2_R50_bs16_160k.yaml", {"segm"}, ()),
    # the miniature's class list (written by the prepare script) has 2 of the 847 classes
    ("ade20k-full/semantic-segmentation/maskformer2_R50_bs16_200k.yaml", {"sem_seg"},
     ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2")),
])
@pytest.mark.filterwarnings(UNCLOSED_POOL)
def test_eval_only_from_checkpoint(ade_root, tmp_path, config, tasks, opts):
    register_all_ade20k(ade_root["root"])  # other tests re-register with other roots
    check_eval_only(config, tmp_path, tasks, opts)
