"""PASCAL-Context-59 on a miniature VOC2010 copy: prepare script, loader, mapper, evaluator.

Val image: row 0 background (raw 0 -> ignore), columns 0-15 "sky", 16-31 "grass". ``JPEGImages``
also holds an image of neither split, which the loader must not need.
"""
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from qsegformers.config import add_qsegformers_config
from qsegformers.data.datasets.pascal_context import (
    PASCAL_CONTEXT_59_CLASSES,
    pascal_context_paths,
    register_all_pascal_context,
)
from qsegformers.data.mappers import build_dataset_mapper
from qsegformers.engine.evaluators import build_evaluator

from dataset_test_utils import load_prepare_script
from eval_only_utils import check_eval_only

H, W = 24, 32
IGNORE = 255
NUM_CLASSES = len(PASCAL_CONTEXT_59_CLASSES)
SKY, GRASS = PASCAL_CONTEXT_59_CLASSES.index("sky"), PASCAL_CONTEXT_59_CLASSES.index("grass")
SPLIT_NAMES = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000005"]}


@pytest.fixture(scope="module")
def pc_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2datasets"))
    raw = np.zeros((H, W), dtype=np.uint8)
    raw[1:, :16], raw[1:, 16:] = SKY + 1, GRASS + 1  # mmsegmentation's format: 0 background, 1..59
    paths = pascal_context_paths(root, "train")
    for key in ("image_root", "raw_sem_seg_root"):
        os.makedirs(paths[key])
    os.makedirs(os.path.dirname(paths["image_list"]))
    for split, names in SPLIT_NAMES.items():
        with open(pascal_context_paths(root, split)["image_list"], "w") as f:
            f.write("\n".join(names) + "\n")
        for name in names:
            Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(os.path.join(paths["image_root"], name + ".jpg"))
            Image.fromarray(raw).save(os.path.join(paths["raw_sem_seg_root"], name + ".png"))
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(os.path.join(paths["image_root"], "2007_000027.jpg"))
    assert load_prepare_script("prepare_pascal_context_59").main(["--root", root]) == 3
    register_all_pascal_context(root)
    yield root
    register_all_pascal_context()


def _one_hot(label):
    label = torch.as_tensor(np.where(label < NUM_CLASSES, label, 0).astype(np.int64))
    return torch.nn.functional.one_hot(label, NUM_CLASSES).permute(2, 0, 1).float()


def _evaluate(evaluator, dicts, label):
    evaluator.reset()
    evaluator.process(dicts, [{"sem_seg": _one_hot(label)}])
    return evaluator.evaluate()["sem_seg"]


def test_pascal_context_59(pc_root, tmp_path):
    meta = MetadataCatalog.get("pascal_context_59_sem_seg_val")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == IGNORE
    assert len(meta.stuff_classes) == len(meta.stuff_colors) == 59
    with Image.open(os.path.join(pascal_context_paths(pc_root, "val")["sem_seg_root"], "2008_000005.png")) as im:
        label = np.asarray(im).astype(np.int64)
    assert label[0].tolist() == [IGNORE] * W and (label[1:, :16] == SKY).all() and (label[1:, 16:] == GRASS).all()

    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.DATASETS.TRAIN = ("pascal_context_59_sem_seg_train",)
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (H,), 4 * W
    cfg.INPUT.CROP.ENABLED, cfg.INPUT.COLOR_AUG_SSD = False, False
    cfg.OUTPUT_DIR = str(tmp_path)
    train = DatasetCatalog.get("pascal_context_59_sem_seg_train")
    assert [os.path.basename(d["file_name"]) for d in train] == ["2008_000002.jpg", "2008_000003.jpg"]
    assert sorted(build_dataset_mapper(cfg, True)(train[0])["instances"].gt_classes.tolist()) == sorted([SKY, GRASS])

    dicts = DatasetCatalog.get("pascal_context_59_sem_seg_val")
    evaluator = build_evaluator(cfg, "pascal_context_59_sem_seg_val", str(tmp_path))
    assert _evaluate(evaluator, dicts, label)["mIoU"] == pytest.approx(100.0)
    wrong = label.copy()
    wrong[1:, 16:24] = SKY  # sky IoU 16/24, grass IoU 8/16
    res = _evaluate(evaluator, dicts, wrong)
    assert res["mIoU"] == pytest.approx(100 * float((Fraction(2, 3) + Fraction(1, 2)) / 2))


def test_missing_folder_names_path_and_readme(tmp_path):
    register_all_pascal_context(str(tmp_path / "nowhere"))
    try:
        with pytest.raises(FileNotFoundError, match=r"nowhere.*datasets/README\.md"):
            DatasetCatalog.get("pascal_context_59_sem_seg_val")
    finally:
        register_all_pascal_context()


def test_eval_only_from_checkpoint(pc_root, tmp_path):
    register_all_pascal_context(pc_root)  # other tests re-register with other roots
    check_eval_only("pascal-context-59/semantic-segmentation/maskformer2_R50_bs16_40k.yaml", tmp_path, {"sem_seg"})
