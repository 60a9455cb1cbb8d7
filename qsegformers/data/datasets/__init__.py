"""Dataset registration. Importing this package registers the generated ``qseg_toy_*`` datasets and
the real datasets (ADE20K, COCO extras, COCO-Stuff-10K, PASCAL-Context-59; layouts in datasets/README.md)."""
from .ade20k import register_all_ade20k
from .coco import register_all_coco_extra
from .pascal_context import register_all_pascal_context
from .toy import TOY_DATASET_NAMES, default_toy_root, generate_toy_dataset, register_toy_datasets

__all__ = [
    "TOY_DATASET_NAMES",
    "default_toy_root",
    "generate_toy_dataset",
    "register_all_ade20k",
    "register_all_coco_extra",
    "register_all_pascal_context",
    "register_toy_datasets",
]
