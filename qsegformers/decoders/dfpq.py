"""Dynamic focus-aware positional queries (DFPQ, FASeg Eq. 2) and the ablation variants of Table 5.

Every function returns the *input* of the MLP h (the learnable bias B is added by the decoder):
- ``attention_pooled_pos``: ``A @ K_p`` (Eq. 2, layers t >= 1);
- ``region_pooled_pos``: average of ``K_p`` over the predicted foreground (or background) of each query
  (first layer, and the ``dynamic_foreground`` variant at every layer);
- ``sine_embed_points`` of a mask's centre of mass (``dynamic_anchor``) or of a fixed grid (``grid_anchor``).
Shapes are batch-first ``B x N x D``; key positional encodings come sequence-first ``S x B x D``.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pixel_decoders.position_encoding import DEFAULT_SCALE, DEFAULT_TEMPERATURE

__all__ = [
    "QUERY_TYPES",
    "POOL_REGIONS",
    "build_pos_mlp",
    "attention_pooled_pos",
    "region_pooled_pos",
    "mask_centres",
    "grid_anchors",
    "sine_embed_points",
]

QUERY_TYPES = ("learnable", "grid_anchor", "dynamic_anchor", "dynamic_foreground", "dfpq")
POOL_REGIONS = ("foreground", "background", "none")
# Added to the pooled-area denominator (official: 1e-6): an empty region pools to 0, so P = h(B).
POOL_EPS = 1e-6


def build_pos_mlp(dim: int, num_layers: int) -> nn.Sequential:
    """h: ``num_layers`` Linear(dim, dim) with ReLU in between (2 layers: ``0`` Linear, ``1`` ReLU, ``2`` Linear,
    the official ``adapt_pos2d`` layout)."""
    if num_layers < 1:
        raise ValueError(f"MODEL.DFPQ.MLP_LAYERS must be >= 1, got {num_layers}.")
    modules = []
    for i in range(num_layers):
        if i:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(dim, dim))
    return nn.Sequential(*modules)


def attention_pooled_pos(attn: Tensor, key_pos: Tensor) -> Tensor:
    """attn: B x N x S attention probabilities (rows sum to 1); key_pos: S x B x D -> B x N x D."""
    return torch.bmm(attn, key_pos.transpose(0, 1).to(attn.dtype))


def region_pooled_pos(
    mask_logits: Tensor, key_pos: Tensor, size: Tuple[int, int], threshold: float, region: str
) -> Tensor:
    """Average of the key encodings over each query's predicted region at the keys' resolution.

    Args:
        mask_logits: B x N x H x W predicted mask logits (any resolution; resized bilinearly to ``size``).
        key_pos: (h*w) x B x D key positional encodings at ``size`` = (h, w).
        threshold: a pixel is foreground where sigmoid >= threshold.
        region: "foreground" or "background" (official code: background).

    Returns:
        B x N x D; 0 for a query whose region is empty.
    """
    if region not in ("foreground", "background"):
        raise ValueError(f"region must be 'foreground' or 'background', got {region!r}.")
    prob = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False).sigmoid().flatten(2)
    inside = (prob >= threshold) if region == "foreground" else (prob < threshold)
    weights = inside.to(key_pos.dtype)
    pooled = torch.bmm(weights, key_pos.transpose(0, 1))
    return pooled / (weights.sum(-1, keepdim=True) + POOL_EPS)


def _pixel_positions(length: int, device: torch.device) -> Tensor:
    """Normalised positions (j + 1) / length of pixels j = 0..length-1 (PositionEmbeddingSine's convention)."""
    return torch.arange(1, length + 1, dtype=torch.float32, device=device) / length


def mask_centres(mask_logits: Tensor, threshold: float) -> Tensor:
    """Centre of mass (x, y) of each query's foreground, normalised as ``PositionEmbeddingSine`` does.

    mask_logits: B x N x H x W -> B x N x 2. A query with an empty foreground gets the image centre.
    """
    fg = (mask_logits.detach().sigmoid() >= threshold).float()
    h, w = fg.shape[-2:]
    empty = fg.flatten(2).sum(-1) == 0
    fg = torch.where(empty[..., None, None], torch.ones_like(fg), fg)
    area = fg.flatten(2).sum(-1)
    ys, xs = _pixel_positions(h, fg.device), _pixel_positions(w, fg.device)
    cy = (fg.sum(-1) * ys).sum(-1) / area
    cx = (fg.sum(-2) * xs).sum(-1) / area
    return torch.stack((cx, cy), -1)


def grid_anchors(num_queries: int, device: torch.device) -> Tensor:
    """``num_queries`` anchors on a ceil(sqrt(N)) x ceil(sqrt(N)) grid (row-major cell centres): N x 2 (x, y)."""
    side = math.ceil(math.sqrt(num_queries))
    centres = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack((xs.flatten(), ys.flatten()), -1)[:num_queries]


def sine_embed_points(points: Tensor, num_pos_feats: int, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Sine embedding of normalised points, with ``PositionEmbeddingSine(normalize=True)``'s channel layout.

    points: ... x 2 (x, y) in [0, 1] -> ... x (2 * num_pos_feats) (y channels first, then x). A pixel at
    (j, i) of an h x w map, given as ((i + 1) / w, (j + 1) / h), gets exactly the map's encoding.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=points.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def embed(coord: Tensor) -> Tensor:
        pos = coord[..., None] * DEFAULT_SCALE / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((embed(points[..., 1].float()), embed(points[..., 0].float())), dim=-1)
