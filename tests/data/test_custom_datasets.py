"""Datasets on disk registered through the config alone (``DATASETS.CUSTOM``), trained with ``train_net.py``
and evaluated with detectron2's evaluators, in the three formats: image + label-PNG folders (sem_seg),
COCO instances json with polygons and RLE (coco_instance), COCO panoptic PNG + json with a semantic folder
(coco_panoptic). The data: ``tests/custom_dataset_files.py``."""
import importlib.util
import json
import os
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.structures import Boxes, Instances, polygons_to_bitmask
from PIL import Image

from custom_dataset_files import CATEGORIES, CLASS_NAMES, IGNORE, THINGS, H, W, slot_opts, write_dataset
from qsegformers.data.datasets.custom import CustomDatasetError
from qsegformers.engine.evaluators import build_evaluator
from qsegformers.engine.validation import ConfigValidationError, config_problems
from qsegformers.utils.tool_setup import setup_tool_cfg

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = {"sem_seg": "semantic", "coco_panoptic": "panoptic", "coco_instance": "instance"}
# The example configs at a tiny size: whole 48 x 64 images, fewer layers, points and queries, one process.
TINY = [
    "MODEL.MASK_FORMER.DEC_LAYERS", "3",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", f"({H},)",
    "INPUT.MAX_SIZE_TRAIN", str(W),
    "INPUT.MIN_SIZE_TEST", str(H),
    "INPUT.MAX_SIZE_TEST", str(W),
    "INPUT.CROP.ENABLED", "False",
    "INPUT.SIZE_DIVISIBILITY", str(W),
]
NUM_TRAIN, NUM_VAL = 6, 3
# panopticapi's pq_compute leaves its multiprocessing pool to the garbage collector
pytestmark = pytest.mark.filterwarnings("ignore:unclosed running multiprocessing pool:ResourceWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("custom_data"))
    return {"root": root, "train": write_dataset(root, "train", NUM_TRAIN), "val": write_dataset(root, "val", NUM_VAL)}


def _config(fmt: str) -> str:
    return os.path.join(REPO, "configs", "custom", f"{CONFIGS[fmt]}-segmentation", "maskformer2_R18_custom.yaml")


def _opts(fmt: str, data, prefix: str, *extra) -> list:
    """Overrides pointing the example config of ``fmt`` at the test data (names ``<prefix>_train/_val``)."""
    train, val = f"{prefix}_train", f"{prefix}_val"
    return (slot_opts("TRAIN", fmt, train, data["train"]) + slot_opts("TEST", fmt, val, data["val"])
            + ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"] + TINY + list(extra))


def _train_net(*argv):
    """``train_net.main`` in this process (no interpreter start-up per run). detectron2's environment
    report, which only goes to the log, is skipped: it takes seconds per run."""
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with mock.patch("detectron2.engine.defaults.collect_env_info", return_value="(not collected in tests)"):
        return module.main(default_argument_parser().parse_args(list(argv)))


def _last_metrics(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.loads(f.read().splitlines()[-1])


def _evaluate(cfg, name: str, tmp_path, make_output) -> dict:
    """The dataset's evaluators (built as the trainer builds them) on ``make_output(record)`` per record."""
    evaluator = build_evaluator(cfg, name, str(tmp_path / "eval"))
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        evaluator.process([record], [make_output(record)])
    return evaluator.evaluate()


def _one_hot(label: np.ndarray, num_classes: int) -> torch.Tensor:
    """C x H x W scores whose argmax is ``label`` (ignored pixels: class 0)."""
    ids = torch.as_tensor(np.where(label == IGNORE, 0, label).astype(np.int64))
    return torch.nn.functional.one_hot(ids, num_classes).permute(2, 0, 1).float()


def _instances(masks: list, classes: list) -> Instances:
    inst = Instances((H, W))
    inst.pred_masks = torch.stack([torch.as_tensor(m) for m in masks])
    inst.pred_boxes = Boxes(torch.zeros(len(masks), 4))
    inst.scores = torch.ones(len(masks))
    inst.pred_classes = torch.tensor(classes)
    return inst


# ---------------------------------------------------------------- training and evaluation, per format


def test_sem_seg_folders_train_with_train_net_and_beat_the_untrained_model(data, tmp_path):
    """Image folder + label-PNG folder, registered by the config alone; 15 iterations lift the mIoU of
    SemSegEvaluator far above the untrained model's (measured: 1.3 -> 43)."""
    cfg_file, opts = _config("sem_seg"), _opts("sem_seg", data, "cs")
    _train_net("--config-file", cfg_file, *opts, "SOLVER.MAX_ITER", "15", "OUTPUT_DIR", str(tmp_path / "train"))
    trained = _last_metrics(str(tmp_path / "train"))
    untrained = _train_net("--eval-only", "--config-file", cfg_file, *opts, "MODEL.WEIGHTS", "",
                           "OUTPUT_DIR", str(tmp_path / "untrained"))["sem_seg"]
    # per-class IoU under the config's CLASS_NAMES: the metadata reached the evaluator
    assert {f"sem_seg/IoU-{c}" for c in CLASS_NAMES} <= set(trained)
    assert trained["sem_seg/mIoU"] > untrained["mIoU"] + 20, (untrained["mIoU"], trained["sem_seg/mIoU"])


def test_sem_seg_oracle_scores_100_and_one_class_map_its_exact_iou(data, tmp_path):
    cfg = setup_tool_cfg(_config("sem_seg"), _opts("sem_seg", data, "so"))
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(CLASS_NAMES)  # -1 -> derived from CLASS_NAMES

    def label(record):
        return np.asarray(Image.open(record["sem_seg_file_name"]))

    perfect = _evaluate(cfg, "so_val", tmp_path, lambda r: {"sem_seg": _one_hot(label(r), len(CLASS_NAMES))})
    assert perfect["sem_seg"]["mIoU"] == pytest.approx(100.0)
    # everything predicted "grass": IoU(grass) = grass pixels / labelled pixels, the others 0
    grass = CLASS_NAMES.index("grass")
    labels = np.stack([label(r) for r in DatasetCatalog.get("so_val")])
    expected = 100.0 * (labels == grass).sum() / (labels != IGNORE).sum() / len(CLASS_NAMES)
    flat = _evaluate(cfg, "so_val", tmp_path,
                     lambda r: {"sem_seg": _one_hot(np.full((H, W), grass, np.uint8), len(CLASS_NAMES))})
    assert flat["sem_seg"]["mIoU"] == pytest.approx(expected, abs=1e-6)


def test_coco_instance_json_trains_and_the_oracle_scores_ap_100(data, tmp_path):
    """Polygons, compressed and uncompressed RLE: ground-truth masks as predictions give mask AP 100
    through COCOEvaluator (so records, id map and evaluator agree); without the discs, AP 50."""
    cfg_file, opts = _config("coco_instance"), _opts("coco_instance", data, "ci")
    _train_net("--config-file", cfg_file, *opts, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "train"))
    assert {"segm/AP", "segm/AP-box", "segm/AP-disc"} <= set(_last_metrics(str(tmp_path / "train")))

    cfg = setup_tool_cfg(cfg_file, opts)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(THINGS)
    meta = MetadataCatalog.get("ci_val")
    assert meta.thing_classes == ["box", "disc"] and meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}

    def oracle(record, keep=("box", "disc")):
        masks, classes = [], []
        for ann in record["annotations"]:
            segm = ann["segmentation"]
            if isinstance(segm, list):
                mask = polygons_to_bitmask(segm, H, W)
            else:
                mask = mask_util.decode(segm).astype(bool)
            if meta.thing_classes[ann["category_id"]] in keep:
                masks.append(mask)
                classes.append(ann["category_id"])
        return {"instances": _instances(masks, classes)}

    assert _evaluate(cfg, "ci_val", tmp_path, oracle)["segm"]["AP"] == pytest.approx(100.0)
    boxes_only = _evaluate(cfg, "ci_val", tmp_path, lambda r: oracle(r, keep=("box",)))["segm"]
    assert boxes_only["AP-box"] == pytest.approx(100.0) and boxes_only["AP"] == pytest.approx(50.0)


def test_coco_panoptic_trains_and_the_oracle_scores_pq_miou_ap_100(data, tmp_path):
    """Panoptic PNG + json (+ semantic folder + instances json): metadata from the json's categories;
    the ground truth as predictions scores PQ, PQ_th, PQ_st, mIoU and mask AP 100 through the COCO
    panoptic, semantic and COCO evaluators."""
    from panopticapi.utils import rgb2id

    on = ["MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True"]
    cfg_file, opts = _config("coco_panoptic"), _opts("coco_panoptic", data, "cp", *on)
    _train_net("--config-file", cfg_file, *opts, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "train"))
    assert {"panoptic_seg/PQ", "sem_seg/IoU-sky", "segm/AP-disc"} <= set(_last_metrics(str(tmp_path / "train")))

    cfg = setup_tool_cfg(cfg_file, opts)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(CATEGORIES)
    meta = MetadataCatalog.get("cp_val")
    assert meta.stuff_classes == CLASS_NAMES and meta.thing_classes == ["box", "disc"]
    assert meta.stuff_colors == [c["color"] for c in CATEGORIES]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {3: 0, 7: 1, 20: 2, 21: 3}

    def oracle(record):
        pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        ids = np.zeros(pan.shape, dtype=np.int32)
        segments, masks, classes = [], [], []
        for number, seg in enumerate(record["segments_info"], start=1):
            ids[pan == seg["id"]] = number
            segments.append({"id": number, "category_id": seg["category_id"], "isthing": seg["isthing"]})
            if seg["isthing"]:
                masks.append(pan == seg["id"])
                classes.append(seg["category_id"])
        label = np.asarray(Image.open(record["sem_seg_file_name"]))
        return {"panoptic_seg": (torch.as_tensor(ids), segments), "sem_seg": _one_hot(label, len(CLASS_NAMES)),
                "instances": _instances(masks, classes)}

    results = _evaluate(cfg, "cp_val", tmp_path, oracle)
    for task, metric in (("panoptic_seg", "PQ"), ("panoptic_seg", "PQ_th"), ("panoptic_seg", "PQ_st"),
                         ("sem_seg", "mIoU"), ("segm", "AP")):
        assert results[task][metric] == pytest.approx(100.0), (task, metric, results[task][metric])


# ---------------------------------------------------------------- NUM_CLASSES and start-up errors


def test_num_classes_mismatch_is_one_start_up_error_naming_both_numbers(data, tmp_path):
    opts = _opts("sem_seg", data, "nc", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5", "SOLVER.MAX_ITER", "1",
                 "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ConfigValidationError) as info:
        _train_net("--config-file", _config("sem_seg"), *opts)
    message = str(info.value)
    assert "2 problem(s)" in message  # the train and the test set, each naming both numbers
    for name in ("nc_train", "nc_val"):
        assert f"NUM_CLASSES = 5, but dataset '{name}' has 4 classes" in message
    assert not (tmp_path / "model_final.pth").exists()


def test_unresolved_num_classes_sentinel_is_reported():
    cfg = setup_tool_cfg(os.path.join(REPO, "configs", "toy", "semantic-segmentation", "maskformer2_R18_toy.yaml"),
                         ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1"])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 6  # resolved from the toy dataset's stuff_classes
    unresolved = cfg.clone()
    unresolved.defrost()
    unresolved.MODEL.SEM_SEG_HEAD.NUM_CLASSES = -1
    problems = config_problems(unresolved)
    assert len(problems) == 1 and "NUM_CLASSES = -1" in problems[0] and "'qseg_toy_sem_seg_train': 6" in problems[0]


@pytest.mark.parametrize("fmt,override,expected", [
    ("coco_instance", ("DATASETS.CUSTOM.TRAIN.JSON", "{root}/nope.json"),
     "DATASETS.CUSTOM.TRAIN.JSON = '{root}/nope.json'"),
    ("sem_seg", ("DATASETS.CUSTOM.TRAIN.CLASS_NAMES", "[]"), "DATASETS.CUSTOM.TRAIN.CLASS_NAMES is empty"),
    ("coco_instance", ("DATASETS.CUSTOM.TEST.CLASS_NAMES", "['box', 'ball']"),
     "DATASETS.CUSTOM.TEST.CLASS_NAMES = ['box', 'ball'] differs from the categories of"),
    ("sem_seg", ("DATASETS.CUSTOM.TRAIN.FORMAT", "voc"), "DATASETS.CUSTOM.TRAIN.FORMAT = 'voc': choose one of"),
    ("coco_panoptic", ("DATASETS.CUSTOM.TRAIN.COLORS", "[[1, 2, 3]]"), None),  # the json's colours win
], ids=["missing-json", "no-class-names", "names-differ-from-json", "unknown-format", "json-colours-win"])
def test_slot_errors_name_the_key_and_the_file(data, fmt, override, expected):
    key, value = override
    opts = _opts(fmt, data, "se", key, value.format(root=data["root"]))
    if expected is None:
        setup_tool_cfg(_config(fmt), opts)
        assert MetadataCatalog.get("se_train").stuff_colors == [c["color"] for c in CATEGORIES]
        return
    with pytest.raises((CustomDatasetError, FileNotFoundError)) as info:
        setup_tool_cfg(_config(fmt), opts)
    assert expected.format(root=data["root"]) in str(info.value)


def test_panoptic_set_without_stuff_class_is_rejected_at_start_up(data, tmp_path):
    """panopticapi divides PQ_st by the number of stuff classes (ZeroDivisionError after training):
    such a test set is refused before training, with what to do instead."""
    things_only = dict(data["val"], panoptic_json=str(tmp_path / "things_only.json"))
    with open(data["val"]["panoptic_json"]) as f:
        pan = json.load(f)
    pan["categories"] = [dict(c, isthing=1) for c in pan["categories"]]
    with open(things_only["panoptic_json"], "w") as f:
        json.dump(pan, f)
    opts = (slot_opts("TRAIN", "coco_panoptic", "ns_train", data["train"])
            + slot_opts("TEST", "coco_panoptic", "ns_val", things_only)
            + ["DATASETS.TRAIN", "('ns_train',)", "DATASETS.TEST", "('ns_val',)"])
    problems = config_problems(setup_tool_cfg(_config("coco_panoptic"), opts))
    assert len(problems) == 1, problems
    assert "dataset 'ns_val' has no stuff class" in problems[0] and things_only["panoptic_json"] in problems[0]
    assert "PANOPTIC_ON False" in problems[0]
    # evaluated without PQ, the same set is fine
    assert config_problems(setup_tool_cfg(_config("coco_panoptic"), opts + [
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"])) == []


def test_panoptic_set_without_semantic_folder_needs_semantic_on_off(data):
    opts = _opts("coco_panoptic", data, "nf", "DATASETS.CUSTOM.TEST.SEM_SEG_ROOT", "")
    problems = config_problems(setup_tool_cfg(_config("coco_panoptic"), opts))
    assert len(problems) == 1 and "DATASETS.CUSTOM.TEST.SEM_SEG_ROOT is empty" in problems[0]
    records = DatasetCatalog.get("nf_val")
    assert len(records) == NUM_VAL and all("sem_seg_file_name" not in r for r in records)
    assert config_problems(setup_tool_cfg(_config("coco_panoptic"), opts + [
        "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False"])) == []
