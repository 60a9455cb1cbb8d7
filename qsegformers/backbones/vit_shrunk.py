"""``D2ShrunkViT``: SegViT's Shrunk backbone, a plain ViT whose token grid is halved by query-based
down-sampling (QD) inside one block (spec: shared/specs/segvit.md, section 2.7).

Block ``qd_block`` (0-based) attends with down-sampled queries to the full-resolution tokens and keeps the
down-sampled tokens on its residual path, so the grid goes from 1/P to 1/(2P) without new parameters
(method "nearest_q"):

    q = cls + x[:, :, ::2, ::2];   y = q + Attn(LN1(q), LN1(x), LN1(x));   y = y + MLP(LN2(y))

The pretrained block weights are reused unchanged; every later block runs on a quarter of the tokens.
Ablations (Table 7): "nearest_qkv" down-samples queries, keys and values (the block then runs as usual on
the down-sampled tokens); "conv_q" computes the queries with a learnable stride-2 3x3 convolution.
Only :meth:`D2ViT.forward_block` is overridden; the class token is kept (never down-sampled).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .vit import NUM_PREFIX_TOKENS, Attention, Block, D2ViT

__all__ = ["D2ShrunkViT", "QD_METHODS", "downsample_queries", "query_downsampled_block"]

QD_METHODS = ("nearest_q", "nearest_qkv", "conv_q")
QD_FACTOR = 2  # QD halves each side of the token grid
QD_CONV_KERNEL = 3  # "conv_q": 3x3, stride 2, padding 1 gives the same ceil(h/2) grid as nearest


def _cross_attention(attn: Attention, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of ``query`` (B x Nq x D) on ``memory`` (B x N x D) with the block's fused qkv
    weights (q from the first third, k and v from the rest). Equals ``attn(query)`` when memory is query."""
    batch, num_q, dim = query.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(query, weight[:dim], None if bias is None else bias[:dim])
    kv = F.linear(memory, weight[dim:], None if bias is None else bias[dim:])
    q = q.reshape(batch, num_q, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, memory.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(out.transpose(1, 2).reshape(batch, num_q, dim))


def downsample_queries(
    tokens: torch.Tensor, grid_hw: Tuple[int, int], conv: Optional[nn.Module] = None
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """B x (1 + h*w) x D tokens -> (B x (1 + h'*w') x D query tokens, (h', w')), h' = ceil(h/2).

    The grid is ``x[:, :, ::2, ::2]`` (top-left token of every 2x2 cell) or, with ``conv``, ``conv(x)``.
    The class token is kept unchanged.
    """
    prefix, grid = tokens[:, :NUM_PREFIX_TOKENS], tokens[:, NUM_PREFIX_TOKENS:]
    grid = grid.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid_hw)
    grid = conv(grid) if conv is not None else grid[:, :, ::QD_FACTOR, ::QD_FACTOR]
    new_hw = (grid.shape[-2], grid.shape[-1])
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1), new_hw


def query_downsampled_block(block: Block, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """One pre-norm ViT block whose attention queries (and residual) are ``query`` and whose keys/values
    are ``memory``: ``y = q + Attn(LN1 q, LN1 m)``, ``y + MLP(LN2 y)``. B x Nq x D, B x N x D -> B x Nq x D."""
    y = query + block.drop_path(_cross_attention(block.attn, block.norm1(query), block.norm1(memory)))
    return y + block.drop_path(block.mlp(block.norm2(y)))


@BACKBONE_REGISTRY.register()
class D2ShrunkViT(D2ViT):
    """D2ViT with QD in block ``qd_block``: outputs of blocks after it are at stride 2P."""

    @configurable
    def __init__(self, *, qd_block: int, qd_method: str = "nearest_q", **kwargs):
        """
        Args:
            qd_block: 0-based index of the block doing QD (SegViT ViT-L: 8, i.e. the 9th block).
            qd_method: "nearest_q", "nearest_qkv" or "conv_q".
            kwargs: the arguments of :class:`D2ViT`.
        """
        super().__init__(**kwargs)
        if qd_method not in QD_METHODS:
            raise ValueError(f"MODEL.SHRUNK.QD_METHOD must be one of {QD_METHODS}, got {qd_method!r}")
        if not 0 <= qd_block < len(self.blocks):
            raise ValueError(
                f"MODEL.SHRUNK.QD_BLOCK = {qd_block} must be a 0-based index of a built block "
                f"(0..{len(self.blocks) - 1}, up to the deepest of MODEL.VIT.OUT_BLOCKS)"
            )
        self.qd_block = qd_block
        self.qd_method = qd_method
        dim = self.pos_embed.shape[-1]
        self.qd_conv = (
            nn.Conv2d(dim, dim, QD_CONV_KERNEL, stride=QD_FACTOR, padding=QD_CONV_KERNEL // 2)
            if qd_method == "conv_q"
            else None
        )
        for name in self._out_features:
            if int(name[len("blk"):]) > qd_block:  # 1-based block number > 0-based QD index: after QD
                self._out_feature_strides[name] = self.patch_size * QD_FACTOR

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        args = super().from_config(cfg, input_shape)
        args.update(qd_block=cfg.MODEL.SHRUNK.QD_BLOCK, qd_method=cfg.MODEL.SHRUNK.QD_METHOD)
        return args

    @property
    def size_divisibility(self) -> int:
        return self.patch_size * QD_FACTOR

    def forward_block(
        self, index: int, tokens: torch.Tensor, grid_hw: Tuple[int, int]
    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Block ``index`` as in D2ViT, except the QD block, which returns the halved grid."""
        if index != self.qd_block:
            return super().forward_block(index, tokens, grid_hw)
        block = self.blocks[index]
        query, new_hw = downsample_queries(tokens, grid_hw, self.qd_conv)
        if self.qd_method == "nearest_qkv":
            return block(query), new_hw
        return query_downsampled_block(block, query, tokens), new_hw
