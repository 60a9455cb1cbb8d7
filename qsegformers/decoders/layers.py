"""Transformer building blocks shared by every query decoder.

Sequence-first layout throughout (as ``nn.MultiheadAttention`` defaults): queries ``Q x B x C``,
memory ``S x B x C``. Parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
``norm``) follow the official Mask2Former modules so their checkpoints load.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import Tensor, nn

__all__ = [
    "SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MLP", "get_activation_fn", "build_input_projections",
]


def with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def get_activation_fn(name: str):
    """Return the activation function called ``name`` ("relu", "gelu" or "glu")."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation should be one of {sorted(table)}, not {name!r}")
    return table[name]


def build_input_projections(in_channels: int, hidden_dim: int, num_levels: int, enforce: bool) -> List[nn.Module]:
    """One module per level mapping B x in_channels x H x W features to B x hidden_dim x H x W.

    A 1x1 conv (Kaiming-uniform with a=1, zero bias, as the official decoder) when the widths differ or
    ``enforce`` (MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ) is set; otherwise a parameter-free identity.
    Built in level order, so parameter names (``input_proj.<l>``) and the random init order are fixed.
    """
    projections = []
    for _ in range(num_levels):
        if in_channels != hidden_dim or enforce:
            proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            nn.init.kaiming_uniform_(proj.weight, a=1)
            nn.init.zeros_(proj.bias)
            projections.append(proj)
        else:
            projections.append(nn.Sequential())
    return projections


def _init_xavier(module: nn.Module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Query self-attention with a residual connection and LayerNorm (post- or pre-norm)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _init_xavier(self)

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt, query_pos: Q x B x C; tgt_mask: (B*heads) x Q x Q or Q x Q, True = blocked."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = with_pos(x, query_pos)
        out = self.self_attn(q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attending to image features, with a residual connection and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _init_xavier(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        need_weights: bool = False,
    ):
        """tgt, query_pos: Q x B x C; memory, pos: S x B x C; memory_mask: (B*heads) x Q x S, True = blocked.

        Returns tgt (Q x B x C), or (tgt, head-averaged attention weights B x Q x S) when need_weights.
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        out, weights = self.multihead_attn(
            query=with_pos(x, query_pos),
            key=with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            need_weights=need_weights,
        )
        tgt = tgt + self.dropout(out)
        tgt = tgt if self.normalize_before else self.norm(tgt)
        return (tgt, weights) if need_weights else tgt


class FFNLayer(nn.Module):
    """Two-layer feed-forward block with a residual connection and LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before
        _init_xavier(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: Q x B x C -> Q x B x C."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """x: ... x input_dim -> ... x output_dim."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
