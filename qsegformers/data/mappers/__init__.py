"""Training dataset mappers of Mask2Former, registered in ``DATASET_MAPPER_REGISTRY``:
"mask_former_semantic", "mask_former_panoptic", "mask_former_instance", and the COCO
large-scale-jitter mappers "coco_panoptic_lsj" and "coco_instance_lsj"; ``DropBadSamples``, which the
trainer wraps them in (a bad sample is dropped with one warning), and ``SafeTestDatasetMapper``, the
evaluation mapper."""
from .build import build_dataset_mapper
from .color_aug import ColorAugSSDTransform
from .instance import MaskFormerInstanceDatasetMapper
from .lsj import COCOInstanceLSJDatasetMapper, COCOPanopticLSJDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .robust import DropBadSamples
from .semantic import MaskFormerSemanticDatasetMapper
from .test_time import SafeTestDatasetMapper

__all__ = [
    "COCOInstanceLSJDatasetMapper",
    "COCOPanopticLSJDatasetMapper",
    "ColorAugSSDTransform",
    "DropBadSamples",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "SafeTestDatasetMapper",
    "build_dataset_mapper",
]
