"""``MaskFormerHeadFASeg`` (official FASeg registry name): ``MaskFormerHead`` that also hands the pixel
decoder's position maps (FASeg's conditional PEG encodings) to the transformer decoder."""
from typing import Dict, List, Optional

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor

from ..head import MaskFormerHead

__all__ = ["MaskFormerHeadFASeg"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHeadFASeg(MaskFormerHead):
    """Pixel decoder (``forward_features_with_pos``, e.g. ``MSDeformAttnPixelDecoder4Scales``) then a decoder
    whose ``forward`` accepts ``pos_embeddings`` (e.g. ``FASegTransformerDecoder``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not callable(getattr(self.pixel_decoder, "forward_features_with_pos", None)):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NAME = MaskFormerHeadFASeg needs a pixel decoder that returns position maps "
                f"(forward_features_with_pos), e.g. MSDeformAttnPixelDecoder4Scales; got "
                f"{type(self.pixel_decoder).__name__}."
            )

    def forward(
        self, features: Dict[str, Tensor], mask: Optional[Tensor] = None, targets: Optional[List[Dict]] = None
    ) -> Dict:
        """features: backbone outputs by name (B x C x H/s x W/s). Returns the decoder's output dict."""
        mask_features, _, multi_scale_features, pos = self.pixel_decoder.forward_features_with_pos(features)
        return self.predictor(multi_scale_features, mask_features, mask, targets=targets, pos_embeddings=pos)
