"""Backbones registered in detectron2's BACKBONE_REGISTRY (ResNet is detectron2's own)."""
from . import semask, swin, vit, vit_shrunk  # noqa: F401  (registrations)
