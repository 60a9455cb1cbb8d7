"""Training dataset mappers of Mask2Former, registered in ``DATASET_MAPPER_REGISTRY``:
"mask_former_semantic", "mask_former_panoptic", "mask_former_instance", and the COCO
large-scale-jitter mappers "coco_panoptic_lsj" and "coco_instance_lsj"."""
from .build import build_dataset_mapper
from .color_aug import ColorAugSSDTransform
from .instance import MaskFormerInstanceDatasetMapper
from .lsj import COCOInstanceLSJDatasetMapper, COCOPanopticLSJDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .semantic import MaskFormerSemanticDatasetMapper

__all__ = [
    "COCOInstanceLSJDatasetMapper",
    "COCOPanopticLSJDatasetMapper",
    "ColorAugSSDTransform",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_dataset_mapper",
]
