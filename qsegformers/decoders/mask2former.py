"""Mask2Former's masked-attention transformer decoder (the baseline every other decoder extends).

Each layer: masked cross-attention of the queries to one feature level (round-robin 1/32, 1/16, 1/8),
then query self-attention, then an FFN. Before the first layer and after each one, the class and mask
heads predict from the current queries, and the predicted masks (threshold on the sigmoid) restrict the
next layer's cross-attention to the foreground of each query.

The forward loop (``decode``) calls small overridable steps, each handed the per-forward
:class:`DecoderState`: ``prepare_memory``, ``prepare_queries``, ``decoder_layer`` (= ``layer_query_pos``,
``cross_attention`` with ``cross_attention_mask`` / ``layer_attention_mask``, self-attention with
``self_attention_mask``, FFN), ``record_prediction`` and ``build_outputs``; the heads
(``forward_prediction_heads``, ``attention_mask``) are pure functions of their inputs. A method changing
one step subclasses this decoder and overrides that step instead of copying the loop, and keeps its own
per-forward data in ``state.method``: MP-Former adds queries, attention-mask rows and a self-attention
mask; FASeg changes the memory, the positional queries and the cross-attention of some layers.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from ..pixel_decoders.position_encoding import PositionEmbeddingSine
from ..registries import TRANSFORMER_DECODER_REGISTRY
from .base import QueryDecoder
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, build_input_projections

__all__ = ["MultiScaleMaskedTransformerDecoder", "Memory", "DecoderState"]

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


@dataclass
class DecoderState:
    """What one forward pass carries from step to step: created by ``forward``, handed to every step,
    never stored on the module.

    mask_features: B x D x H/4 x W/4; targets: the training targets (None at inference);
    memory: the flattened levels (``prepare_memory``); query_pos: Q x B x C positional queries (None: none);
    attn_mask: (B*heads) x Q x (h*w) bool mask of the last prediction for the next layer, True = blocked;
    mask_logits: B x Q x H/4 x W/4 the last predicted mask logits (detached: they steer attention only);
    predictions_class, predictions_mask: every prediction so far, the input queries' first;
    method: a method's own per-forward data (e.g. MP-Former's ``MPBatch``, FASeg's ``FASegState``).
    """

    mask_features: Tensor
    targets: Optional[List[Dict]] = None
    memory: Optional[Memory] = None
    query_pos: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    mask_logits: Optional[Tensor] = None
    predictions_class: List[Tensor] = field(default_factory=list)
    predictions_mask: List[Tensor] = field(default_factory=list)
    method: Any = None


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(QueryDecoder):
    """Masked-attention decoder of Mask2Former.

    Decoder contract: ``forward(features, mask_features, mask=None, targets=None) -> dict`` with
    ``pred_logits`` (B x Q x (K+1), softmax with a no-object class), ``pred_masks`` (B x Q x H/4 x W/4 mask
    logits) and ``aux_outputs`` (the same for every earlier prediction, input queries included).
    """

    class_activation = "softmax"  # softmax over K classes + "no object"
    matcher_name = "HungarianMatcher"  # the matcher this decoder's outputs are trained with
    criterion_name = "SetCriterion"  # the criterion (CRITERION_REGISTRY) that supervises its outputs
    num_feature_levels = NUM_FEATURE_LEVELS  # reads 1/32, 1/16, 1/8 (an instance may read more, e.g. FASeg's HRCA)
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
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            build_input_projections(in_channels, hidden_dim, self.num_feature_levels, enforce_input_project)
        )
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

    def prepare_memory(self, features: List[Tensor], state: DecoderState) -> Memory:
        """features: ``num_feature_levels`` tensors B x C_in x H_l x W_l (coarse to fine) -> Memory."""
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

    def prepare_queries(self, state: DecoderState) -> Tuple[Tensor, Optional[Tensor]]:
        """Return the input queries and their positional embeddings (``state.query_pos``), both Q x B x C."""
        batch_size = state.mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch_size, 1)
        return output, query_pos

    def decoder_layer(self, i: int, output: Tensor, state: DecoderState) -> Tensor:
        """Layer i: cross-attention, self-attention, FFN. output: Q x B x C."""
        query_pos = self.layer_query_pos(i, state)
        output = self.cross_attention(i, output, query_pos, state)
        output = self.transformer_self_attention_layers[i](
            output, tgt_mask=self.self_attention_mask(i, output, state), query_pos=query_pos
        )
        return self.transformer_ffn_layers[i](output)

    def layer_query_pos(self, i: int, state: DecoderState) -> Optional[Tensor]:
        """Positional query of layer i's attentions, Q x B x C (Mask2Former: the learnable ``query_embed``)."""
        return state.query_pos

    def cross_attention(self, i: int, output: Tensor, query_pos: Optional[Tensor], state: DecoderState) -> Tensor:
        """Masked cross-attention of the queries (Q x B x C) to level i mod L."""
        level = i % self.num_feature_levels
        memory = state.memory
        return self.transformer_cross_attention_layers[i](
            output, memory.src[level], memory_mask=self.cross_attention_mask(i, state), pos=memory.pos[level],
            query_pos=query_pos,
        )

    def cross_attention_mask(self, i: int, state: DecoderState) -> Tensor:
        """Layer i's cross-attention mask (B*heads) x Q x (h*w), True = blocked: ``layer_attention_mask``
        with every fully blocked row opened (a query whose mask covers no pixel would attend to nothing: NaN)."""
        attn_mask = self.layer_attention_mask(i, state)
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        return attn_mask

    def layer_attention_mask(self, i: int, state: DecoderState) -> Tensor:
        """Layer i's raw attention mask: the previous prediction's thresholded masks (``state.attn_mask``)."""
        return state.attn_mask

    def self_attention_mask(self, i: int, output: Tensor, state: DecoderState) -> Optional[Tensor]:
        """Query self-attention mask of layer i (Q x Q or (B*heads) x Q x Q, True = blocked); None = all."""
        return None

    def record_prediction(self, output: Tensor, state: DecoderState, attn_mask_target_size: Tuple[int, int]) -> None:
        """Predict from the queries (Q x B x C); append to the state's predictions and set the next layer's
        ``state.attn_mask`` (at ``attn_mask_target_size``) and ``state.mask_logits``."""
        outputs_class, outputs_mask, state.attn_mask = self.forward_prediction_heads(
            output, state.mask_features, attn_mask_target_size
        )
        state.predictions_class.append(outputs_class)
        state.predictions_mask.append(outputs_mask)
        state.mask_logits = outputs_mask.detach()

    def build_outputs(self, state: DecoderState) -> Dict:
        """The output dict of the forward pass (Mask2Former: ``prediction_dict`` of every prediction)."""
        return self.prediction_dict(state.predictions_class, state.predictions_mask)

    # ---- the heads (pure functions of their inputs) ----

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

    @staticmethod
    def prediction_dict(predictions_class: List[Tensor], predictions_mask: List[Tensor]) -> Dict:
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
        return self.decode(features, DecoderState(mask_features=mask_features, targets=targets))

    def decode(self, features: List[Tensor], state: DecoderState) -> Dict:
        """The loop: memory, input queries and their prediction, then per layer a layer and a prediction."""
        state.memory = self.prepare_memory(features, state)
        output, state.query_pos = self.prepare_queries(state)
        self.record_prediction(output, state, state.memory.sizes[0])
        for i in range(self.num_layers):
            output = self.decoder_layer(i, output, state)
            self.record_prediction(output, state, state.memory.sizes[(i + 1) % self.num_feature_levels])
        return self.build_outputs(state)
