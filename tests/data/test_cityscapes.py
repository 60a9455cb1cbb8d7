"""Cityscapes (semantic, instance, panoptic) on a miniature copy in the official layout.

Every image is 64 x 32 (W x H; the real ones are 2048 x 1024) with the polygons, drawn in this order:
"sky" rows 0-15, "road" rows 16-31, "car" columns 4-19 and "car" columns 30-45 (rows 18-27, 160
pixels each), "person" columns 50-59 rows 6-25 (200 pixels), "ego vehicle" rows 30-31 (void). The
labelIds/instanceIds/color PNGs are drawn from the polygons by cityscapesscripts, as in the download;
the prepare script then writes labelTrainIds and the panoptic files. Two train images (one city), two
val images (two cities). Evaluation runs through ``build_evaluator`` on the ground truth (100) and on
predictions corrupted in the first val image, with every expected value derived by hand.
"""
import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import _DatasetCatalog, _MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from qsegformers.data.datasets.cityscapes import cityscapes_paths, register_all_cityscapes
from qsegformers.data.mappers import build_dataset_mapper
from qsegformers.engine.evaluators import build_evaluator

from dataset_test_utils import evaluate, evaluator_cfg, load_prepare_script
from eval_only_utils import check_eval_only

H, W = 32, 64
IMAGES = {"train": ["aachen_000000_000019", "aachen_000001_000019"],
          "val": ["frankfurt_000000_000294", "lindau_000000_000019"]}
# label name -> (x0, y0, x1, y1), inclusive corners of the rectangle polygon, in drawing order
OBJECTS = [("sky", (0, 0, 63, 15)), ("road", (0, 16, 63, 31)), ("car", (4, 18, 19, 27)),
           ("car", (30, 18, 45, 27)), ("person", (50, 6, 59, 25)), ("ego vehicle", (0, 30, 63, 31))]
TRAIN_ID = {"road": 0, "sky": 10, "person": 11, "rider": 12, "car": 13}  # cityscapesscripts' trainIds
LABEL_ID = {"ego vehicle": 1, "road": 7, "sky": 23, "person": 24, "rider": 25, "car": 26}
THING_CONTIGUOUS = {"person": 0, "rider": 1, "car": 2}  # detectron2's 8 Cityscapes thing classes
NUM_CLASSES = 19
IGNORE = 255
LABEL_DIVISOR = 1000
# detectron2's Cityscapes instance loader and panopticapi leave pools to the garbage collector; shapely 2
# deprecates the ``resolution`` argument detectron2 v0.6 passes (its workers inherit the filters).
pytestmark = [pytest.mark.filterwarnings("ignore:unclosed running multiprocessing pool:ResourceWarning"),
              pytest.mark.filterwarnings("ignore:The 'resolution' argument is deprecated:DeprecationWarning")]


def _polygon(box):
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _mask(box):
    x0, y0, x1, y1 = box
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def _expected_regions():
    """label name -> list of H x W masks of what stays visible after the later polygons are drawn."""
    regions, covered = [], np.zeros((H, W), dtype=bool)
    for name, box in reversed(OBJECTS):
        regions.append((name, _mask(box) & ~covered))
        covered |= _mask(box)
    out = {}
    for name, mask in reversed(regions):
        out.setdefault(name, []).append(mask)
    return out


def _make_cityscapes(root):
    """The official download layout: leftImg8bit PNGs and gtFine polygons/labelIds/instanceIds/color."""
    from cityscapesscripts.preparation.json2instanceImg import json2instanceImg
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    annotation = {"imgHeight": H, "imgWidth": W,
                  "objects": [{"label": name, "polygon": _polygon(box)} for name, box in OBJECTS]}
    for split, stems in IMAGES.items():
        paths = cityscapes_paths(root, split)
        for i, stem in enumerate(stems):
            city = stem.split("_")[0]
            image_dir, gt_dir = os.path.join(paths["image_dir"], city), os.path.join(paths["gt_dir"], city)
            os.makedirs(image_dir, exist_ok=True)
            os.makedirs(gt_dir, exist_ok=True)
            image = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(os.path.join(image_dir, stem + "_leftImg8bit.png"))
            polygons = os.path.join(gt_dir, stem + "_gtFine_polygons.json")
            with open(polygons, "w") as f:
                json.dump(annotation, f)
            json2labelImg(polygons, polygons.replace("_polygons.json", "_labelIds.png"), "ids")
            json2labelImg(polygons, polygons.replace("_polygons.json", "_color.png"), "color")
            json2instanceImg(polygons, polygons.replace("_polygons.json", "_instanceIds.png"), "ids")


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    _make_cityscapes(root)
    assert load_prepare_script("prepare_cityscapes").main(["--root", root]) == 4
    register_all_cityscapes(root)
    yield root
    register_all_cityscapes()


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _gt_file(root, split, stem, suffix):
    return os.path.join(cityscapes_paths(root, split)["gt_dir"], stem.split("_")[0], f"{stem}_gtFine_{suffix}")


def test_prepare_writes_train_ids_and_panoptic(cityscapes_root):
    regions = _expected_regions()
    for split, stems in IMAGES.items():
        for stem in stems:
            train_ids = _read(_gt_file(cityscapes_root, split, stem, "labelTrainIds.png"))
            expected = np.full((H, W), IGNORE)
            for name, masks in regions.items():
                for mask in masks:
                    expected[mask] = TRAIN_ID.get(name, IGNORE)
            assert (train_ids == expected).all()
            # the raw labelIds drawn by cityscapesscripts agree with the same regions
            label_ids = _read(_gt_file(cityscapes_root, split, stem, "labelIds.png"))
            assert all((label_ids[m] == LABEL_ID[n]).all() for n, ms in regions.items() for m in ms)

    from panopticapi.utils import rgb2id

    paths = cityscapes_paths(cityscapes_root, "val")
    with open(paths["panoptic_json"]) as f:
        pan = json.load(f)
    assert [a["image_id"] for a in pan["annotations"]] == IMAGES["val"]
    assert len(pan["categories"]) == NUM_CLASSES
    segments = {s["id"]: s for s in pan["annotations"][0]["segments_info"]}
    # ego vehicle (ignored in evaluation) is void; cars 26000/26001, person 24000, stuff = label id
    assert sorted(segments) == [7, 23, 24000, 26000, 26001]
    assert segments[26001]["area"] == 160 and segments[24000]["category_id"] == LABEL_ID["person"]
    pan_ids = rgb2id(_read(os.path.join(paths["panoptic_root"], pan["annotations"][0]["file_name"])))
    assert (pan_ids == 26000).sum() == 160 and (pan_ids[30:] == 0).all()


def _detectron2_metadata(monkeypatch, root, name):
    """Metadata that detectron2 v0.6's own built-in registration gives ``name`` (in throw-away catalogs)."""
    import detectron2.data.datasets.builtin as builtin
    import detectron2.data.datasets.cityscapes_panoptic as panoptic

    metadata = _MetadataCatalog()
    for module in (builtin, panoptic):
        monkeypatch.setattr(module, "DatasetCatalog", _DatasetCatalog())
        monkeypatch.setattr(module, "MetadataCatalog", metadata)
    builtin.register_all_cityscapes(root)
    panoptic.register_all_cityscapes_panoptic(root)
    return metadata.get(name).as_dict()


@pytest.mark.parametrize("name", ["cityscapes_fine_sem_seg_train", "cityscapes_fine_instance_seg_val",
                                  "cityscapes_fine_panoptic_val"])
def test_metadata_same_as_detectron2(cityscapes_root, monkeypatch, name):
    assert MetadataCatalog.get(name).as_dict() == _detectron2_metadata(monkeypatch, cityscapes_root, name)


def _one_hot(label):
    """19 x H x W scores from H x W train ids; ignored pixels get "road" (the evaluator ignores them)."""
    label = torch.as_tensor(np.where(label == IGNORE, TRAIN_ID["road"], label).astype(np.int64))
    return torch.nn.functional.one_hot(label, NUM_CLASSES).permute(2, 0, 1).float()


def _instances(root, stem, classes, drop=()):
    """Instances from the val instanceIds PNG: ``classes`` maps label name -> predicted class."""
    inst_ids = _read(_gt_file(root, "val", stem, "instanceIds.png"))
    ids = [i for i in np.unique(inst_ids) if i >= LABEL_DIVISOR and i not in drop]
    names = {LABEL_ID[n]: n for n in ("person", "car")}
    inst = Instances((H, W))
    inst.pred_masks = torch.stack([torch.as_tensor(inst_ids == i) for i in ids])
    inst.pred_boxes = Boxes(torch.zeros(len(ids), 4))
    inst.scores = torch.ones(len(ids))
    inst.pred_classes = torch.tensor([classes[names[i // LABEL_DIVISOR]] for i in ids])
    return inst


def test_semantic(cityscapes_root, tmp_path):
    meta = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert meta.evaluator_type == "cityscapes_sem_seg" and len(meta.stuff_classes) == NUM_CLASSES
    dicts = DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert [os.path.basename(d["file_name"]) for d in dicts] == [s + "_leftImg8bit.png" for s in IMAGES["val"]]
    assert all((d["height"], d["width"]) == (H, W) for d in dicts)

    cfg = evaluator_cfg("cityscapes_fine_sem_seg_train", "mask_former_semantic", tmp_path, (H, W))
    out = build_dataset_mapper(cfg, True)(DatasetCatalog.get("cityscapes_fine_sem_seg_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == sorted(TRAIN_ID[n] for n in ("road", "sky", "person", "car"))
    assert out["sem_seg"].shape == (H, W) and (out["sem_seg"][30:] == IGNORE).all()

    evaluator = build_evaluator(cfg, "cityscapes_fine_sem_seg_val", str(tmp_path))
    labels = [_read(d["sem_seg_file_name"]) for d in dicts]
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(lab)} for lab in labels])["sem_seg"]
    assert res["IoU"] == pytest.approx(100.0) and res["iIoU"] == pytest.approx(100.0)

    wrong = labels[0].copy()
    wrong[wrong == TRAIN_ID["person"]] = TRAIN_ID["rider"]
    res = evaluate(evaluator, dicts, [{"sem_seg": _one_hot(wrong)}, {"sem_seg": _one_hot(labels[1])}])["sem_seg"]
    # classes with tp + fp + fn = 0 are nan and not averaged: road, sky, car 1; person 200 / 400
    # (second image right, first missed); rider 0 (200 false positives, no ground truth)
    assert res["IoU"] == pytest.approx(100 * float((3 + Fraction(1, 2) + 0) / 5))
    # instance-weighted: person 1 of 2 equally weighted instances found, rider 0, car 1
    assert res["iIoU"] == pytest.approx(100 * float((1 + Fraction(1, 2) + 0) / 3))

    # a val image without prediction: cityscapesscripts' sys.exit becomes an error naming the dataset
    with pytest.raises(RuntimeError, match="cityscapes_fine_sem_seg_val"):
        evaluate(evaluator, dicts[:1], [{"sem_seg": _one_hot(labels[0])}])


def test_instance(cityscapes_root, tmp_path):
    meta = MetadataCatalog.get("cityscapes_fine_instance_seg_val")
    assert meta.evaluator_type == "cityscapes_instance" and meta.thing_classes[:3] == list(THING_CONTIGUOUS)
    dicts = DatasetCatalog.get("cityscapes_fine_instance_seg_val")
    assert len(dicts) == 2
    assert sorted(a["category_id"] for a in dicts[0]["annotations"]) == [0, 2, 2]

    cfg = evaluator_cfg("cityscapes_fine_instance_seg_train", "mask_former_instance", tmp_path, (H, W),
                        semantic=False, instance=True)
    record = DatasetCatalog.get("cityscapes_fine_instance_seg_train")[0]
    out = build_dataset_mapper(cfg, True)(record)
    gt = out["instances"]
    assert sorted(gt.gt_classes.tolist()) == [0, 2, 2] and gt.gt_masks.shape == (3, H, W)
    # the polygons, rasterised by the mapper, cover the drawn regions (the training flip is undone)
    image = _read(record["file_name"])
    flipped = not (out["image"].permute(1, 2, 0).numpy() == image).all()
    assert not flipped or (out["image"].permute(1, 2, 0).numpy() == image[:, ::-1]).all()
    regions = _expected_regions()
    for cls, mask in zip(gt.gt_classes.tolist(), gt.gt_masks.numpy()):
        mask = mask[:, ::-1] if flipped else mask
        best = max((mask & m).sum() / (mask | m).sum() for m in regions[{0: "person", 2: "car"}[cls]])
        assert best > 0.9

    evaluator = build_evaluator(cfg, "cityscapes_fine_instance_seg_val", str(tmp_path))
    stems = IMAGES["val"]
    res = evaluate(evaluator, dicts, [{"instances": _instances(cityscapes_root, s, THING_CONTIGUOUS)} for s in stems])
    assert res["segm"]["AP"] == pytest.approx(100.0) and res["segm"]["AP50"] == pytest.approx(100.0)

    # drop the second car of the first image. car: 3 of 4 found, all scored 1, so one operating point
    # (precision 1, recall 3/4) plus cityscapes' end point (precision 1, recall 0); its step widths
    # (r[i-1] - r[i+1]) / 2 are 3/8 and 3/8, AP = 3/4 at every IoU threshold. person: 1. Average 7/8.
    second_car = LABEL_ID["car"] * LABEL_DIVISOR + 1  # cityscapesscripts numbers instances from 0
    outputs = [{"instances": _instances(cityscapes_root, stems[0], THING_CONTIGUOUS, drop=(second_car,))},
               {"instances": _instances(cityscapes_root, stems[1], THING_CONTIGUOUS)}]
    res = evaluate(evaluator, dicts, outputs)
    assert res["segm"]["AP"] == pytest.approx(100 * 7 / 8) and res["segm"]["AP50"] == pytest.approx(100 * 7 / 8)
    assert not os.path.exists("matches.json")


def _panoptic_outputs(root, relabel=None):
    """Every output of each val image from its ground truth, ``relabel``: name -> name (first image only).

    ``panoptic_seg`` from the panoptic PNG (segment ids kept), ``sem_seg`` from the labelTrainIds and
    ``instances`` from the instanceIds, all with trainId classes as Mask2Former's panoptic model predicts.
    """
    from panopticapi.utils import rgb2id

    names = {v: k for k, v in LABEL_ID.items()}
    paths = cityscapes_paths(root, "val")
    outputs = []
    for i, stem in enumerate(IMAGES["val"]):
        rename = relabel if i == 0 and relabel else {}
        pan = rgb2id(_read(os.path.join(paths["panoptic_root"], stem + "_gtFine_panoptic.png")))
        segments = []
        for seg_id in np.unique(pan[pan > 0]).tolist():
            name = names[seg_id // LABEL_DIVISOR if seg_id >= LABEL_DIVISOR else seg_id]
            name = rename.get(name, name)
            segments.append({"id": seg_id, "category_id": TRAIN_ID[name], "isthing": name in THING_CONTIGUOUS})
        sem = _read(_gt_file(root, "val", stem, "labelTrainIds.png")).copy()
        for old, new in rename.items():
            sem[sem == TRAIN_ID[old]] = TRAIN_ID[new]
        inst = _instances(root, stem, {n: TRAIN_ID[rename.get(n, n)] for n in ("person", "car")})
        outputs.append({"panoptic_seg": (torch.as_tensor(pan.astype(np.int32)), segments),
                        "sem_seg": _one_hot(sem), "instances": inst})
    return outputs


def test_panoptic(cityscapes_root, tmp_path):
    name = "cityscapes_fine_panoptic_val"
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "cityscapes_panoptic_seg" and meta.label_divisor == LABEL_DIVISOR
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == IMAGES["val"]
    assert sorted(s["category_id"] for s in dicts[0]["segments_info"]) == sorted(
        TRAIN_ID[n] for n in ("road", "sky", "person", "car", "car"))
    assert all(d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png") for d in dicts)

    cfg = evaluator_cfg("cityscapes_fine_panoptic_train", "mask_former_panoptic", tmp_path, (H, W), True, True, True)
    out = build_dataset_mapper(cfg, True)(DatasetCatalog.get("cityscapes_fine_panoptic_train")[0])
    assert sorted(out["instances"].gt_classes.tolist()) == sorted(
        TRAIN_ID[n] for n in ("road", "sky", "person", "car", "car"))
    # sky 1024 - 100 (person), road 1024 - 2 x 160 (cars) - 100 (person) - 128 (ego vehicle)
    assert sorted(out["instances"].gt_masks.sum((1, 2)).tolist()) == [160, 160, 200, 476, 924]
    assert (out["sem_seg"][30:] == IGNORE).all()  # ego vehicle

    evaluator = build_evaluator(cfg, name, str(tmp_path))
    res = evaluate(evaluator, dicts, _panoptic_outputs(cityscapes_root))
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)

    # first image: the person called rider. PQ: road, sky, car 1; person 1 TP (IoU 1) + 1 FN -> 1 / 1.5;
    # rider 1 FP -> 0 (counted: it has a false positive); things = car, person, rider.
    res = evaluate(evaluator, dicts, _panoptic_outputs(cityscapes_root, {"person": "rider"}))
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100 * float((3 + Fraction(2, 3)) / 5))
    assert res["panoptic_seg"]["PQ_th"] == pytest.approx(100 * float((1 + Fraction(2, 3)) / 3))
    assert res["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert res["sem_seg"]["IoU"] == pytest.approx(100 * float((3 + Fraction(1, 2)) / 5))
    # person: 1 of 2 found (recall 1/2 at precision 1 -> AP 1/2); rider has no ground truth (nan); car 1
    assert res["segm"]["AP"] == pytest.approx(100 * 3 / 4)


def test_missing_or_unprepared_folders(tmp_path):
    register_all_cityscapes(str(tmp_path / "nowhere"))
    try:
        for name in ("cityscapes_fine_sem_seg_val", "cityscapes_fine_instance_seg_train",
                     "cityscapes_fine_panoptic_val"):
            with pytest.raises(FileNotFoundError, match=r"nowhere.*leftImg8bit.*datasets/README\.md"):
                DatasetCatalog.get(name)
        _make_cityscapes(str(tmp_path / "raw"))  # the download, before datasets/prepare_cityscapes.py
        register_all_cityscapes(str(tmp_path / "raw"))
        for name in ("cityscapes_fine_sem_seg_val", "cityscapes_fine_panoptic_val"):
            with pytest.raises(FileNotFoundError, match=r"prepare_cityscapes\.py"):
                DatasetCatalog.get(name)
    finally:
        register_all_cityscapes()


@pytest.mark.parametrize("config,tasks", [
    ("cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml", {"sem_seg"}),
    ("cityscapes/instance-segmentation/maskformer2_R50_bs16_90k.yaml", {"segm"}),
    ("cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml", {"panoptic_seg", "sem_seg", "segm"}),
])
def test_eval_only_from_checkpoint(cityscapes_root, tmp_path, config, tasks):
    register_all_cityscapes(cityscapes_root)  # other tests re-register with other roots
    check_eval_only(config, tmp_path, tasks)
