"""Backbone output shapes and random features shared by the pixel-decoder tests."""
import torch
from detectron2.layers import ShapeSpec

# ResNet-50 res2..res5 (channels, stride), as in the official configs.
R50_SHAPES = {
    "res2": ShapeSpec(channels=256, stride=4),
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}
# The same strides with few channels, for fast forward/backward tests.
TINY_SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def random_features(shapes, batch=2, size=64):
    """name -> batch x C x size/stride x size/stride random features for a ``size`` x ``size`` image."""
    return {k: torch.randn(batch, s.channels, size // s.stride, size // s.stride) for k, s in shapes.items()}
