"""``MaskFormerHead``: the pixel decoder followed by the transformer decoder (official registry name)."""
from typing import Dict, List, Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from .decoders.build import build_transformer_decoder
from .pixel_decoders.build import build_pixel_decoder

__all__ = ["MaskFormerHead", "BranchMaskFormerHead"]

# The only TRANSFORMER_IN_FEATURE the query decoders read: the pixel decoder's multi-scale outputs.
MULTI_SCALE_FEATURE = "multi_scale_pixel_decoder"


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs ``pixel_decoder`` on backbone features, then ``predictor`` (the transformer decoder)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str = MULTI_SCALE_FEATURE,
    ):
        super().__init__()
        if transformer_in_feature != MULTI_SCALE_FEATURE:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = {transformer_in_feature!r} is not supported: the "
                f"query decoders read the pixel decoder's multi-scale features; set it to {MULTI_SCALE_FEATURE!r}."
            )
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in head.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES asks for {missing}, but the backbone only returns "
                f"{sorted(input_shape)}."
            )
        shapes = {k: v for k, v in input_shape.items() if k in head.IN_FEATURES}
        return {
            "input_shape": shapes,
            "ignore_value": head.IGNORE_VALUE,
            "num_classes": head.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, shapes),
            "loss_weight": head.LOSS_WEIGHT,
            "transformer_in_feature": cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(cfg, head.CONVS_DIM, mask_classification=True),
        }

    def forward(
        self, features: Dict[str, Tensor], mask: Optional[Tensor] = None, targets: Optional[List[Dict]] = None
    ) -> Dict:
        """features: backbone outputs by name (B x C x H/s x W/s). Returns the decoder's output dict."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask, targets=targets)


@SEM_SEG_HEADS_REGISTRY.register()
class BranchMaskFormerHead(MaskFormerHead):
    """Official SeMask-Mask2Former head name. Its only addition, the parameter-free prior upsampling, lives in
    :mod:`qsegformers.losses.semask_prior`, so the head is :class:`MaskFormerHead` unchanged."""
