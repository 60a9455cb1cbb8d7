"""Pixel decoders (registered in ``PIXEL_DECODER_REGISTRY``): backbone features -> mask features and
multi-scale features for the transformer decoder."""
from .build import build_pixel_decoder
from .fpn import BasePixelDecoder
from .identity import IdentityPixelDecoder  # noqa: F401  (registers IdentityPixelDecoder)
from .msdeform import MSDeformAttnPixelDecoder
from .position_encoding import PositionEmbeddingSine

__all__ = ["build_pixel_decoder", "BasePixelDecoder", "MSDeformAttnPixelDecoder", "PositionEmbeddingSine"]
