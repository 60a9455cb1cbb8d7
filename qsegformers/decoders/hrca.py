"""High-resolution cross-attention (HRCA, FASeg Eq. 3): token selection and attention on gathered tokens.

The low-resolution attention of the round (B x N x HW_low) scores the low-resolution cells; the top
``k_low = floor(HW_low / omega_rate)`` cells are mapped to their r x r blocks of the high-resolution map
(r = H_high / H_low) and only those tokens are gathered. The attention matrix is N x (k_low * r^2), never
N x HW_high. Memory is sequence-first (``S x B x C``), as in the Mask2Former decoder.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import CrossAttentionLayer, with_pos

__all__ = [
    "SELECTIONS",
    "MAPPINGS",
    "num_selected_cells",
    "selection_scores",
    "select_token_indices",
    "gather_tokens",
    "gather_tokens_per_query",
    "per_query_cross_attention",
]

SELECTIONS = ("topk", "random", "all")
MAPPINGS = ("block", "bilinear")


def num_selected_cells(hw_low: int, omega_rate: int) -> int:
    """k_low = floor(HW_low / omega_rate), at least 1 (tiny inputs would otherwise select nothing)."""
    return max(1, hw_low // omega_rate)


def selection_scores(
    attn: Optional[Tensor], batch_size: int, num_queries: int, hw_low: int, *, selection: str, shared: bool,
    device: torch.device,
) -> Tensor:
    """Score of every low-resolution cell: B x G x HW_low, G = 1 when shared across queries, else N.

    "topk": the attention probabilities (summed over queries when shared); "random": uniform noise, so that the
    top-k is a uniformly random subset of the same size.
    """
    groups = 1 if shared else num_queries
    if selection == "random":
        return torch.rand(batch_size, groups, hw_low, device=device)
    if selection != "topk":
        raise ValueError(f"selection_scores: selection must be 'topk' or 'random', got {selection!r}.")
    if attn is None:
        raise ValueError("HRCA top-k selection needs the attention map of the selecting low-resolution layer.")
    attn = attn.detach()
    return attn.sum(1, keepdim=True) if shared else attn


def select_token_indices(
    scores: Tensor, low_size: Tuple[int, int], high_size: Tuple[int, int], k_low: int, mapping: str
) -> Tensor:
    """Indices (raster order of the high-resolution map) of the gathered tokens.

    Args:
        scores: B x G x (h*w) cell scores at ``low_size`` = (h, w).
        high_size: (H, W); must be an integer multiple (r_y, r_x) of ``low_size``.
        k_low: number of selected cells.
        mapping: "block": each selected cell (y, x) -> rows r_y*y..r_y*y+r_y-1, cols r_x*x..r_x*x+r_x-1;
            "bilinear": upsample the scores bilinearly and take the top k_low * r_y * r_x pixels.

    Returns:
        B x G x (k_low * r_y * r_x) int64.
    """
    (h, w), (hh, wh) = low_size, high_size
    if hh % h or wh % w:
        raise ValueError(
            f"HRCA needs the high-resolution map {high_size} to be a multiple of the low-resolution one {low_size}; "
            "pad inputs to a multiple of 32 (SIZE_DIVISIBILITY)."
        )
    ry, rx = hh // h, wh // w
    k_low = min(k_low, h * w)
    if mapping == "bilinear":
        up = F.interpolate(scores.unflatten(-1, (h, w)), size=high_size, mode="bilinear", align_corners=False)
        return up.flatten(2).topk(k_low * ry * rx, dim=-1).indices
    if mapping != "block":
        raise ValueError(f"MODEL.HRCA.MAPPING must be one of {MAPPINGS}, got {mapping!r}.")
    cells = scores.topk(k_low, dim=-1).indices
    dy = torch.arange(ry, device=cells.device).repeat_interleave(rx)
    dx = torch.arange(rx, device=cells.device).repeat(ry)
    rows = (cells // w)[..., None] * ry + dy
    cols = (cells % w)[..., None] * rx + dx
    return (rows * wh + cols).flatten(-2)


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x: S x B x C, indices: B x T -> T x B x C (x[indices[b, t], b])."""
    batch = torch.arange(x.shape[1], device=x.device)[:, None]
    return x.transpose(0, 1)[batch, indices].transpose(0, 1)


def gather_tokens_per_query(x: Tensor, indices: Tensor) -> Tensor:
    """x: S x B x C, indices: B x N x T -> B x N x T x C."""
    batch = torch.arange(x.shape[1], device=x.device)[:, None, None]
    return x.transpose(0, 1)[batch, indices]


def per_query_cross_attention(
    layer: CrossAttentionLayer, tgt: Tensor, keys: Tensor, pos: Tensor, query_pos: Optional[Tensor]
) -> Tensor:
    """``layer`` (its multi-head weights, residual and norm) with a different key set for every query.

    Args:
        tgt, query_pos: N x B x C queries and their positional queries.
        keys, pos: B x N x T x C gathered tokens and their positional encodings.

    Returns:
        N x B x C, equal to ``layer(tgt, memory, pos=..., query_pos=...)`` when all queries share one key set.
    """
    mha = layer.multihead_attn
    x = layer.norm(tgt) if layer.normalize_before else tgt
    n, b, c = x.shape
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(with_pos(x, query_pos), w_q, b_q).transpose(0, 1).reshape(b, n, heads, c // heads)
    k = F.linear(keys + pos, w_k, b_k).unflatten(-1, (heads, c // heads))
    v = F.linear(keys, w_v, b_v).unflatten(-1, (heads, c // heads))
    logits = torch.einsum("bnhd,bnthd->bnht", q, k) / math.sqrt(c // heads)
    attn = F.dropout(logits.softmax(-1), p=mha.dropout, training=mha.training)
    out = mha.out_proj(torch.einsum("bnht,bnthd->bnhd", attn, v).reshape(b, n, c)).transpose(0, 1)
    tgt = tgt + layer.dropout(out)
    return tgt if layer.normalize_before else layer.norm(tgt)
