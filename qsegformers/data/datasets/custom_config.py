"""``DATASETS.CUSTOM.{TRAIN,TEST}``: your own dataset on disk, registered from the config alone.

Each slot describes one dataset in one of three formats (see README "Train on your own data"):

* ``coco_instance``: a COCO instances json (polygons or RLE) and its image folder;
* ``coco_panoptic``: a COCO panoptic json, its PNG folder and image folder, optionally a folder of
  semantic label PNGs (for SEMANTIC_ON) and an instances json (for INSTANCE_ON);
* ``sem_seg``: an image folder and a folder of label PNGs holding class ids (``IGNORE_LABEL`` unlabelled).

:func:`qsegformers.data.datasets.custom.register_custom_datasets` registers the used slots at start-up
(``setup()`` and the tools), before the config is validated. List the slot's ``NAME`` in
``DATASETS.TRAIN`` / ``DATASETS.TEST``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["CUSTOM_SLOTS", "FORMATS", "NUM_CLASSES_FROM_DATASET", "add_custom_dataset_config"]

CUSTOM_SLOTS = ("TRAIN", "TEST")
FORMATS = ("coco_instance", "coco_panoptic", "sem_seg")
# MODEL.SEM_SEG_HEAD.NUM_CLASSES set to this is replaced at start-up by the class count of the first
# training (else test) dataset.
NUM_CLASSES_FROM_DATASET = -1


def _dataset_slot() -> CN:
    slot = CN()
    slot.NAME = ""  # name the dataset is registered under ("" = slot unused)
    slot.FORMAT = ""  # "coco_instance", "coco_panoptic" or "sem_seg"
    slot.IMAGE_ROOT = ""  # folder of the images
    slot.JSON = ""  # coco_instance: the instances json; coco_panoptic: the panoptic json
    slot.PANOPTIC_ROOT = ""  # coco_panoptic: folder of the panoptic PNGs named in the json
    slot.SEM_SEG_ROOT = ""  # sem_seg: label PNGs (class ids); coco_panoptic: optional, <png name> each
    slot.INSTANCE_JSON = ""  # coco_panoptic: optional instances json of the things (mask AP)
    slot.IMAGE_EXT = ".jpg"  # sem_seg: the image of label <stem><LABEL_EXT> is <stem><IMAGE_EXT>
    slot.LABEL_EXT = ".png"  # sem_seg: extension of the label files
    slot.IGNORE_LABEL = 255  # label id of unlabelled pixels in the label PNGs
    slot.CLASS_NAMES = []  # sem_seg: name of class id i (required); json formats: must match the json
    slot.THING_CLASSES = []  # coco_panoptic json whose categories lack "isthing": the thing names
    slot.COLORS = []  # [[R, G, B], ...] per class where the files have none ([] = detectron2's palette)
    slot.EVALUATOR_TYPE = ""  # "" = the format's: "coco", "coco_panoptic_seg" or "sem_seg"
    return slot


def add_custom_dataset_config(cfg) -> None:
    """Declare ``DATASETS.CUSTOM.TRAIN`` and ``DATASETS.CUSTOM.TEST`` (same keys) in ``cfg``, in place."""
    cfg.DATASETS.CUSTOM = CN()
    for slot in CUSTOM_SLOTS:
        cfg.DATASETS.CUSTOM[slot] = _dataset_slot()
