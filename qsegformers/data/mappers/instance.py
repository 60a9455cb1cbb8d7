"""Mask2Former's training mapper for instance segmentation (COCO-style annotations)."""
import copy
import logging

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

from .semantic import (
    IMAGE_PAD_VALUE,
    build_mask_former_augmentations,
    image_to_tensor,
    masks_to_instances,
    pad_to_divisibility,
    read_image_checked,
    register_mapper,
    require_train,
)

__all__ = ["MaskFormerInstanceDatasetMapper"]

logger = logging.getLogger(__name__)


@register_mapper("mask_former_instance")
class MaskFormerInstanceDatasetMapper:
    """Instance training mapper: one target per non-crowd annotation still visible after augmentation.

    Input dict: ``file_name`` and ``annotations`` (``category_id`` contiguous, ``bbox``/``bbox_mode``,
    ``segmentation`` as polygons, RLE or an H x W mask). Output::

        "image":     C x H x W uint8 tensor, padded to SIZE_DIVISIBILITY
        "instances": gt_classes (N int64), gt_masks (N x H x W bool, non-empty),
                     gt_boxes (Boxes, XYXY of each mask)
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: list, image_format: str, size_divisibility: int):
        """
        Args:
            is_train: must be True (the mapper only prepares training data).
            augmentations: detectron2 Augmentations or Transforms applied to image and annotations.
            image_format: INPUT.FORMAT, the channel order of ``image``.
            size_divisibility: pad image and masks to multiples of this (<= 0: no padding).
        """
        require_train(is_train, type(self).__name__)
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        logger.info("[%s] training augmentations: %s", type(self).__name__, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {
            "is_train": is_train,
            "augmentations": build_mask_former_augmentations(cfg, category_area_crop=False),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image_size = aug_input.image.shape[:2]

        annos = [utils.transform_instance_annotations(obj, transforms, image_size)
                 for obj in dataset_dict.pop("annotations", []) if not obj.get("iscrowd", 0)]
        if any("segmentation" not in obj for obj in annos):
            raise ValueError(f"{type(self).__name__} needs a 'segmentation' in every annotation of "
                             f"{dataset_dict['file_name']}.")
        if annos:
            gt = utils.annotations_to_instances(annos, image_size, mask_format="bitmask")
            classes, masks = gt.gt_classes.tolist(), list(gt.gt_masks.tensor)
        else:
            classes, masks = [], []

        image = pad_to_divisibility(image_to_tensor(aug_input.image), self.size_divisibility, IMAGE_PAD_VALUE)
        masks = [pad_to_divisibility(m, self.size_divisibility, False) for m in masks]
        instances = masks_to_instances(classes, masks, image.shape[-2:])
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        dataset_dict["image"] = image
        dataset_dict["instances"] = instances
        return dataset_dict
