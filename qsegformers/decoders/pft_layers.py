"""Building blocks of the Pyramid Fusion Transformer decoder (``pft.py``).

One :class:`PFTDecoderLayer` updates the queries of every scale in parallel: per-scale self-attention,
one cross-scale inter-query attention (IQA) over the concatenated queries of all scales, per-scale
cross-attention to that scale's pixel tokens and a per-scale FFN. :class:`PFTScaleHead` turns one
scale's queries into class and mask logits. Layouts are sequence-first (``K x B x C``) as in
``layers.py``, whose SA / CA / FFN layers are reused.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, with_pos

__all__ = [
    "FFN_POSITIONS",
    "CLS_HEADS",
    "head_averaged_attention_logits",
    "PFTDecoderLayer",
    "PerClassLinear",
    "PFTScaleHead",
]

FFN_POSITIONS = ("after_cross", "after_self")
CLS_HEADS = ("shared_linear", "per_class")
MASK_EMBED_LAYERS = 3  # depth of the MLP that turns queries into mask embeddings (MaskFormer's)


def head_averaged_attention_logits(attn: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """Pre-softmax attention logits of ``attn`` averaged over its heads.

    The mean over h heads of ``q_h . k_h / sqrt(C/h)`` equals ``q . k / sqrt(h C)`` with q, k the
    full-width input projections, so one matmul gives it while the module keeps its fused kernel.

    Args:
        attn: the attention module (same embedding width for query, key and value).
        query: Q x B x C attention queries (positional embedding already added).
        key: S x B x C attention keys (positional encoding already added).

    Returns:
        B x Q x S logits.
    """
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k = (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)[:2]
    q = nn.functional.linear(query, w_q, b_q).transpose(0, 1)
    k = nn.functional.linear(key, w_k, b_k).transpose(0, 1)
    scale = math.sqrt(attn.num_heads * attn.embed_dim)
    return torch.bmm(q, k.transpose(1, 2)) / scale


class PFTDecoderLayer(nn.Module):
    """One PFT layer over S scales: SA_s -> IQA -> CA_s -> FFN_s (or SA_s -> FFN_s -> IQA -> CA_s).

    ``self_attention_layers[s]``, ``cross_attention_layers[s]`` and ``ffn_layers[s]`` have separate
    weights per scale; ``inter_query_attention`` is one module on the 3K concatenated queries (absent when
    cross-scale attention is off, which makes the scales independent).
    """

    def __init__(
        self,
        *,
        num_scales: int,
        hidden_dim: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
        cross_scale_attention: bool,
        iqa_ffn: bool,
        ffn_position: str,
    ):
        super().__init__()
        if ffn_position not in FFN_POSITIONS:
            raise ValueError(f"MODEL.PFT.FFN_POSITION must be one of {FFN_POSITIONS}, got {ffn_position!r}")
        if iqa_ffn and not cross_scale_attention:
            raise ValueError("MODEL.PFT.IQA_FFN needs MODEL.PFT.CROSS_SCALE_ATTENTION = True")
        self.ffn_position = ffn_position

        def attn_layers(layer_cls):
            return nn.ModuleList(
                layer_cls(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm) for _ in range(num_scales)
            )

        self.self_attention_layers = attn_layers(SelfAttentionLayer)
        self.cross_attention_layers = attn_layers(CrossAttentionLayer)
        self.ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)
            for _ in range(num_scales)
        )
        self.inter_query_attention = (
            SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            if cross_scale_attention
            else None
        )
        self.inter_query_ffn = (
            FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm) if iqa_ffn else None
        )

    def cross_scale(self, queries: List[Tensor], query_pos: List[Tensor]) -> List[Tensor]:
        """IQA: every query of every scale attends to all S*K queries; returns the split-back queries."""
        if self.inter_query_attention is None:
            return queries
        sizes = [q.shape[0] for q in queries]
        fused = self.inter_query_attention(torch.cat(queries), query_pos=torch.cat(query_pos))
        if self.inter_query_ffn is not None:
            fused = self.inter_query_ffn(fused)
        return list(fused.split(sizes))

    def cross_attention_logits(self, s: int, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        """Head-averaged pre-softmax logits (B x K x HW_s) of scale s's cross-attention for queries ``tgt``."""
        layer = self.cross_attention_layers[s]
        x = layer.norm(tgt) if layer.normalize_before else tgt
        return head_averaged_attention_logits(layer.multihead_attn, with_pos(x, query_pos), with_pos(memory, pos))

    def forward(
        self,
        queries: List[Tensor],
        query_pos: List[Tensor],
        memory: List[Tensor],
        pos: List[Tensor],
        need_attn_logits: bool = False,
    ) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
        """
        Args:
            queries, query_pos: per scale (finest first) K x B x C content queries and embeddings.
            memory, pos: per scale HW_s x B x C pixel tokens and their sine encodings.
            need_attn_logits: also return the cross-attention logits (for the attention loss).

        Returns:
            the updated queries (per scale K x B x C), and per scale B x K x HW_s head-averaged
            cross-attention logits, or None.
        """
        scales = range(len(queries))
        queries = [self.self_attention_layers[s](queries[s], query_pos=query_pos[s]) for s in scales]
        if self.ffn_position == "after_self":
            queries = [self.ffn_layers[s](queries[s]) for s in scales]
        queries = self.cross_scale(queries, query_pos)
        attn_logits = None
        if need_attn_logits:
            attn_logits = [self.cross_attention_logits(s, queries[s], query_pos[s], memory[s], pos[s]) for s in scales]
        queries = [
            self.cross_attention_layers[s](queries[s], memory[s], pos=pos[s], query_pos=query_pos[s]) for s in scales
        ]
        if self.ffn_position == "after_cross":
            queries = [self.ffn_layers[s](queries[s]) for s in scales]
        return queries, attn_logits


class PerClassLinear(nn.Module):
    """K separate linear maps C -> 1: ``z_k = w_k . x_k + b_k`` (the diagonal of a Linear(C, K))."""

    def __init__(self, num_classes: int, in_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default range
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """x: B x K x C -> B x K x 1."""
        return ((x * self.weight).sum(-1) + self.bias).unsqueeze(-1)


class PFTScaleHead(nn.Module):
    """Class and mask heads of one scale (shared over depth): optional LayerNorm, a class logit per query
    and a 3-layer MLP mask embedding dotted with the mask features."""

    def __init__(self, *, num_classes: int, hidden_dim: int, mask_dim: int, cls_head: str, output_norm: bool):
        super().__init__()
        if cls_head not in CLS_HEADS:
            raise ValueError(f"MODEL.PFT.CLS_HEAD must be one of {CLS_HEADS}, got {cls_head!r}")
        self.norm = nn.LayerNorm(hidden_dim) if output_norm else nn.Identity()
        self.class_embed = (
            nn.Linear(hidden_dim, 1) if cls_head == "shared_linear" else PerClassLinear(num_classes, hidden_dim)
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, MASK_EMBED_LAYERS)

    def forward(self, queries: Tensor, mask_features: Tensor) -> Tuple[Tensor, Tensor]:
        """queries: K x B x C; mask_features: B x D x H x W -> class logits B x K, mask logits B x K x H x W."""
        x = self.norm(queries).transpose(0, 1)
        class_logits = self.class_embed(x).squeeze(-1)
        mask_logits = torch.einsum("bkc,bchw->bkhw", self.mask_embed(x), mask_features)
        return class_logits, mask_logits
