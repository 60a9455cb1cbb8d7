"""Backbones registered in detectron2's BACKBONE_REGISTRY (plain ResNet is detectron2's own;
``resnet_deeplab`` adds the DeepLab-stem / dilated variant used by the R101c models)."""
from . import resnet_deeplab, semask, swin, vit, vit_shrunk  # noqa: F401  (registrations)
