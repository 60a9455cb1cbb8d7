"""Pyramid Fusion Transformer (PFT) decoder: three parallel query branches with cross-scale fusion.

Each pyramid level (strides 8, 16, 32) has its own K learnable queries, query k standing for class k
(fixed matching). Every layer updates all branches in parallel (:class:`PFTDecoderLayer`); the only
path between scales is the inter-query attention over the concatenated queries. Each scale predicts a
"class is present" logit and mask logits per query; both are averaged over the scales before the
sigmoid. Spec: shared/specs/pft.md.
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..pixel_decoders.position_encoding import PositionEmbeddingSine
from ..registries import TRANSFORMER_DECODER_REGISTRY
from .base import QueryDecoder
from .layers import build_input_projections
from .pft_layers import PFTDecoderLayer, PFTScaleHead

__all__ = ["PyramidFusionTransformerDecoder", "class_logits_as_query_logits"]

MAX_NUM_SCALES = 3  # the pixel decoders return the 1/32, 1/16 and 1/8 levels
# Logit of "query k shows class c" for c != k: sigmoid gives exactly 0, so sum_q p_q[c] m_q = p_c m_c.
OFF_CLASS_LOGIT = float("-inf")


def class_logits_as_query_logits(class_logits: Tensor) -> Tensor:
    """B x K per-class logits -> B x K x K per-query logits of the sigmoid-head contract.

    Query k scores only class k (diagonal); every other entry is ``OFF_CLASS_LOGIT``, so sigmoid-head
    semantic inference ``sum_q sigmoid(l_q[c]) sigmoid(m_q)`` equals PFT's ``sigmoid(z_c) sigmoid(Z_c)``.
    """
    num_classes = class_logits.shape[-1]
    off = torch.full((num_classes, num_classes), OFF_CLASS_LOGIT, dtype=class_logits.dtype, device=class_logits.device)
    eye = torch.eye(num_classes, dtype=torch.bool, device=class_logits.device)
    return torch.where(eye, torch.diag_embed(class_logits), off)


@TRANSFORMER_DECODER_REGISTRY.register()
class PyramidFusionTransformerDecoder(QueryDecoder):
    """PFT decoder.

    Output dict (the final layer; in training, ``aux_outputs`` holds the same keys for the prediction from
    the input queries, if supervised, and for layers 1..L-1; at inference it is empty):

    * ``pred_logits``: B x K x K per-query class logits of the sigmoid-head contract (query k scores only
      class k, see :func:`class_logits_as_query_logits`); used by the meta-architecture's inference;
    * ``pred_class_logits``: B x K scale-averaged class logits z (apply sigmoid);
    * ``pred_class_logits_per_scale``: S x B x K logits z_s, scales finest first (8, 16, 32);
    * ``pred_masks``: B x K x H/4 x W/4 scale-averaged mask logits;
    * ``pred_masks_per_scale``: S x B x K x H/4 x W/4, only when ``return_masks_per_scale`` is set;
    * ``attn_logits``: per scale B x K x H/s x W/s head-averaged cross-attention logits of the layer
      (training only; None for the input-query prediction and at inference).
    """

    class_activation = "sigmoid"  # one independent "class is present" logit per class
    matcher_name = "FixedMatcher"  # query k <-> class k
    queries_are_classes = True  # pred_logits is diagonal: inference skips the sum over queries
    criterion_name = "PFTCriterion"
    num_feature_levels = MAX_NUM_SCALES  # the 1/32, 1/16, 1/8 levels (MODEL.PFT.NUM_SCALES may use fewer)

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        dropout: float,
        num_scales: int = MAX_NUM_SCALES,
        cross_scale_attention: bool = True,
        iqa_ffn: bool = False,
        ffn_position: str = "after_cross",
        cls_head: str = "shared_linear",
        output_norm: bool = True,
        supervise_input_queries: bool = True,
        enforce_input_project: bool = False,
    ):
        """
        Args:
            in_channels: channels of the multi-scale pixel-decoder features (projected by a 1x1 conv
                when different from hidden_dim, or always with ``enforce_input_project``).
            mask_classification: must be True.
            num_classes: K; also the number of queries per scale.
            hidden_dim: query width C.
            dec_layers: number of decoder layers + 1 (Mask2Former's DEC_LAYERS convention).
            mask_dim: width of the per-pixel mask features.
            dropout: dropout of every attention and FFN sub-layer.
            num_scales: levels used, coarsest first (3: strides 32, 16, 8).
            cross_scale_attention: inter-query attention across scales (off: the branches are independent).
            iqa_ffn: an FFN after the inter-query attention.
            ffn_position: "after_cross" (SA-IQA-CA-FFN) or "after_self" (SA-FFN-IQA-CA).
            cls_head: "shared_linear" (Linear(C, 1) on every query) or "per_class" weights.
            output_norm: LayerNorm on the queries before the heads.
            supervise_input_queries: predict from the input queries too (the first ``aux_outputs`` entry).
            enforce_input_project: a 1x1 conv per scale even when in_channels == hidden_dim
                (MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ, as in Mask2Former).
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("PyramidFusionTransformerDecoder only supports mask classification.")
        if dec_layers < 2:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 2 for PFT (layers + 1), got {dec_layers}.")
        if not 1 <= num_scales <= MAX_NUM_SCALES:
            raise ValueError(f"MODEL.PFT.NUM_SCALES must be in [1, {MAX_NUM_SCALES}], got {num_scales}.")
        self.num_classes = num_classes
        self.num_scales = num_scales
        self.num_layers = dec_layers - 1
        self.supervise_input_queries = supervise_input_queries
        self.return_masks_per_scale = False  # analysis switch: add pred_masks_per_scale to the outputs
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.query_feat = nn.ModuleList(nn.Embedding(num_classes, hidden_dim) for _ in range(num_scales))
        self.query_embed = nn.ModuleList(nn.Embedding(num_classes, hidden_dim) for _ in range(num_scales))
        self.input_proj = nn.ModuleList(
            build_input_projections(in_channels, hidden_dim, num_scales, enforce_input_project)
        )
        self.layers = nn.ModuleList(
            PFTDecoderLayer(
                num_scales=num_scales,
                hidden_dim=hidden_dim,
                nheads=nheads,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                pre_norm=pre_norm,
                cross_scale_attention=cross_scale_attention,
                iqa_ffn=iqa_ffn,
                ffn_position=ffn_position,
            )
            for _ in range(self.num_layers)
        )
        self.heads = nn.ModuleList(
            PFTScaleHead(
                num_classes=num_classes,
                hidden_dim=hidden_dim,
                mask_dim=mask_dim,
                cls_head=cls_head,
                output_norm=output_norm,
            )
            for _ in range(num_scales)
        )

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        mf, pft = cfg.MODEL.MASK_FORMER, cfg.MODEL.PFT
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "dropout": pft.DROPOUT,
            "num_scales": pft.NUM_SCALES,
            "cross_scale_attention": pft.CROSS_SCALE_ATTENTION,
            "iqa_ffn": pft.IQA_FFN,
            "ffn_position": pft.FFN_POSITION,
            "cls_head": pft.CLS_HEAD,
            "output_norm": pft.OUTPUT_NORM,
            "supervise_input_queries": pft.SUPERVISE_INPUT_QUERIES,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        }

    def prepare_memory(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tuple[int, int]]]:
        """features: coarse to fine, B x C_in x H_l x W_l -> per scale (finest first) HW x B x C tokens,
        their sine encodings and the grid sizes (h, w)."""
        if len(features) < self.num_scales:
            raise ValueError(f"PFT decodes {self.num_scales} levels but got {len(features)} features.")
        levels = features[: self.num_scales][::-1]
        src, pos, sizes = [], [], []
        for proj, x in zip(self.input_proj, levels):
            src.append(proj(x).flatten(2).permute(2, 0, 1))
            pos.append(self.pe_layer(x).flatten(2).permute(2, 0, 1))
            sizes.append(tuple(x.shape[-2:]))
        return src, pos, sizes

    def predict(self, queries: List[Tensor], mask_features: Tensor, attn_logits: Optional[List[Tensor]]) -> Dict:
        """Heads of every scale on ``queries`` (per scale K x B x C), averaged over scales as logits."""
        class_logits, mask_logits = zip(*(head(q, mask_features) for head, q in zip(self.heads, queries)))
        class_per_scale = torch.stack(class_logits)
        class_mean = class_per_scale.mean(0)
        out = {
            "pred_logits": class_logits_as_query_logits(class_mean),
            "pred_class_logits": class_mean,
            "pred_class_logits_per_scale": class_per_scale,
            "pred_masks": sum(mask_logits) / len(mask_logits),
            "attn_logits": attn_logits,
        }
        if self.return_masks_per_scale:
            out["pred_masks_per_scale"] = torch.stack(mask_logits)
        return out

    def forward(
        self,
        features: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        targets: Optional[List[Dict]] = None,
    ) -> Dict:
        """features: pixel-decoder levels coarse to fine (B x C_in x H/32.., H/16.., H/8..);
        mask_features: B x D x H/4 x W/4. ``mask`` and ``targets`` are accepted for the contract, unused.

        The auxiliary predictions (only supervised) and the cross-attention logits (only used by the
        attention loss) are computed in training mode only: at inference ``aux_outputs`` is empty.
        """
        src, pos, sizes = self.prepare_memory(features)
        batch_size = mask_features.shape[0]
        queries = [q.weight.unsqueeze(1).repeat(1, batch_size, 1) for q in self.query_feat]
        query_pos = [e.weight.unsqueeze(1).repeat(1, batch_size, 1) for e in self.query_embed]
        predictions = []
        if self.supervise_input_queries and self.training:
            predictions.append(self.predict(queries, mask_features, None))
        for i, layer in enumerate(self.layers):
            queries, attn_logits = layer(queries, query_pos, src, pos, need_attn_logits=self.training)
            if attn_logits is not None:
                attn_logits = [a.unflatten(-1, size) for a, size in zip(attn_logits, sizes)]
            if self.training or i == self.num_layers - 1:
                predictions.append(self.predict(queries, mask_features, attn_logits))
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out
