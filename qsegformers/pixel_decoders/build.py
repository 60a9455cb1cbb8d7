"""Build the pixel decoder named by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
from typing import Dict

from detectron2.layers import ShapeSpec
from torch import nn

from ..registries import PIXEL_DECODER_REGISTRY, lookup

__all__ = ["build_pixel_decoder"]

_NAME_KEY = "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME"


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Look the pixel decoder up in ``PIXEL_DECODER_REGISTRY`` and build it from ``cfg``.

    Args:
        input_shape: backbone feature name -> ShapeSpec (channels, stride).

    Returns:
        A module whose ``forward_features(features)`` returns
        ``(mask_features, transformer_encoder_features or None, multi_scale_features)``.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = lookup(PIXEL_DECODER_REGISTRY, name, _NAME_KEY)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"{_NAME_KEY} = {name!r} builds {type(model).__name__}, which has no forward_features() method; "
            "pixel decoders must implement forward_features(features)."
        )
    return model
