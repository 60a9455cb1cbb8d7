"""Tests of qsegformers.engine.evaluators: the evaluator classes chosen for each evaluator_type."""
import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from qsegformers.config import add_qsegformers_config
from qsegformers.engine.evaluators import (
    SUPPORTED_EVALUATOR_TYPES,
    SafeCityscapesInstanceEvaluator,
    SafeCityscapesSemSegEvaluator,
    build_evaluator,
)
from qsegformers.evaluation import InstanceSegEvaluator

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

PREFIX = "qseg_engine_eval_test_"
IGNORE_LABEL = 255
RECORDS = [{"file_name": "img.png", "sem_seg_file_name": "sem.png", "height": 4, "width": 4}]
PANOPTIC_META = {
    "thing_dataset_id_to_contiguous_id": {1: 0},
    "stuff_dataset_id_to_contiguous_id": {1: 0, 2: 1},
    "stuff_classes": ["thing", "stuff"],
    "thing_classes": ["thing"],
    "ignore_label": IGNORE_LABEL,
}


@pytest.fixture(scope="module")
def coco_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img.png", "height": 4, "width": 4}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    return str(path)


@pytest.fixture(scope="module")
def datasets(coco_json):
    """name -> registered test dataset, one per evaluator_type variant."""
    variants = {
        "sem_seg": ("sem_seg", RECORDS, {"stuff_classes": ["a", "b"], "ignore_label": IGNORE_LABEL}),
        "coco": ("coco", RECORDS, {"json_file": coco_json, "thing_classes": ["thing"]}),
        "coco_panoptic_seg": ("coco_panoptic_seg", RECORDS, dict(PANOPTIC_META, json_file=coco_json)),
        "coco_panoptic_no_json": ("coco_panoptic_seg", RECORDS, PANOPTIC_META),
        "coco_panoptic_no_sem": ("coco_panoptic_seg", [{"file_name": "img.png"}], PANOPTIC_META),
        "ade20k_panoptic_seg": ("ade20k_panoptic_seg", RECORDS, dict(PANOPTIC_META, json_file=coco_json)),
        "cityscapes_sem_seg": ("cityscapes_sem_seg", RECORDS, {"gt_dir": "gt"}),
        "cityscapes_instance": ("cityscapes_instance", RECORDS, {"gt_dir": "gt"}),
        "cityscapes_panoptic_seg": ("cityscapes_panoptic_seg", RECORDS, dict(PANOPTIC_META, gt_dir="gt")),
        "unknown": ("pascal_voc", RECORDS, {}),
        "missing": (None, RECORDS, {}),
    }
    names = {}
    for variant, (evaluator_type, records, meta) in variants.items():
        name = PREFIX + variant
        DatasetCatalog.register(name, lambda records=records: [dict(r) for r in records])
        if evaluator_type is not None:
            meta = dict(meta, evaluator_type=evaluator_type)
        MetadataCatalog.get(name).set(**meta)
        names[variant] = name
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(tmp_path, semantic=True, instance=True, panoptic=True):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    test = cfg.MODEL.MASK_FORMER.TEST
    test.SEMANTIC_ON, test.INSTANCE_ON, test.PANOPTIC_ON = semantic, instance, panoptic
    return cfg


def _classes(evaluator):
    if isinstance(evaluator, DatasetEvaluators):
        return [type(e) for e in evaluator._evaluators]
    return [type(evaluator)]


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("sem_seg", [SemSegEvaluator]),
        ("coco", [InstanceSegEvaluator]),
        ("coco_panoptic_seg", [COCOPanopticEvaluator, SemSegEvaluator, InstanceSegEvaluator]),
        ("coco_panoptic_no_json", [COCOPanopticEvaluator, SemSegEvaluator]),
        ("ade20k_panoptic_seg", [COCOPanopticEvaluator, SemSegEvaluator, InstanceSegEvaluator]),
        ("cityscapes_sem_seg", [SafeCityscapesSemSegEvaluator]),
        ("cityscapes_instance", [SafeCityscapesInstanceEvaluator]),
        (
            "cityscapes_panoptic_seg",
            [COCOPanopticEvaluator, SafeCityscapesSemSegEvaluator, SafeCityscapesInstanceEvaluator],
        ),
    ],
)
def test_classes_per_evaluator_type(datasets, tmp_path, variant, expected):
    assert _classes(build_evaluator(_cfg(tmp_path), datasets[variant])) == expected


def test_coco_evaluator_is_pure_python_mask_ap(datasets, tmp_path):
    evaluator = build_evaluator(_cfg(tmp_path), datasets["coco"])
    assert evaluator._use_fast_impl is False
    assert tuple(evaluator._tasks) == ("segm",)


def test_test_switches_select_panoptic_evaluators(datasets, tmp_path):
    cfg = _cfg(tmp_path, semantic=False, instance=False, panoptic=True)
    assert _classes(build_evaluator(cfg, datasets["coco_panoptic_seg"])) == [COCOPanopticEvaluator]
    cfg = _cfg(tmp_path, semantic=True, instance=False, panoptic=False)
    assert _classes(build_evaluator(cfg, datasets["ade20k_panoptic_seg"])) == [SemSegEvaluator]


def test_output_folder_defaults_to_inference_dir(datasets, tmp_path):
    evaluator = build_evaluator(_cfg(tmp_path), datasets["sem_seg"])
    assert evaluator._output_dir == str(tmp_path / "inference")
    assert build_evaluator(_cfg(tmp_path), datasets["sem_seg"], "elsewhere")._output_dir == "elsewhere"


@pytest.mark.parametrize("variant, shown_type", [("unknown", "'pascal_voc'"), ("missing", "None")])
def test_unsupported_type_is_a_clear_error(datasets, tmp_path, variant, shown_type):
    with pytest.raises(ValueError) as info:
        build_evaluator(_cfg(tmp_path), datasets[variant])
    message = str(info.value)
    assert datasets[variant] in message and shown_type in message
    assert all(t in message for t in SUPPORTED_EVALUATOR_TYPES)


def test_no_enabled_output_is_a_clear_error(datasets, tmp_path):
    cfg = _cfg(tmp_path, semantic=False, instance=False, panoptic=False)
    with pytest.raises(ValueError, match="PANOPTIC_ON, SEMANTIC_ON and INSTANCE_ON"):
        build_evaluator(cfg, datasets["coco_panoptic_seg"])


def test_semantic_eval_without_semantic_labels_is_a_clear_error(datasets, tmp_path):
    with pytest.raises(ValueError, match="sem_seg_file_name.*SEMANTIC_ON"):
        build_evaluator(_cfg(tmp_path), datasets["coco_panoptic_no_sem"])
