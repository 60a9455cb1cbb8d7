"""Training dataset mappers of Mask2Former, registered in ``DATASET_MAPPER_REGISTRY``:
"mask_former_semantic", "mask_former_panoptic" and "mask_former_instance"."""
from .build import build_dataset_mapper
from .color_aug import ColorAugSSDTransform
from .instance import MaskFormerInstanceDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .semantic import MaskFormerSemanticDatasetMapper

__all__ = [
    "ColorAugSSDTransform",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_dataset_mapper",
]
