"""PASCAL-Context-59 semantic segmentation: ``pascal_context_59_sem_seg_{train,val}``.

Mask2Former has no PASCAL-Context registration; these names follow its ``<dataset>_sem_seg_<split>``
pattern (``ade20k_sem_seg_val``). Layout (under ``$DETECTRON2_DATASETS``, see ``datasets/README.md``)::

    VOCdevkit/VOC2010/JPEGImages/*.jpg
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt
    VOCdevkit/VOC2010/SegmentationClassContext/*.png      0 = background, 1..59 (mmsegmentation's format)
    VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/*.png   written by
                                                          datasets/prepare_pascal_context_59.py: 0..58, 255
"""
import functools
import os

from .ade20k import ADE20K_150_COLORS
from .common import datasets_root, load_sem_seg_by_labels, register_or_replace

__all__ = ["PASCAL_CONTEXT_59_CLASSES", "PASCAL_CONTEXT_DATASET_NAMES", "pascal_context_paths",
           "register_all_pascal_context"]

IGNORE_LABEL = 255
SPLITS = ("train", "val")
PASCAL_CONTEXT_59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
]
# mmsegmentation's PascalContextDataset59 palette: the ADE20K palette without its first entry
PASCAL_CONTEXT_59_COLORS = ADE20K_150_COLORS[1:1 + len(PASCAL_CONTEXT_59_CLASSES)]
PASCAL_CONTEXT_DATASET_NAMES = {s: f"pascal_context_59_sem_seg_{s}" for s in SPLITS}


def pascal_context_paths(root: str, split: str) -> dict:
    voc = os.path.join(root, "VOCdevkit", "VOC2010")
    return {
        "image_root": os.path.join(voc, "JPEGImages"),
        "image_list": os.path.join(voc, "ImageSets", "SegmentationContext", f"{split}.txt"),
        "raw_sem_seg_root": os.path.join(voc, "SegmentationClassContext"),
        "sem_seg_root": os.path.join(voc, "annotations_detectron2", f"pc59_{split}"),
    }


def register_all_pascal_context(root: str = None) -> list:
    root = root if root is not None else datasets_root()
    for split, name in PASCAL_CONTEXT_DATASET_NAMES.items():
        paths = pascal_context_paths(root, split)
        register_or_replace(
            name, functools.partial(load_sem_seg_by_labels, name, paths["sem_seg_root"], paths["image_root"]),
            stuff_classes=list(PASCAL_CONTEXT_59_CLASSES), stuff_colors=PASCAL_CONTEXT_59_COLORS,
            image_root=paths["image_root"], sem_seg_root=paths["sem_seg_root"],
            evaluator_type="sem_seg", ignore_label=IGNORE_LABEL)
    return list(PASCAL_CONTEXT_DATASET_NAMES.values())


register_all_pascal_context()
