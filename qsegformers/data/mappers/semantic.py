"""Mask2Former's training mapper for semantic segmentation, and the helpers all its mappers share.

Every mapper turns one dataset dict into the training input of the meta-architecture::

    "image":     C x H x W uint8 tensor (INPUT.FORMAT channel order), padded to SIZE_DIVISIBILITY
    "sem_seg":   H x W int64 tensor of contiguous class ids, IGNORE where unlabelled or padded
    "instances": Instances of image size (H, W) with
                   gt_classes: N int64 tensor
                   gt_masks:   N x H x W bool tensor, every mask non-empty

These mappers only serve training; evaluation uses :class:`.test_time.SafeTestDatasetMapper`.

Bad inputs (issue 11): images are read with :func:`qsegformers.utils.image_io.read_image_any`
(EXIF orientation applied; grayscale, palette, RGBA and 16-bit images converted to 3 x 8 bits);
images smaller than the crop or the padding divisor are padded; targets that vanish after cropping
are dropped (an image may then have no target, which the criterion handles). A sample the mapper
cannot use (undecodable file, label of another size, label ids outside ``0..NUM_CLASSES-1``, an aspect
ratio so extreme that the resize makes a side 0) raises a ValueError/OSError naming the file; in
training, :class:`.robust.DropBadSamples` turns it into one warning and a dropped sample.
"""
import copy
import logging
from typing import List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from torch.nn import functional as F

from ...registries import DATASET_MAPPER_REGISTRY
from ...utils.image_io import ImageReadError, read_image_any
from .color_aug import ColorAugSSDTransform

__all__ = [
    "MaskFormerSemanticDatasetMapper",
    "build_mask_former_augmentations",
    "check_class_ids",
    "masks_to_instances",
    "pad_to_divisibility",
    "read_image_checked",
    "read_label",
    "register_mapper",
    "require_train",
]

logger = logging.getLogger(__name__)

IMAGE_PAD_VALUE = 128  # padding value of image pixels (Mask2Former's choice)
READ_ANY_FORMATS = ("BGR", "RGB")  # formats read_image_any produces; others use detectron2's reader
def check_class_ids(class_ids: List[int], num_classes: Optional[int], source: str) -> None:
    """Raise a ValueError naming ``source`` if a class id is outside ``0..num_classes-1``."""
    if num_classes is None:
        return
    bad = sorted({int(c) for c in class_ids if not 0 <= c < num_classes})
    if bad:
        raise ValueError(f"{source} has class ids {bad} outside 0..{num_classes - 1} "
                         f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num_classes}) that are not the ignore label")


def register_mapper(name: str):
    """Class decorator: register a mapper in ``DATASET_MAPPER_REGISTRY`` under its config name."""

    def deco(cls):
        DATASET_MAPPER_REGISTRY._do_register(name, cls)
        return cls

    return deco


def require_train(is_train: bool, mapper_name: str) -> None:
    if not is_train:
        raise ValueError(
            f"{mapper_name} only prepares training data (is_train=False given); evaluation uses "
            f"detectron2's DatasetMapper(cfg, is_train=False)."
        )


def build_mask_former_augmentations(cfg, category_area_crop: bool = True) -> list:
    """Mask2Former's training augmentations: resize, optional crop, optional SSD colour, flip.

    ``category_area_crop`` uses ``RandomCrop_CategoryAreaConstraint`` (needs a semantic map); the
    instance mapper has none and uses a plain ``RandomCrop``, as Mask2Former does.
    """
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        if category_area_crop:
            augs.append(T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
        else:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


def ignore_label_from_cfg(cfg) -> int:
    """The first training dataset's ``ignore_label`` (as Mask2Former), else MODEL.SEM_SEG_HEAD.IGNORE_VALUE."""
    if cfg.DATASETS.TRAIN:
        return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    return cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE


def read_image_checked(dataset_dict: dict, image_format: str) -> np.ndarray:
    """H x W x C uint8 image of ``dataset_dict["file_name"]``, upright per its EXIF orientation.

    Grayscale, palette, RGBA and 16-bit files are converted to ``image_format`` (see
    :func:`qsegformers.utils.image_io.read_image_any`). Raises an OSError naming the file if it cannot
    be decoded, detectron2's ``SizeMismatchError`` (a ValueError) if the record's size differs.
    """
    path = dataset_dict["file_name"]
    try:
        if image_format in READ_ANY_FORMATS:
            image = read_image_any(path, format=image_format)
        else:
            image = utils.read_image(path, format=image_format)
    except (ImageReadError, OSError) as e:
        raise OSError(f"Cannot read image file {path}: {e}") from e
    utils.check_image_size(dataset_dict, image)
    return image


def read_label(path: str, image_shape: tuple) -> np.ndarray:
    """H x W float64 label map of a single-channel PNG, without clipping 16-bit values."""
    try:
        label = utils.read_image(path)  # format None keeps 16-bit values (the "L" conversion clips them)
    except OSError as e:
        raise OSError(f"Cannot read label file {path}: {e}") from e
    if label.ndim != 2:
        raise ValueError(f"Label file {path} must be a single-channel image; got an array of shape {label.shape}.")
    if label.shape != tuple(image_shape[:2]):
        raise ValueError(f"Label file {path} has size {label.shape}, its image has {tuple(image_shape[:2])}.")
    return label.astype("double")


def pad_to_divisibility(tensor: torch.Tensor, size_divisibility: int, value) -> torch.Tensor:
    """Pad the last two dims (H, W) at the bottom/right up to multiples of ``size_divisibility``.

    With Mask2Former's settings (crop size == SIZE_DIVISIBILITY) this pads every crop to exactly
    that size; larger inputs are padded to the next multiple instead of being cut.
    """
    if size_divisibility <= 0:
        return tensor
    height, width = tensor.shape[-2:]
    pad_h, pad_w = -height % size_divisibility, -width % size_divisibility
    if pad_h == 0 and pad_w == 0:
        return tensor
    if tensor.dtype == torch.bool:
        return F.pad(tensor.to(torch.uint8), [0, pad_w, 0, pad_h], value=int(value)).bool().contiguous()
    return F.pad(tensor, [0, pad_w, 0, pad_h], value=value).contiguous()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x C numpy image -> C x H x W tensor."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def masks_to_instances(classes: List[int], masks: List[torch.Tensor], image_shape: tuple) -> Instances:
    """Instances with ``gt_classes`` (N int64) and ``gt_masks`` (N x H x W bool); empty masks dropped."""
    keep = [i for i, m in enumerate(masks) if bool(m.any())]
    instances = Instances(tuple(image_shape))
    instances.gt_classes = torch.tensor([int(classes[i]) for i in keep], dtype=torch.int64)
    if keep:
        instances.gt_masks = torch.stack([masks[i].bool() for i in keep]).contiguous()
    else:
        instances.gt_masks = torch.zeros((0,) + tuple(image_shape), dtype=torch.bool)
    return instances


@register_mapper("mask_former_semantic")
class MaskFormerSemanticDatasetMapper:
    """Semantic training mapper: one target mask per class present in the (augmented) label map.

    Input dict: ``file_name``, ``sem_seg_file_name`` (labels 0..K-1, ``ignore_label`` unlabelled;
    8- or 16-bit PNG). Output: ``image``, ``sem_seg`` and ``instances`` as in the module docstring.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: list, image_format: str, ignore_label: int,
                 size_divisibility: int, num_classes: Optional[int] = None):
        """
        Args:
            is_train: must be True (the mapper only prepares training data).
            augmentations: detectron2 Augmentations or Transforms applied to image and labels.
            image_format: INPUT.FORMAT, the channel order of ``image``.
            ignore_label: label of unlabelled pixels; also the label padding value.
            size_divisibility: pad image and labels to multiples of this (<= 0: no padding).
            num_classes: samples with class ids outside ``0..num_classes-1`` are dropped (None: no check).
        """
        require_train(is_train, type(self).__name__)
        self.is_train = is_train
        self.num_classes = num_classes
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        logger.info("[%s] training augmentations: %s", type(self).__name__, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {
            "is_train": is_train,
            "augmentations": build_mask_former_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label_from_cfg(cfg),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(f"{type(self).__name__} needs 'sem_seg_file_name' in the dataset dict of "
                             f"{dataset_dict['file_name']}.")
        label_file = dataset_dict.pop("sem_seg_file_name")
        sem_seg = read_label(label_file, image.shape)
        check_class_ids(np.unique(sem_seg[sem_seg != self.ignore_label]).tolist(), self.num_classes, label_file)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)

        image = pad_to_divisibility(image_to_tensor(aug_input.image), self.size_divisibility, IMAGE_PAD_VALUE)
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype("long"))
        sem_seg = pad_to_divisibility(sem_seg, self.size_divisibility, self.ignore_label)
        classes = [c for c in torch.unique(sem_seg).tolist() if c != self.ignore_label]
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = masks_to_instances(classes, [sem_seg == c for c in classes], sem_seg.shape)
        return dataset_dict
