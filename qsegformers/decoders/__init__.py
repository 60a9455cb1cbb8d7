"""Transformer decoders (query x pixel features -> class and mask predictions), registered by name."""
from . import pft  # noqa: F401  (registers PyramidFusionTransformerDecoder)
from . import mp_former  # noqa: F401  (registers MPMaskedTransformerDecoder and the official MP-Former name)
from . import atm  # noqa: F401  (registers ATMDecoder and ATMShrunkDecoder)
from . import faseg  # noqa: F401  (registers FASegTransformerDecoder, MaskFormerHeadFASeg and official names)
from .build import build_transformer_decoder
from .mask2former import MultiScaleMaskedTransformerDecoder

__all__ = ["build_transformer_decoder", "MultiScaleMaskedTransformerDecoder"]
