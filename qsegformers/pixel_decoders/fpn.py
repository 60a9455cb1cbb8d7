"""MaskFormer's FPN pixel decoder (``BasePixelDecoder``): lateral 1x1 convs, top-down nearest
upsampling and 3x3 output convs, plus a 3x3 conv that makes the per-pixel mask features."""
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

from ..registries import PIXEL_DECODER_REGISTRY

__all__ = ["NUM_MULTI_SCALE_LEVELS", "BasePixelDecoder"]

# Mask2Former feeds the transformer decoder three scales (1/32, 1/16, 1/8 for a ResNet).
NUM_MULTI_SCALE_LEVELS = 3


def sorted_by_stride(input_shape: Dict[str, ShapeSpec]) -> List[Tuple[str, ShapeSpec]]:
    """(name, ShapeSpec) pairs from fine to coarse (e.g. res2 .. res5)."""
    return sorted(input_shape.items(), key=lambda item: item[1].stride)


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """FPN over the backbone features; every output has ``conv_dim`` channels.

    Submodules use the official names: for the i-th feature from fine to coarse (1-based),
    ``adapter_i`` is the lateral 1x1 conv and ``layer_i`` the 3x3 output conv; the coarsest feature has
    no adapter (its ``layer_i`` reads it directly). ``mask_features`` is a 3x3 conv.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[str] = None,
        num_multi_scale_levels: int = NUM_MULTI_SCALE_LEVELS,
    ):
        """
        Args:
            input_shape: backbone feature name -> ShapeSpec (channels, stride) of the features used.
            conv_dim: channels of the FPN outputs.
            mask_dim: channels of the mask features.
            norm: detectron2 norm name of the FPN convs ("GN", "BN", ... or "" / None for none, with bias).
            num_multi_scale_levels: how many FPN outputs, coarsest first, are returned for the decoder.
        """
        super().__init__()
        shapes = sorted_by_stride(input_shape)
        self.in_features = [name for name, _ in shapes]
        self.num_multi_scale_levels = num_multi_scale_levels
        use_bias = not norm
        lateral_convs, output_convs = [], []
        for idx, (_, spec) in enumerate(shapes):
            is_coarsest = idx == len(shapes) - 1
            lateral_conv = None
            if not is_coarsest:
                lateral_conv = Conv2d(
                    spec.channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
                )
                weight_init.c2_xavier_fill(lateral_conv)
                self.add_module(f"adapter_{idx + 1}", lateral_conv)
            output_conv = Conv2d(
                spec.channels if is_coarsest else conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists (the modules are registered above), coarse to fine as the top-down pass runs.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, None, List[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, name -> B x C_name x H/stride x W/stride.

        Returns:
            mask_features: B x mask_dim x H/s0 x W/s0 (s0 = finest stride, 4 for a ResNet).
            transformer_encoder_features: None (this decoder has no encoder).
            multi_scale_features: the first ``num_multi_scale_levels`` FPN outputs coarse to fine,
                each B x conv_dim x H/s x W/s (for a ResNet: strides 32, 16, 8).
        """
        multi_scale_features = []
        y = None
        for name, lateral_conv, output_conv in zip(self.in_features[::-1], self.lateral_convs, self.output_convs):
            x = features[name]
            if lateral_conv is None:
                y = output_conv(x)
            else:
                cur_fpn = lateral_conv(x)
                # Nearest upsampling, as in FPN.
                y = output_conv(cur_fpn + F.interpolate(y, size=cur_fpn.shape[-2:], mode="nearest"))
            if len(multi_scale_features) < self.num_multi_scale_levels:
                multi_scale_features.append(y)
        return self.mask_features(y), None, multi_scale_features

    def forward(self, features: Dict[str, torch.Tensor]):
        """Same as ``forward_features``; heads call ``forward_features`` directly."""
        return self.forward_features(features)
