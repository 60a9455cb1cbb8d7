"""COCO panoptic+semantic (``coco_2017_*_panoptic_with_sem_seg``) and COCO-Stuff-10K, miniature copies.

Panoptic val image: row 0 void; columns 0-15 "sky-other-merged" (stuff), columns 16-31 "person"
(rows 1-11) over "dog" (rows 12-23). Stuff-10K image: row 0 unlabelled (0, plus one unused id),
columns 0-15 "person", 16-31 "grass".
"""
import json
import os
from fractions import Fraction

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import Boxes, Instances
from PIL import Image
from scipy.io import savemat

from qsegformers.data.datasets.coco import (
    COCO_STUFF_171_CLASSES,
    COCO_STUFF_171_DATASET_IDS,
    coco_panoptic_paths,
    coco_stuff_10k_paths,
    register_all_coco_extra,
)
from qsegformers.data.mappers import build_dataset_mapper
from qsegformers.engine.evaluators import build_evaluator

from dataset_test_utils import evaluate, evaluator_cfg, load_prepare_script
from eval_only_utils import check_eval_only

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

UNCLOSED_POOL = "ignore:unclosed running multiprocessing pool:ResourceWarning"  # panopticapi's pq_compute
H, W = 24, 32
IGNORE = 255
NUM_PANOPTIC = len(COCO_CATEGORIES)
CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
THING_IDS = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
SKY, PERSON, DOG, CAT = 187, 1, 18, 17  # COCO panoptic dataset ids
SEGMENT_IDS = {SKY: 5, PERSON: 6, DOG: 7}
COUNTS = {"train": 2, "val": 1}
UNUSED_STUFF_ID = 12  # a COCO thing id that no category uses
GRASS_STUFF_ID = COCO_STUFF_171_DATASET_IDS[COCO_STUFF_171_CLASSES.index("grass")]


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _masks():
    masks = {c: np.zeros((H, W), dtype=bool) for c in SEGMENT_IDS}
    masks[SKY][1:, :16] = True
    masks[PERSON][1:12, 16:] = True
    masks[DOG][12:, 16:] = True
    return masks


def _make_coco_panoptic(root):
    from panopticapi.utils import id2rgb

    masks = _masks()
    categories = [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in COCO_CATEGORIES]
    for split, count in COUNTS.items():
        paths = coco_panoptic_paths(root, split)
        for key in ("image_root", "panoptic_root"):
            os.makedirs(paths[key])
        os.makedirs(os.path.dirname(paths["panoptic_json"]), exist_ok=True)
        images, pan_anns, inst_anns = [], [], []
        for image_id in range(1, count + 1):
            stem = f"{image_id:012d}"
            Image.fromarray(np.random.default_rng(image_id).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                os.path.join(paths["image_root"], stem + ".jpg"))
            pan = np.zeros((H, W), dtype=np.uint32)
            segments = []
            for cat, mask in masks.items():
                pan[mask] = SEGMENT_IDS[cat]
                segments.append({"id": SEGMENT_IDS[cat], "category_id": cat, "area": int(mask.sum()),
                                 "bbox": _bbox(mask), "iscrowd": 0})
                if cat in THING_IDS:
                    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    inst_anns.append({"id": len(inst_anns) + 1, "image_id": image_id, "category_id": cat,
                                      "segmentation": rle, "area": int(mask.sum()), "bbox": _bbox(mask),
                                      "iscrowd": 0})
            Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
            images.append({"id": image_id, "file_name": stem + ".jpg", "height": H, "width": W})
            pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments})
        with open(paths["panoptic_json"], "w") as f:
            json.dump({"images": images, "annotations": pan_anns, "categories": categories}, f)
        with open(paths["instances_json"], "w") as f:
            json.dump({"images": images, "annotations": inst_anns,
                       "categories": [c for c in categories if c["isthing"]]}, f)
    return masks


def _make_coco_stuff_10k(root):
    """cocostuff-10k-v1.1: imageLists/*.txt, images/*.jpg, annotations/*.mat (``S``: 0 or COCO-Stuff id)."""
    label = np.zeros((H, W), dtype=np.uint16)
    label[0, 3] = UNUSED_STUFF_ID
    label[1:, :16] = PERSON
    label[1:, 16:] = GRASS_STUFF_ID
    paths = coco_stuff_10k_paths(root, "train")
    os.makedirs(paths["raw_image_root"])
    os.makedirs(paths["raw_annotation_root"])
    os.makedirs(os.path.dirname(paths["image_list"]))
    for split, names in {"train": ["COCO_train2014_000000000001", "COCO_train2014_000000000002"],
                         "test": ["COCO_train2014_000000000003"]}.items():
        with open(coco_stuff_10k_paths(root, split)["image_list"], "w") as f:
            f.write("\n".join(names) + "\n")
        for name in names:
            image = np.zeros((H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(os.path.join(paths["raw_image_root"], name + ".jpg"))
            savemat(os.path.join(paths["raw_annotation_root"], name + ".mat"), {"S": label})


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    masks = _make_coco_panoptic(root)
    _make_coco_stuff_10k(root)
    assert load_prepare_script("prepare_coco_semantic_annos_from_panoptic").main(["--root", root]) == 3
    assert load_prepare_script("prepare_coco_stuff_10k_sem_seg").main(["--root", root]) == 3
    register_all_coco_extra(root)
    yield {"root": root, "masks": masks}
    register_all_coco_extra()


def _one_hot(label, num_classes, fill=0):
    label = torch.as_tensor(np.where(label < num_classes, label, fill).astype(np.int64))
    return torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()


def _outputs(masks, relabel=None):
    """Model outputs of the val image: panoptic, semantic and instances, ``relabel``: dataset id -> id."""
    relabel = relabel or {}
    pan = torch.zeros((H, W), dtype=torch.int32)
    sem = np.full((H, W), IGNORE)
    segments, things = [], []
    for cat, mask in masks.items():
        pred = relabel.get(cat, cat)
        pan[torch.as_tensor(mask)] = SEGMENT_IDS[cat]
        sem[mask] = CONTIGUOUS[pred]
        segments.append({"id": SEGMENT_IDS[cat], "category_id": CONTIGUOUS[pred], "isthing": pred in THING_IDS})
        if pred in THING_IDS:
            things.append((CONTIGUOUS[pred], mask))
    inst = Instances((H, W))
    inst.pred_masks = torch.stack([torch.as_tensor(m) for _, m in things])
    inst.pred_boxes = Boxes(torch.zeros(len(things), 4))
    inst.scores = torch.ones(len(things))
    inst.pred_classes = torch.tensor([c for c, _ in things])
    return {"panoptic_seg": (pan, segments), "sem_seg": _one_hot(sem, NUM_PANOPTIC), "instances": inst}


def test_prepare_semantic_from_panoptic(coco_root):
    paths = coco_panoptic_paths(coco_root["root"], "val")
    with Image.open(os.path.join(paths["sem_seg_root"], "000000000001.png")) as im:
        sem = np.asarray(im)
    assert sem[0].tolist() == [IGNORE] * W
    for cat, mask in coco_root["masks"].items():
        assert (sem[mask] == CONTIGUOUS[cat]).all()


@pytest.mark.filterwarnings(UNCLOSED_POOL)
def test_panoptic_with_sem_seg(coco_root, tmp_path):
    name = "coco_2017_val_panoptic_with_sem_seg"
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.ignore_label == IGNORE
    assert len(meta.stuff_classes) == NUM_PANOPTIC and len(meta.thing_classes) == 80
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 1 and dicts[0]["sem_seg_file_name"].endswith("panoptic_semseg_val2017/000000000001.png")

    cfg = evaluator_cfg("coco_2017_train_panoptic_with_sem_seg", "mask_former_panoptic", tmp_path, (H, W), True, True, True)
    out = build_dataset_mapper(cfg, is_train=True)(DatasetCatalog.get("coco_2017_train_panoptic_with_sem_seg")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == sorted(CONTIGUOUS[c] for c in SEGMENT_IDS)

    evaluator = build_evaluator(cfg, name, str(tmp_path))
    masks = coco_root["masks"]
    res = evaluate(evaluator, dicts, [_outputs(masks)])
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)

    # dog called cat: PQ over sky, person (TP), dog (FN), cat (FP); AP over person 100, dog 0
    res = evaluate(evaluator, dicts, [_outputs(masks, {DOG: CAT})])
    assert res["panoptic_seg"]["PQ"] == pytest.approx(50.0)
    assert res["panoptic_seg"]["PQ_th"] == pytest.approx(100 / 3)
    assert res["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    # sky 1, person 1, dog 0, cat 0: detectron2 averages over classes in ground truth OR prediction
    assert res["sem_seg"]["mIoU"] == pytest.approx(50.0)
    assert res["segm"]["AP"] == pytest.approx(50.0)


def test_coco_stuff_10k(coco_root, tmp_path):
    person, grass = 0, COCO_STUFF_171_CLASSES.index("grass")
    paths = coco_stuff_10k_paths(coco_root["root"], "test")
    with Image.open(os.path.join(paths["sem_seg_root"], "COCO_train2014_000000000003.png")) as im:
        label = np.asarray(im)
    assert label[0].tolist() == [IGNORE] * W  # 0 and an unused id both become ignore
    assert (label[1:, :16] == person).all() and (label[1:, 16:] == grass).all()

    meta = MetadataCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert len(meta.stuff_classes) == len(meta.stuff_colors) == 171 and meta.evaluator_type == "sem_seg"
    cfg = evaluator_cfg("coco_2017_train_stuff_10k_sem_seg", "mask_former_semantic", tmp_path, (H, W))
    train = DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    assert len(train) == 2
    assert sorted(build_dataset_mapper(cfg, True)(train[0])["instances"].gt_classes.tolist()) == [person, grass]

    dicts = DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    evaluator = build_evaluator(cfg, "coco_2017_test_stuff_10k_sem_seg", str(tmp_path))
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(label.astype(np.int64), 171)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    wrong = label.astype(np.int64)
    wrong[1:, 16:24] = person  # person IoU 16/24, grass IoU 8/16
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(wrong, 171)}])["sem_seg"]
    assert res["mIoU"] == pytest.approx(100 * float((Fraction(2, 3) + Fraction(1, 2)) / 2))


def test_missing_folder_names_path_and_readme(tmp_path):
    register_all_coco_extra(str(tmp_path / "nowhere"))
    try:
        for name in ("coco_2017_val_panoptic_with_sem_seg", "coco_2017_test_stuff_10k_sem_seg"):
            with pytest.raises(FileNotFoundError, match=r"nowhere.*datasets/README\.md"):
                DatasetCatalog.get(name)
    finally:
        register_all_coco_extra()


@pytest.mark.parametrize("config,tasks", [
    ("coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml", {"panoptic_seg", "sem_seg", "segm"}),
    ("coco-stuff-10k/semantic-segmentation/maskformer2_R50_bs16_60k.yaml", {"sem_seg"}),
])
@pytest.mark.filterwarnings(UNCLOSED_POOL)
def test_eval_only_from_checkpoint(coco_root, tmp_path, config, tasks):
    register_all_coco_extra(coco_root["root"])  # other tests re-register with other roots
    check_eval_only(config, tmp_path, tasks)
