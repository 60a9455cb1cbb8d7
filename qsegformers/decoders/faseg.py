"""FASeg's transformer decoder: Mask2Former plus dynamic focus-aware positional queries (DFPQ) and
high-resolution cross-attention (HRCA). Spec: shared/specs/dfpq.md.

It subclasses ``MultiScaleMaskedTransformerDecoder`` and overrides steps of its forward loop:
- ``prepare_memory`` reads the 1/4 level too (HRCA) and takes the key positional encodings K_p from the
  pixel decoder (conditional PEG maps) when given;
- ``layer_query_pos`` builds the layer's positional query P_i (from the last predicted masks or the
  previous layer's attention map), used by the cross- and self-attention;
- ``cross_attention`` runs HRCA on the 1/4 level, and on the 1/32, 1/16, 1/8 levels the base masked
  cross-attention, keeping its attention map to prepare P_{i+1} when DFPQ or HRCA's selection needs it.
Per-forward state (K_p, current P, the round's selecting attention) lives in ``FASegState``
(``DecoderState.method``), not in the module.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..registries import TRANSFORMER_DECODER_REGISTRY
from . import faseg_head  # noqa: F401  (registers MaskFormerHeadFASeg)
from .dfpq import (
    POOL_REGIONS,
    QUERY_TYPES,
    attention_pooled_pos,
    build_pos_mlp,
    grid_anchors,
    mask_centres,
    region_pooled_pos,
    sine_embed_points,
)
from .hrca import (
    MAPPINGS,
    SELECTIONS,
    gather_tokens,
    gather_tokens_per_query,
    num_selected_cells,
    per_query_cross_attention,
    select_token_indices,
    selection_scores,
)
from .layers import build_input_projections
from .mask2former import NUM_FEATURE_LEVELS, DecoderState, Memory, MultiScaleMaskedTransformerDecoder

__all__ = [
    "FASegTransformerDecoder", "MultiScaleMaskedTransformerDecoderFASeg", "FASegState",
]

HRCA_LEVEL = NUM_FEATURE_LEVELS  # index of the 1/4 level: after 1/32, 1/16, 1/8
SUPPORTED_HRCA_LEVELS = ["1/4"]
HRCA_QUERY_POS = ("static", "dfpq")


@dataclass
class FASegState:
    """FASeg's part of one forward pass (``DecoderState.method``), carried from layer to layer.

    pos_embeddings: the pixel decoder's key encodings K_p per level, B x C x H_l x W_l (None: sine);
    query_pos: positional query P of the next layer, N x B x C (None before layer 0);
    select_attn: B x N x HW_sel attention of the round's selecting low-resolution layer;
    hrca_indices: the gathered high-resolution token indices of each HRCA layer (B x G x T).
    """

    pos_embeddings: Optional[List[Tensor]] = None
    query_pos: Optional[Tensor] = None
    select_attn: Optional[Tensor] = None
    hrca_indices: List[Tensor] = field(default_factory=list)


@TRANSFORMER_DECODER_REGISTRY.register()
class FASegTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """Masked-attention decoder with DFPQ and HRCA.

    ``forward(features, mask_features, mask=None, targets=None, pos_embeddings=None)``: ``features`` are the
    pixel decoder's levels coarse to fine (3: 1/32, 1/16, 1/8; 4 with HRCA: + 1/4), ``pos_embeddings`` their
    key positional encodings (same shapes, 256 channels); when None, sine encodings are used.
    Outputs follow the Mask2Former contract (``pred_logits``, ``pred_masks``, ``aux_outputs``).
    """

    # First-layer DFPQ pooling region when MODEL.DFPQ.FIRST_LAYER_POOL is "": the paper's foreground (spec 2.5.2).
    default_first_layer_pool = "foreground"

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        dfpq_enabled: bool,
        query_type: str,
        mlp_layers: int,
        share_mlp: bool,
        use_bias: bool,
        first_layer_pool: str,
        first_layer_pool_threshold: float,
        detach_attn: bool,
        attn_mask_threshold: float,
        hrca_enabled: bool,
        omega_rate: int,
        select_from_level: int,
        shared_across_queries: bool,
        mapping: str,
        selection: str,
        hrca_query_pos: str,
        extra_final_low_res_layer: bool,
        **kwargs,
    ):
        """
        Args:
            in_channels, mask_classification, kwargs: as ``MultiScaleMaskedTransformerDecoder``.
            dfpq_enabled: False: the positional query is B (``query_embed``) at every layer, no MLP h.
            query_type: one of ``QUERY_TYPES`` (Table 5).
            mlp_layers, share_mlp: depth of h (``adapt_pos2d``); one h shared by all layers or one per layer.
            use_bias: add B to the input of h.
            first_layer_pool: region of the initial prediction pooled into P_0 (``POOL_REGIONS``).
            first_layer_pool_threshold: foreground = mask probability >= this.
            detach_attn: stop gradients through the attention map A.
            attn_mask_threshold: masked attention attends where mask probability >= this.
            hrca_enabled: add HRCA on the 1/4 level as the 4th layer of each round.
            omega_rate: k_low = floor(HW_sel / omega_rate).
            select_from_level: low-resolution level of the same round whose attention selects the tokens.
            shared_across_queries: one token set per image (sum over queries) or one per query.
            mapping, selection: ``MAPPINGS`` and ``SELECTIONS`` of ``hrca.py``.
            hrca_query_pos: positional query of the HRCA cross-attention: "static" (B) or "dfpq" (P_i).
            extra_final_low_res_layer: with HRCA, the decoder ends with one 1/32 layer after its last round
                (official): the layer count must be rounds * 4 + 1 (True) or rounds * 4 (False). Must be True
                without HRCA, where it means nothing.
        """
        super().__init__(in_channels, mask_classification, **kwargs)
        hidden_dim = self.query_feat.weight.shape[1]
        self._check_choices(query_type, first_layer_pool, mapping, selection, hrca_query_pos, select_from_level)
        self.attn_mask_threshold = attn_mask_threshold
        self.dfpq_enabled = dfpq_enabled and query_type != "learnable"
        self.query_type = query_type
        self.use_bias = use_bias
        self.first_layer_pool = first_layer_pool
        self.first_layer_pool_threshold = first_layer_pool_threshold
        self.detach_attn = detach_attn
        self.hrca_enabled = hrca_enabled
        self.omega_rate = omega_rate
        self.select_from_level = select_from_level
        self.shared_across_queries = shared_across_queries
        self.mapping = mapping
        self.selection = selection
        self.hrca_query_pos = hrca_query_pos
        if not hrca_enabled and not extra_final_low_res_layer:
            raise ValueError(
                "MODEL.HRCA.EXTRA_FINAL_LOW_RES_LAYER = False does nothing with MODEL.HRCA.ENABLED = False: it only "
                "says whether the rounds of 4 layers (1/32, 1/16, 1/8, HRCA) end with one more 1/32 layer; without "
                "HRCA the DEC_LAYERS - 1 layers cycle through 1/32, 1/16, 1/8. Remove the key."
            )
        if hrca_enabled:
            remainder = 1 if extra_final_low_res_layer else 0
            if self.num_layers % (NUM_FEATURE_LEVELS + 1) != remainder:
                rounds = self.num_layers // (NUM_FEATURE_LEVELS + 1)
                raise ValueError(
                    f"MODEL.MASK_FORMER.DEC_LAYERS = {self.num_layers + 1} does not give rounds of 4 layers "
                    f"{'plus one final 1/32 layer' if remainder else 'only'} (MODEL.HRCA.EXTRA_FINAL_LOW_RES_LAYER = "
                    f"{extra_final_low_res_layer}): set DEC_LAYERS = 4 * rounds + {remainder + 1} (e.g. "
                    f"{4 * max(rounds, 1) + remainder + 1}; FASeg uses 14 with True, 13 with False)."
                )
            # Replacing the registered modules keeps their place in the state dict (official order).
            self.num_feature_levels = NUM_FEATURE_LEVELS + 1
            self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
            self.input_proj.extend(build_input_projections(in_channels, hidden_dim, 1, kwargs["enforce_input_project"]))
        if self.dfpq_enabled:
            self.adapt_pos2d = (
                build_pos_mlp(hidden_dim, mlp_layers)
                if share_mlp
                else nn.ModuleList(build_pos_mlp(hidden_dim, mlp_layers) for _ in range(self.num_layers))
            )

    @staticmethod
    def _check_choices(query_type, first_layer_pool, mapping, selection, hrca_query_pos, select_from_level):
        choices = [
            ("MODEL.DFPQ.QUERY_TYPE", query_type, QUERY_TYPES),
            ("MODEL.DFPQ.FIRST_LAYER_POOL", first_layer_pool, POOL_REGIONS),
            ("MODEL.HRCA.MAPPING", mapping, MAPPINGS),
            ("MODEL.HRCA.SELECTION", selection, SELECTIONS),
            ("MODEL.HRCA.QUERY_POS", hrca_query_pos, HRCA_QUERY_POS),
            ("MODEL.HRCA.SELECT_FROM_LEVEL", select_from_level, tuple(range(NUM_FEATURE_LEVELS))),
        ]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{key} = {value!r} is not supported; choose one of {allowed}.")

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        args = super().from_config(cfg, in_channels, mask_classification)
        dfpq, hrca = cfg.MODEL.DFPQ, cfg.MODEL.HRCA
        if list(hrca.LEVELS) != SUPPORTED_HRCA_LEVELS:
            raise ValueError(
                f"MODEL.HRCA.LEVELS = {list(hrca.LEVELS)} is not implemented; only {SUPPORTED_HRCA_LEVELS} is."
            )
        args.update(
            dfpq_enabled=dfpq.ENABLED,
            query_type=dfpq.QUERY_TYPE,
            mlp_layers=dfpq.MLP_LAYERS,
            share_mlp=dfpq.SHARE_MLP,
            use_bias=dfpq.USE_BIAS,
            first_layer_pool=dfpq.FIRST_LAYER_POOL or cls.default_first_layer_pool,
            first_layer_pool_threshold=dfpq.FIRST_LAYER_POOL_THRESHOLD,
            detach_attn=dfpq.DETACH_ATTN,
            attn_mask_threshold=dfpq.ATTN_MASK_THRESHOLD,
            hrca_enabled=hrca.ENABLED,
            omega_rate=hrca.OMEGA_RATE,
            select_from_level=hrca.SELECT_FROM_LEVEL,
            shared_across_queries=hrca.SHARED_ACROSS_QUERIES,
            mapping=hrca.MAPPING,
            selection=hrca.SELECTION,
            hrca_query_pos=hrca.QUERY_POS,
            extra_final_low_res_layer=hrca.EXTRA_FINAL_LOW_RES_LAYER,
        )
        return args

    # ---- overridden steps ----

    def prepare_memory(self, features: List[Tensor], state: DecoderState) -> Memory:
        """features: the levels coarse to fine; key encodings from ``state.method.pos_embeddings`` when given."""
        memory = super().prepare_memory(list(features), state)
        pos_embeddings = state.method.pos_embeddings
        if pos_embeddings is None:
            return memory
        if len(pos_embeddings) < self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} needs {self.num_feature_levels} position maps, got {len(pos_embeddings)}."
            )
        pos = [p.flatten(2).permute(2, 0, 1) for p in pos_embeddings[: self.num_feature_levels]]
        return Memory(src=memory.src, pos=pos, sizes=memory.sizes)

    def cross_attention(self, i: int, output: Tensor, query_pos: Tensor, state: DecoderState) -> Tensor:
        """HRCA on the 1/4 level, else the base masked cross-attention with query P_i (keeping its attention
        map when DFPQ or HRCA's selection uses it). output: N x B x C."""
        level = i % self.num_feature_levels
        if self.hrca_enabled and level == HRCA_LEVEL:
            hrca_pos = state.query_pos if self.hrca_query_pos == "static" else query_pos
            return self.hrca_cross_attention(i, output, hrca_pos, state)
        if not self.needs_attention(level):
            return super().cross_attention(i, output, query_pos, state)
        memory = state.memory
        output, attn = self.transformer_cross_attention_layers[i](
            output, memory.src[level], memory_mask=self.cross_attention_mask(i, state), pos=memory.pos[level],
            query_pos=query_pos, need_weights=True,
        )
        self.after_attention(i, level, attn, state)
        return output

    # ---- DFPQ ----

    def needs_attention(self, level: int) -> bool:
        """Whether the cross-attention map of a layer at ``level`` is used (by DFPQ or HRCA's selection)."""
        dfpq = self.dfpq_enabled and self.query_type == "dfpq"
        select = self.hrca_enabled and self.selection == "topk" and level == self.select_from_level
        return dfpq or select

    def pos_mlp(self, i: int, x: Tensor, bias: Tensor) -> Tensor:
        """P = h_i(x + B): x B x N x C (batch-first), bias N x B x C -> N x B x C."""
        x = x.transpose(0, 1)
        if self.use_bias:
            x = x + bias
        mlp = self.adapt_pos2d if isinstance(self.adapt_pos2d, nn.Sequential) else self.adapt_pos2d[i]
        return mlp(x)

    def layer_query_pos(self, i: int, state: DecoderState) -> Tensor:
        """Positional query P_i of layer i (N x B x C) from the learnable B (``state.query_pos``) and the last
        predicted masks; also stored in ``state.method.query_pos``."""
        bias, fa, memory = state.query_pos, state.method, state.memory
        if not self.dfpq_enabled:
            return bias
        level = i % self.num_feature_levels
        if self.hrca_enabled and level == HRCA_LEVEL:
            return fa.query_pos  # not refreshed by HRCA (official): reuse the 1/8 layer's
        if self.query_type == "dfpq" and i > 0:
            return fa.query_pos  # built from layer i-1's attention in after_attention
        logits = state.mask_logits
        batch = bias.shape[1]
        if self.query_type == "grid_anchor":
            anchors = grid_anchors(bias.shape[0], bias.device)
            x = sine_embed_points(anchors, bias.shape[-1] // 2)[None].expand(batch, -1, -1)
        elif self.query_type == "dynamic_anchor":
            x = sine_embed_points(mask_centres(logits, self.first_layer_pool_threshold), bias.shape[-1] // 2)
        elif self.query_type == "dynamic_foreground":
            x = region_pooled_pos(logits, memory.pos[level], memory.sizes[level],
                                  self.first_layer_pool_threshold, "foreground")
        elif self.first_layer_pool == "none":  # dfpq, layer 0
            x = torch.zeros_like(bias).transpose(0, 1)
        else:
            x = region_pooled_pos(logits, memory.pos[level], memory.sizes[level],
                                  self.first_layer_pool_threshold, self.first_layer_pool)
        fa.query_pos = self.pos_mlp(i, x.to(bias.dtype), bias)
        return fa.query_pos

    def after_attention(self, i: int, level: int, attn: Tensor, state: DecoderState) -> None:
        """attn: B x N x HW_l of layer i. Keep the selecting attention of the round; build
        P_{i+1} = h(A_i K_p + B) (Eq. 2) into ``state.method.query_pos``."""
        fa = state.method
        if level == self.select_from_level:
            fa.select_attn = attn.detach()
        if self.dfpq_enabled and self.query_type == "dfpq" and i + 1 < self.num_layers:
            a = attn.detach() if self.detach_attn else attn
            fa.query_pos = self.pos_mlp(i + 1, attention_pooled_pos(a, state.memory.pos[level]), state.query_pos)

    # ---- HRCA ----

    def hrca_cross_attention(self, i: int, output: Tensor, query_pos: Tensor, state: DecoderState) -> Tensor:
        """Cross-attention of layer i to the selected 1/4 tokens only. output, query_pos: N x B x C."""
        layer = self.transformer_cross_attention_layers[i]
        memory, fa = state.memory, state.method
        src, pos = memory.src[HRCA_LEVEL], memory.pos[HRCA_LEVEL]
        if self.selection == "all":  # vanilla: dense attention over every 1/4 token
            return layer(output, src, pos=pos, query_pos=query_pos)
        low_size = memory.sizes[self.select_from_level]
        hw_low = low_size[0] * low_size[1]
        scores = selection_scores(
            fa.select_attn, output.shape[1], output.shape[0], hw_low,
            selection=self.selection, shared=self.shared_across_queries, device=output.device,
        )
        indices = select_token_indices(
            scores, low_size, memory.sizes[HRCA_LEVEL], num_selected_cells(hw_low, self.omega_rate), self.mapping
        )
        fa.hrca_indices.append(indices)
        if self.shared_across_queries:
            idx = indices[:, 0]
            return layer(output, gather_tokens(src, idx), pos=gather_tokens(pos, idx), query_pos=query_pos)
        return per_query_cross_attention(
            layer, output, gather_tokens_per_query(src, indices), gather_tokens_per_query(pos, indices), query_pos
        )

    def forward(
        self,
        features: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        targets: Optional[List[Dict]] = None,
        pos_embeddings: Optional[List[Tensor]] = None,
    ) -> Dict:
        """features: levels B x C_in x H_l x W_l coarse to fine; pos_embeddings: their K_p maps B x C x H_l x W_l
        (None: sine); mask_features: B x D x H/4 x W/4. Returns the Mask2Former output dict."""
        state = DecoderState(mask_features=mask_features, targets=targets, method=FASegState(pos_embeddings))
        return self.decode(features, state)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderFASeg(FASegTransformerDecoder):
    """The official FASeg registry name of ``FASegTransformerDecoder`` (so its configs build).

    Official configs and checkpoints must give the official model, whose first-layer DFPQ pools the key
    encodings over the predicted *background* (sigmoid < 0.5); MODEL.DFPQ.FIRST_LAYER_POOL = "" therefore
    means "background" under this name (an explicit value still wins).
    """

    default_first_layer_pool = "background"
