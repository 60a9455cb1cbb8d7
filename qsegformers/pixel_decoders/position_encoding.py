"""DETR's fixed sine position embedding of a feature map (used by pixel and transformer decoders)."""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]

# Default base of the sine frequencies (DETR, "Attention is all you need").
DEFAULT_TEMPERATURE = 10000
# Default range of the normalised coordinates.
DEFAULT_SCALE = 2 * math.pi
# Added to the normalising denominator so an all-padded row/column does not divide by zero.
_NORMALIZE_EPS = 1e-6


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of the (y, x) position of every pixel; it has no parameters.

    Channel layout: the first ``num_pos_feats`` channels encode y, the next ``num_pos_feats`` encode x;
    within each half, channel pairs (2i, 2i+1) are (sin, cos) of ``pos / temperature ** (2i / num_pos_feats)``.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = DEFAULT_TEMPERATURE,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        """
        Args:
            num_pos_feats: channels per coordinate; the embedding has ``2 * num_pos_feats`` channels.
            temperature: base of the frequencies.
            normalize: map positions to (0, scale] (over the unpadded extent) before embedding.
            scale: range of normalised positions (default 2*pi); only valid with ``normalize=True``.
        """
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: normalize must be True when scale is given.")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = DEFAULT_SCALE if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: B x C x H x W feature map (only its shape and device are used).
            mask: optional B x H x W bool, True at padded pixels.

        Returns:
            B x (2 * num_pos_feats) x H x W float32 embedding.
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + _NORMALIZE_EPS) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + _NORMALIZE_EPS) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
