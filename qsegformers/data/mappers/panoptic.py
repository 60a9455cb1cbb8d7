"""Mask2Former's training mapper for COCO-style panoptic segmentation."""
import copy

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .semantic import (
    IMAGE_PAD_VALUE,
    MaskFormerSemanticDatasetMapper,
    check_class_ids,
    image_to_tensor,
    masks_to_instances,
    pad_to_divisibility,
    read_image_checked,
    read_label,
    register_mapper,
)

__all__ = ["MaskFormerPanopticDatasetMapper"]

VOID_SEGMENT_ID = 0  # panoptic id of unlabelled pixels (COCO panoptic format); also the padding value


def _read_panoptic_rgb(path: str, image_shape: tuple) -> np.ndarray:
    """H x W x 3 uint8 RGB-encoded segment ids of a COCO panoptic PNG."""
    try:
        pan_rgb = utils.read_image(path, "RGB")
    except OSError as e:
        raise OSError(f"Cannot read panoptic file {path}: {e}") from e
    if pan_rgb.shape[:2] != tuple(image_shape[:2]):
        raise ValueError(f"Panoptic file {path} has size {pan_rgb.shape[:2]}, its image has {tuple(image_shape[:2])}.")
    return pan_rgb


def semantic_from_panoptic(pan_ids: np.ndarray, segments_info: list, ignore_label: int) -> np.ndarray:
    """H x W float64 semantic map (contiguous ids, ``ignore_label`` on void) from H x W segment ids."""
    sem_seg = np.full(pan_ids.shape, ignore_label, dtype=np.float64)
    for segment in segments_info:
        sem_seg[pan_ids == segment["id"]] = segment["category_id"]
    return sem_seg


@register_mapper("mask_former_panoptic")
class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Panoptic training mapper: one target mask per non-crowd segment still visible after augmentation.

    Input dict: ``file_name``, ``pan_seg_file_name`` (COCO panoptic PNG), ``segments_info`` (with
    contiguous ``category_id``, ``id`` and ``iscrowd``) and optionally ``sem_seg_file_name``; without
    it the semantic map is derived from the panoptic one. Output: ``image``, ``sem_seg`` and
    ``instances`` as in :mod:`.semantic`. Constructor and config are the semantic mapper's.
    """

    def __call__(self, dataset_dict: dict) -> dict:
        from panopticapi.utils import rgb2id

        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        if "pan_seg_file_name" not in dataset_dict or "segments_info" not in dataset_dict:
            raise ValueError(f"{type(self).__name__} needs 'pan_seg_file_name' and 'segments_info' in the "
                             f"dataset dict of {dataset_dict['file_name']}.")
        # Ids < 2**24 are exact in float64; as float the ids take the same (torch) nearest-neighbour
        # resize path as the float64 sem_seg, so masks and labels stay pixel-aligned (resizing the
        # uint8 RGB encoding goes through PIL, whose nearest neighbour picks other source pixels).
        pan_ids = rgb2id(_read_panoptic_rgb(dataset_dict.pop("pan_seg_file_name"), image.shape)).astype(np.float64)
        segments_info = dataset_dict.pop("segments_info")
        check_class_ids([s["category_id"] for s in segments_info], self.num_classes, "segments_info")
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = read_label(dataset_dict.pop("sem_seg_file_name"), image.shape)
        else:
            sem_seg = semantic_from_panoptic(pan_ids, segments_info, self.ignore_label)

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        pan_ids = torch.as_tensor(transforms.apply_segmentation(pan_ids).astype(np.int64))

        image = pad_to_divisibility(image_to_tensor(aug_input.image), self.size_divisibility, IMAGE_PAD_VALUE)
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype("long"))
        sem_seg = pad_to_divisibility(sem_seg, self.size_divisibility, self.ignore_label)
        pan_ids = pad_to_divisibility(pan_ids, self.size_divisibility, VOID_SEGMENT_ID)

        segments = [s for s in segments_info if not s.get("iscrowd", 0)]
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = masks_to_instances(
            [s["category_id"] for s in segments], [pan_ids == s["id"] for s in segments], pan_ids.shape)
        return dataset_dict
