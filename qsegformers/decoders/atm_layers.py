"""Building blocks of SegViT's decoders (spec: shared/specs/segvit.md, sections 2.2-2.4 and 2.7).

* :class:`ATMCrossAttention`: multi-head cross-attention whose pre-softmax similarity, averaged over the
  heads, is also returned as mask logits (Attention-to-Mask);
* :class:`ATMDecoderLayer`: post-norm decoder layer "self-attention, ATM cross-attention, FFN", no
  positional embeddings;
* :class:`ATMStage`: a stack of ATM layers on one feature map, returning every layer's tokens and masks;
* :class:`TokenProjection`: ``LayerNorm(Linear(tokens))``, the per-stage input projection;
* :class:`QueryUpsampler`: the Shrunk structure's query-based up-sampling (QU): learnable queries on a fixed
  grid decode the backbone features one after the other with standard transformer decoder layers.

Sequence-first layout, as the shared layers of :mod:`qsegformers.decoders.layers`: queries ``Q x B x D``,
memory ``L x B x D``.
"""
import math
from typing import List, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer

__all__ = [
    "ATMCrossAttention",
    "ATMDecoderLayer",
    "ATMStage",
    "TokenProjection",
    "FlattenTokens",
    "TransformerDecoderLayer",
    "QueryUpsampler",
    "resize_like",
    "repeat_tokens",
]

PROJ_INIT_STD = 0.02  # trunc-normal std of the input projections (reference code)


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class ATMCrossAttention(nn.Module):
    """Cross-attention of class tokens on image tokens that also returns its similarity as mask logits.

    ``S_h = (g Wq)_h (F Wk)_h^T / sqrt(d)``; the tokens are updated with ``Dropout(softmax_L(S_h)) (F Wv)_h``
    (heads concatenated, then ``Wo``); the mask logits are ``mean_h S_h``, taken before softmax and dropout.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.ATM.EMBED_DIM {dim} is not divisible by MODEL.ATM.NUM_HEADS {num_heads}")
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        _xavier(self)

    def split_heads(self, x: Tensor) -> Tensor:
        """N x B x D -> B x heads x N x D/heads."""
        n, b, d = x.shape
        return x.reshape(n, b, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)

    def forward(self, query: Tensor, memory: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """query: K x B x D class tokens; memory: L x B x D image tokens.

        Returns:
            out: K x B x D attention output (after ``out_proj``, before the residual);
            mask_logits: B x K x L, head-averaged pre-softmax similarity;
            similarity: B x heads x K x L, the per-head pre-softmax similarity ``S_h``.
        """
        q = self.split_heads(self.q_proj(query))
        k = self.split_heads(self.k_proj(memory))
        v = self.split_heads(self.v_proj(memory))
        similarity = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(similarity.softmax(dim=-1))
        out = (attn @ v).permute(2, 0, 1, 3).flatten(2)  # K x B x D
        return self.out_proj(out), similarity.mean(dim=1), similarity


class ATMDecoderLayer(nn.Module):
    """``g = LN1(g + SA(g))``, ``g = LN2(g + ATM-CA(g, F))``, ``g = LN3(g + FFN(g))``; returns the mask too."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, num_heads, dropout=dropout)
        self.cross_attn = ATMCrossAttention(dim, num_heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFNLayer(dim, ffn_dim, dropout=dropout)

    def forward(self, tokens: Tensor, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """tokens: K x B x D; memory: L x B x D. Returns (K x B x D tokens, B x K x L mask logits)."""
        tokens = self.self_attn(tokens)
        out, mask_logits, _ = self.cross_attn(tokens, memory)
        tokens = self.norm(tokens + self.dropout(out))
        return self.ffn(tokens), mask_logits


class ATMStage(nn.Module):
    """``num_layers`` ATM layers on one token map; every layer's tokens and masks are returned."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"an ATM stage needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(ATMDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, tokens: Tensor, memory: Tensor, grid_hw: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
        """tokens: K x B x D class tokens; memory: (h*w) x B x D image tokens (row-major), grid_hw = (h, w).

        Returns one (K x B x D tokens, B x K x h x w mask logits) pair per layer, first layer first.
        """
        outputs = []
        for layer in self.layers:
            tokens, mask_logits = layer(tokens, memory)
            outputs.append((tokens, mask_logits.unflatten(-1, tuple(grid_hw))))
        return outputs


class TokenProjection(nn.Module):
    """``LayerNorm(Linear(C_in -> D))`` of a B x C_in x h x w map, returned as (h*w) x B x D tokens."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.proj.weight, std=PROJ_INIT_STD)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x.flatten(2).permute(2, 0, 1)))


class FlattenTokens(nn.Module):
    """A B x C x h x w map as (h*w) x B x C tokens, unprojected (``MODEL.ATM.USE_INPUT_PROJ`` False)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).permute(2, 0, 1)


class TransformerDecoderLayer(nn.Module):
    """Standard post-norm decoder layer (self-attention, cross-attention, FFN) without positional embeddings."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, num_heads, dropout=dropout)
        self.cross_attn = CrossAttentionLayer(dim, num_heads, dropout=dropout)
        self.ffn = FFNLayer(dim, ffn_dim, dropout=dropout)

    def forward(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """tokens: Q x B x D; memory: L x B x D -> Q x B x D."""
        return self.ffn(self.cross_attn(self.self_attn(tokens), memory))


class QueryUpsampler(nn.Module):
    """QU: ``gh*gw`` learnable queries decode each input feature in turn; the result is a gh x gw map.

    Stage i projects feature i (``LayerNorm(Linear)``) and runs ``layers_per_stage`` decoder layers with
    the current queries on it, so the output grid is fixed by the query count, whatever the inputs'
    resolutions (SegViT: the 1/16 feature of an early block, then the 1/32 last block).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        layers_per_stage: int,
        grid_hw: Tuple[int, int],
        use_input_proj: bool = True,
    ):
        """``use_input_proj`` False: the features' own tokens are the memory (their width must be ``dim``)."""
        super().__init__()
        self.grid_hw = tuple(grid_hw)
        self.queries = nn.Embedding(self.grid_hw[0] * self.grid_hw[1], dim)
        self.input_proj = nn.ModuleList(
            TokenProjection(c, dim) if use_input_proj else FlattenTokens() for c in in_channels
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(TransformerDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(layers_per_stage))
            for _ in in_channels
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: B x C_i x h_i x w_i, in decoding order. Returns B x D x gh x gw."""
        if len(features) != len(self.stages):
            raise ValueError(f"QueryUpsampler has {len(self.stages)} stages but got {len(features)} features")
        batch = features[0].shape[0]
        tokens = repeat_tokens(self.queries, batch)
        for proj, layers, x in zip(self.input_proj, self.stages, features):
            memory = proj(x)
            for layer in layers:
                tokens = layer(tokens, memory)
        return tokens.permute(1, 2, 0).reshape(batch, -1, *self.grid_hw)


def resize_like(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of B x K x h x w logits to ``size``; identity when equal."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


def repeat_tokens(embedding: nn.Embedding, batch: int) -> Tensor:
    """nn.Embedding(N, D) -> N x B x D (the same learnable tokens for every image)."""
    return embedding.weight.unsqueeze(1).repeat(1, batch, 1)

