"""Mask2Former's masked-attention transformer decoder (the baseline every other decoder extends).

Each layer: masked cross-attention of the queries to one feature level (round-robin 1/32, 1/16, 1/8),
then query self-attention, then an FFN. Before the first layer and after each one, the class and mask
heads predict from the current queries, and the predicted masks (threshold on the sigmoid) restrict the
next layer's cross-attention to the foreground of each query.

The forward loop calls small overridable steps (``prepare_memory``, ``prepare_queries``,
``decoder_layer``, ``self_attention_mask``, ``forward_prediction_heads``, ``attention_mask``,
``build_outputs``) so that a method changing one step subclasses this decoder instead of copying the
loop: MP-Former adds queries and a self-attention mask, FASeg changes the positional queries and the
cross-attention of some layers.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import Tensor, nn

from ..pixel_decoders.position_encoding import PositionEmbeddingSine
from ..registries import TRANSFORMER_DECODER_REGISTRY
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer

__all__ = ["MultiScaleMaskedTransformerDecoder", "Memory"]

NUM_FEATURE_LEVELS = 3  # the decoder reads the 1/32, 1/16 and 1/8 pixel-decoder outputs
MASK_EMBED_LAYERS = 3  # depth of the MLP that turns queries into mask embeddings


@dataclass
class Memory:
    """Flattened image features of every level the decoder attends to.

    src[l], pos[l]: (H_l*W_l) x B x C features (+ level embedding) and sine positional encodings;
    sizes[l]: (H_l, W_l).
    """

    src: List[Tensor]
    pos: List[Tensor]
    sizes: List[Tuple[int, int]]


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder of Mask2Former.

    Decoder contract: ``forward(features, mask_features, mask=None, targets=None) -> dict`` with
    ``pred_logits`` (B x Q x (K+1), softmax with a no-object class), ``pred_masks`` (B x Q x H/4 x W/4 mask
    logits) and ``aux_outputs`` (the same for every earlier prediction, input queries included).
    """

    class_activation = "softmax"  # softmax over K classes + "no object"
    matcher_name = "HungarianMatcher"  # the matcher this decoder's outputs are trained with
    criterion_name = "SetCriterion"  # the criterion (CRITERION_REGISTRY) that supervises its outputs
    attn_mask_threshold = 0.5  # a pixel is attended when the predicted mask probability is >= this

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
    ):
        """
        Args:
            in_channels: channels of the multi-scale pixel-decoder features.
            mask_classification: must be True (Mask2Former always classifies masks).
            num_classes: K, number of categories (without "no object").
            hidden_dim: query width C.
            num_queries: Q.
            dec_layers: number of predictions, i.e. attention layers + 1 (the input queries' prediction).
            mask_dim: width of the per-pixel mask features.
            enforce_input_project: add a 1x1 projection even when in_channels == hidden_dim.
            dropout: dropout of the attention and FFN layers (0 in the official decoder).
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification.")
        if dec_layers < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {dec_layers}.")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers - 1
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            for _ in range(self.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            for _ in range(self.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)
            for _ in range(self.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positional embeddings
        self.num_feature_levels = NUM_FEATURE_LEVELS
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())
        self.num_classes = num_classes
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, MASK_EMBED_LAYERS)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            # The official decoder uses no dropout; MODEL.MASK_FORMER.DROPOUT is the pixel decoder's.
            "dropout": 0.0,
        }

    # ---- the steps of the forward loop (override one to change one step) ----

    def prepare_memory(self, features: List[Tensor]) -> Memory:
        """features: NUM_FEATURE_LEVELS tensors B x C_in x H_l x W_l (coarse to fine) -> Memory."""
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_feature_levels} feature levels, got {len(features)}."
            )
        src, pos, sizes = [], [], []
        for i, x in enumerate(features):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).permute(2, 0, 1))
            level = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))
        return Memory(src=src, pos=pos, sizes=sizes)

    def prepare_queries(
        self, batch_size: int, targets: Optional[List[Dict]] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Return the input queries and their positional embeddings, both Q x B x C."""
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch_size, 1)
        return output, query_pos

    def decoder_layer(
        self, i: int, output: Tensor, query_pos: Optional[Tensor], attn_mask: Tensor, memory: Memory
    ) -> Tensor:
        """Layer i: masked cross-attention to level i mod L, self-attention, FFN. output: Q x B x C."""
        level = i % self.num_feature_levels
        # A query whose mask covers no pixel would attend to nothing (NaN): let it see everything.
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        output = self.transformer_cross_attention_layers[i](
            output, memory.src[level], memory_mask=attn_mask, pos=memory.pos[level], query_pos=query_pos
        )
        output = self.transformer_self_attention_layers[i](
            output, tgt_mask=self.self_attention_mask(i, output), query_pos=query_pos
        )
        return self.transformer_ffn_layers[i](output)

    def self_attention_mask(self, i: int, output: Tensor) -> Optional[Tensor]:
        """Query self-attention mask of layer i (Q x Q or (B*heads) x Q x Q, True = blocked); None = all."""
        return None

    def forward_prediction_heads(
        self, output: Tensor, mask_features: Tensor, attn_mask_target_size: Tuple[int, int]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """output: Q x B x C; mask_features: B x D x H x W.

        Returns class logits B x Q x (K+1), mask logits B x Q x H x W, and the next layer's attention
        mask (B*heads) x Q x (h*w) at ``attn_mask_target_size``, True where attention is blocked.
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return outputs_class, outputs_mask, self.attention_mask(outputs_mask, attn_mask_target_size)

    def attention_mask(self, outputs_mask: Tensor, target_size: Tuple[int, int]) -> Tensor:
        """Mask logits B x Q x H x W -> (B*heads) x Q x (h*w) bool, True = not attended."""
        m = F.interpolate(outputs_mask, size=target_size, mode="bilinear", align_corners=False)
        blocked = m.sigmoid().flatten(2) < self.attn_mask_threshold
        return blocked.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1).detach()

    def build_outputs(self, predictions_class: List[Tensor], predictions_mask: List[Tensor]) -> Dict:
        """The last prediction as ``pred_logits``/``pred_masks``, the earlier ones as ``aux_outputs``."""
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }

    def forward(
        self,
        features: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        targets: Optional[List[Dict]] = None,
    ) -> Dict:
        """features: 3 tensors B x C_in x H_l x W_l (1/32, 1/16, 1/8); mask_features: B x D x H/4 x W/4.

        ``mask`` (padding mask) is accepted for the contract and unused, as in the official decoder;
        ``targets`` are only read by training-time extensions (e.g. mask-piloted queries).
        """
        memory = self.prepare_memory(features)
        output, query_pos = self.prepare_queries(mask_features.shape[0], targets)
        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, memory.sizes[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            output = self.decoder_layer(i, output, query_pos, attn_mask, memory)
            next_size = memory.sizes[(i + 1) % self.num_feature_levels]
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features, next_size)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return self.build_outputs(predictions_class, predictions_mask)
