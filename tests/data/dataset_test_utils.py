"""Helpers shared by the real-dataset tests (miniature copies in the official layouts)."""
import importlib.util
import os

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from qsegformers.config import add_qsegformers_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def load_prepare_script(name):
    """Import ``datasets/<name>.py`` (the prepare scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "datasets", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluator_cfg(dataset, mapper, tmp_path, image_size, semantic=True, panoptic=False, instance=False):
    """A config that trains on ``dataset`` with ``mapper`` at the miniature's (H, W), no crop or colour aug."""
    h, w = image_size
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (h,)
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * w
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    cfg.OUTPUT_DIR = str(tmp_path)
    # The class count of the dataset (mappers reject label ids outside it).
    meta = MetadataCatalog.get(dataset)
    classes = meta.thing_classes if mapper == "mask_former_instance" else meta.get("stuff_classes", None)
    if classes:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(classes)
    test = cfg.MODEL.MASK_FORMER.TEST
    test.SEMANTIC_ON, test.PANOPTIC_ON, test.INSTANCE_ON = semantic, panoptic, instance
    return cfg


def evaluate(evaluator, dicts, outputs):
    """Run ``evaluator`` on one output per dataset dict and return its results."""
    evaluator.reset()
    for d, out in zip(dicts, outputs):
        evaluator.process([d], [out])
    return evaluator.evaluate()
