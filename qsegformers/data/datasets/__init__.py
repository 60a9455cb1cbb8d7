"""Dataset registration. Importing this package registers the generated ``qseg_toy_*`` datasets and
the real datasets (ADE20K, COCO panoptic/instances/semantic, COCO-Stuff-10K, PASCAL-Context-59,
Cityscapes; layouts in datasets/README.md). detectron2's own built-ins are re-registered with the same
names and metadata, with the root read from ``$DETECTRON2_DATASETS`` and a clear error for a missing folder."""
from .ade20k import register_all_ade20k
from .cityscapes import register_all_cityscapes
from .coco import register_all_coco_extra, register_all_coco_instances
from .pascal_context import register_all_pascal_context
from .toy import TOY_DATASET_NAMES, default_toy_root, generate_toy_dataset, register_toy_datasets

__all__ = [
    "TOY_DATASET_NAMES",
    "default_toy_root",
    "generate_toy_dataset",
    "register_all_ade20k",
    "register_all_cityscapes",
    "register_all_coco_extra",
    "register_all_coco_instances",
    "register_all_pascal_context",
    "register_toy_datasets",
]
