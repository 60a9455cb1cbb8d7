"""``IdentityPixelDecoder``: hands backbone features to the transformer decoder unchanged (SegViT).

SegViT has no pixel decoder: its ATM decoder reads plain-ViT block outputs directly. This module only
satisfies the pixel-decoder contract: it has no parameters, fuses nothing and returns no mask features.
"""
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..registries import PIXEL_DECODER_REGISTRY

__all__ = ["IdentityPixelDecoder"]


@PIXEL_DECODER_REGISTRY.register()
class IdentityPixelDecoder(nn.Module):
    """Returns the features named in ``in_features``, in that order (SegViT: deepest block first)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: Sequence[str], conv_dim: int):
        """
        Args:
            input_shape: backbone feature name -> ShapeSpec.
            in_features: names to pass on, in the order the decoder consumes them.
            conv_dim: the width the decoder is built for (MODEL.SEM_SEG_HEAD.CONVS_DIM); every passed
                feature must have exactly this many channels, since nothing here projects them.
        """
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"IdentityPixelDecoder: features {missing} (MODEL.SEM_SEG_HEAD.IN_FEATURES) are not among the "
                f"backbone's {sorted(input_shape)}"
            )
        wrong = {f: input_shape[f].channels for f in in_features if input_shape[f].channels != conv_dim}
        if wrong:
            raise ValueError(
                f"IdentityPixelDecoder passes features unchanged, so MODEL.SEM_SEG_HEAD.CONVS_DIM ({conv_dim}) must "
                f"equal their channels; got {wrong}. Set CONVS_DIM to the backbone width (e.g. MODEL.VIT.EMBED_DIM)."
            )
        self.in_features = list(in_features)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {"input_shape": input_shape, "in_features": list(head.IN_FEATURES), "conv_dim": head.CONVS_DIM}

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Optional[Tensor], None, List[Tensor]]:
        """features: name -> B x C x h x w. Returns ``(None, None, [features[n] for n in in_features])``:
        no mask features, no encoder features, the selected maps unchanged."""
        return None, None, [features[name] for name in self.in_features]
