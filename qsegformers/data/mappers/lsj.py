"""COCO large-scale-jitter (LSJ) training mappers: "coco_panoptic_lsj" and "coco_instance_lsj".

Mask2Former's COCO recipe: horizontal flip, random rescale of a ``INPUT.IMAGE_SIZE`` square by a factor
in [``INPUT.MIN_SCALE``, ``INPUT.MAX_SCALE``], then a fixed ``IMAGE_SIZE`` x ``IMAGE_SIZE`` crop. The
crop does not pad: images smaller than the square are padded afterwards by the mappers' own padding
(image 128, labels ignore, panoptic ids void), so padded pixels never become class 0, as detectron2
v0.6's ``FixedSizeCrop`` padding would make them for label maps.
"""
from detectron2.data import transforms as T

from .instance import MaskFormerInstanceDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .semantic import ignore_label_from_cfg, register_mapper

__all__ = ["build_lsj_augmentations", "COCOPanopticLSJDatasetMapper", "COCOInstanceLSJDatasetMapper"]


def build_lsj_augmentations(cfg) -> list:
    """Flip, ResizeScale to the IMAGE_SIZE square times a random scale, fixed-size crop (no padding)."""
    size = cfg.INPUT.IMAGE_SIZE
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    augs.append(T.ResizeScale(min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE,
                              target_height=size, target_width=size))
    augs.append(T.FixedSizeCrop(crop_size=(size, size), pad=False))
    return augs


def _lsj_mapper_config(cfg, is_train: bool) -> dict:
    """Constructor arguments shared by both LSJ mappers: outputs padded to IMAGE_SIZE x IMAGE_SIZE."""
    return {
        "is_train": is_train,
        "augmentations": build_lsj_augmentations(cfg),
        "image_format": cfg.INPUT.FORMAT,
        "size_divisibility": cfg.INPUT.IMAGE_SIZE,
    }


@register_mapper("coco_panoptic_lsj")
class COCOPanopticLSJDatasetMapper(MaskFormerPanopticDatasetMapper):
    """The panoptic mapper with LSJ augmentation; outputs are padded to IMAGE_SIZE x IMAGE_SIZE."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {**_lsj_mapper_config(cfg, is_train), "ignore_label": ignore_label_from_cfg(cfg),
                "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}


@register_mapper("coco_instance_lsj")
class COCOInstanceLSJDatasetMapper(MaskFormerInstanceDatasetMapper):
    """The instance mapper with LSJ augmentation; outputs are padded to IMAGE_SIZE x IMAGE_SIZE."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return _lsj_mapper_config(cfg, is_train)
