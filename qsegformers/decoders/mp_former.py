"""MP-Former: mask-piloted training of the Mask2Former decoder (spec: shared/specs/mpformer.md).

In training, P = G * T_max mask-piloted (MP) queries run through the same decoder in front of the N
matching queries: slot ``g * T_max + j`` of image b stands for its GT segment j (padding when j >= T_b).
Its content is the (label-noised) class embedding ``label_enc[y]``; its masked cross-attention uses the
noised GT mask of segment j at the layer's resolution instead of its own predicted mask; a
self-attention mask keeps the matching queries from seeing any MP slot and the MP groups from seeing
each other. The MP predictions come back under ``mp_outputs`` and are supervised by
:class:`qsegformers.losses.mp_criterion.MPCriterion` without matching. In evaluation (or with MP
disabled) the decoder is Mask2Former's.

The MP part of one forward pass (slots, noised labels, pilot-mask cache) is an :class:`MPBatch` kept in
the loop's ``DecoderState.method``; the module holds no per-forward state.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..registries import TRANSFORMER_DECODER_REGISTRY
from .mask2former import DecoderState, Memory, MultiScaleMaskedTransformerDecoder
from .mp_config import mp_options
from .mp_noise import downsample_gt, geometric_noise, label_noise, point_noise, resize_nearest

__all__ = [
    "MPMaskedTransformerDecoder",
    "MultiScaleMaskedTransformerDecoderMaskDN",
    "MPBatch",
    "mp_self_attention_mask",
]

# The only mask noise drawn per layer: shift/scale noise is drawn once per step and shared by every layer.
PER_LAYER_NOISE = "point"


def mp_self_attention_mask(num_groups: int, max_targets: int, num_queries: int, device=None) -> Tensor:
    """(P+N) x (P+N) bool self-attention mask, True = blocked, P = num_groups * max_targets.

    Matching queries (rows P:) see no MP slot; an MP slot sees its own group and every matching query.
    """
    num_slots = num_groups * max_targets
    mask = torch.zeros(num_slots + num_queries, num_slots + num_queries, dtype=torch.bool, device=device)
    mask[num_slots:, :num_slots] = True
    group = torch.arange(num_slots, device=device) // max(max_targets, 1)
    mask[:num_slots, :num_slots] = group[:, None] != group[None, :]
    return mask


@dataclass
class MPBatch:
    """The MP part of one training step.

    masks: per image T_b x H x W clean GT masks; slot_target: P, GT index j of each slot;
    valid: B x P, True for real (non-padding) slots; labels: B x P noised labels (0 on padding);
    self_attn_mask: (P+N) x (P+N); cache: per-step pilot masks (clean per level, geometric noise).
    """

    num_groups: int
    max_targets: int
    masks: List[Tensor]
    slot_target: Tensor
    valid: Tensor
    labels: Tensor
    self_attn_mask: Tensor
    cache: Dict = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.max_targets


@TRANSFORMER_DECODER_REGISTRY.register()
class MPMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """Mask2Former decoder with mask-piloted training.

    Training outputs add ``mp_outputs``: {"pred_logits": B x P x (K+1), "pred_masks": B x P x H/4 x W/4,
    "aux_outputs": the earlier predictions, "num_groups": G, "max_targets": T_max} (absent when the
    batch has no GT segment). ``pred_logits``/``pred_masks``/``aux_outputs`` are the matching part only.
    """

    criterion_name = "MPCriterion"

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        mp_enabled: bool = True,
        mp_num_queries: int = 100,
        mp_num_groups: int = 0,
        mp_layers: int = -1,
        mask_noise: str = "point",
        point_noise_ratio: float = 0.2,
        point_noise_mode: str = "uniform_count",
        shift_noise_scale: float = 0.2,
        scale_noise_scale: float = 0.2,
        noise_per_layer: bool = True,
        per_head_noise: bool = False,
        gt_downsample: str = "area_any",
        label_guided: bool = True,
        label_noise_ratio: float = 0.2,
        mp_query_pos: str = "zeros",
        drop_query_pos: bool = False,
        **kwargs,
    ):
        """
        Args (besides those of :class:`MultiScaleMaskedTransformerDecoder`, passed in ``kwargs``):
            mp_enabled: add the MP part in training.
            mp_num_queries: MP slot budget, G = max(1, mp_num_queries // T_max) (when mp_num_groups is 0).
            mp_num_groups: > 0: fixed G.
            mp_layers: -1 pilots every layer; n pilots layers 0..n-1 only.
            mask_noise: "none", "point", "shift", "scale" or "shift_scale".
            point_noise_ratio, point_noise_mode: see :func:`~qsegformers.decoders.mp_noise.point_noise`.
            shift_noise_scale, scale_noise_scale: see :func:`~qsegformers.decoders.mp_noise.geometric_noise`.
            noise_per_layer: fresh point noise at every layer (False: one draw per level per step). Only
                point noise has per-layer draws, so False with any other ``mask_noise`` is rejected.
            per_head_noise: independent point noise for every attention head.
            gt_downsample: see :func:`~qsegformers.decoders.mp_noise.downsample_gt`.
            label_guided: content of an MP slot = ``label_enc`` of its (noised) class (False: zeros).
            label_noise_ratio: probability of a random class.
            mp_query_pos: positional query of MP slots, "zeros" or "learned" (one shared embedding).
            drop_query_pos: no ``query_embed`` at all (the official fork's decoder).
        """
        if not noise_per_layer and mask_noise != PER_LAYER_NOISE:
            raise ValueError(
                f"MODEL.MP.NOISE_PER_LAYER = False has no effect with MODEL.MP.MASK_NOISE = {mask_noise!r}: only "
                f"{PER_LAYER_NOISE!r} noise is drawn per layer (shift/scale noise is drawn once per step on the "
                "finest level and shared by every layer, as in the official code; 'none' draws nothing). Remove "
                "MODEL.MP.NOISE_PER_LAYER or use MODEL.MP.MASK_NOISE = 'point'."
            )
        super().__init__(in_channels, mask_classification, **kwargs)
        hidden_dim = kwargs["hidden_dim"]
        if drop_query_pos:
            self.query_embed = None  # no positional queries anywhere, also at inference
        self.label_enc = nn.Embedding(self.num_classes, hidden_dim)  # class -> MP content query
        use_learned_pos = mp_query_pos == "learned" and not drop_query_pos
        self.mp_query_embed = nn.Embedding(1, hidden_dim) if use_learned_pos else None
        self.mp_enabled = mp_enabled
        self.mp_num_queries = mp_num_queries
        self.mp_num_groups = mp_num_groups
        self.mp_layers = mp_layers
        self.mask_noise = mask_noise
        self.point_noise_ratio = point_noise_ratio
        self.point_noise_mode = point_noise_mode
        self.shift_noise_scale = shift_noise_scale
        self.scale_noise_scale = scale_noise_scale
        self.noise_per_layer = noise_per_layer
        self.per_head_noise = per_head_noise
        self.gt_downsample = gt_downsample
        self.label_guided = label_guided
        self.label_noise_ratio = label_noise_ratio

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        ret = super().from_config(cfg, in_channels, mask_classification)
        opts = mp_options(cfg)
        ret.update(
            mp_enabled=opts["enabled"],
            mp_num_queries=opts["num_queries"],
            mp_num_groups=opts["num_groups"],
            mp_layers=opts["layers"],
            mask_noise=opts["mask_noise"],
            point_noise_ratio=opts["point_noise_ratio"],
            point_noise_mode=opts["point_noise_mode"],
            shift_noise_scale=opts["shift_noise_scale"],
            scale_noise_scale=opts["scale_noise_scale"],
            noise_per_layer=opts["noise_per_layer"],
            per_head_noise=opts["per_head_noise"],
            gt_downsample=opts["gt_downsample"],
            label_guided=opts["label_guided"],
            label_noise_ratio=opts["label_noise_ratio"],
            mp_query_pos=opts["query_pos"],
            drop_query_pos=opts["drop_query_pos"],
        )
        return ret

    # ---- the MP part of one step ----

    def num_groups_for(self, max_targets: int) -> int:
        """G for a batch whose largest GT count is ``max_targets`` (> 0)."""
        if self.mp_num_groups > 0:
            return self.mp_num_groups
        return max(1, self.mp_num_queries // max_targets)

    def build_mp_batch(self, targets: List[Dict], device) -> Optional[MPBatch]:
        """Slots, noised labels and the self-attention mask of this step; None when no image has a GT."""
        counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
        max_targets = int(counts.max()) if counts.numel() else 0
        if max_targets == 0:
            return None
        num_groups = self.num_groups_for(max_targets)
        slot_target = torch.arange(num_groups * max_targets, device=device) % max_targets
        valid = slot_target[None] < counts[:, None]
        labels = torch.zeros(len(targets), max_targets, dtype=torch.int64, device=device)
        for b, t in enumerate(targets):
            labels[b, : len(t["labels"])] = t["labels"].to(device)
        labels = label_noise(labels[:, slot_target], self.label_noise_ratio, self.num_classes)
        return MPBatch(
            num_groups=num_groups,
            max_targets=max_targets,
            masks=[t["masks"] for t in targets],
            slot_target=slot_target,
            valid=valid,
            labels=torch.where(valid, labels, torch.zeros_like(labels)),
            self_attn_mask=mp_self_attention_mask(num_groups, max_targets, self.num_queries, device),
        )

    def mp_content(self, mp: MPBatch, like: Tensor) -> Tensor:
        """P x B x C content queries: label embeddings of real slots, zeros on padding."""
        if not self.label_guided:
            return like.new_zeros(mp.num_slots, mp.valid.shape[0], like.shape[-1])
        content = self.label_enc(mp.labels) * mp.valid[..., None].to(like.dtype)
        return content.transpose(0, 1)

    def clean_pilots(self, mp: MPBatch, size: Tuple[int, int]) -> Tensor:
        """B x P x h x w bool clean GT masks of the slots at ``size`` (padding slots empty), cached per size."""
        key = ("clean", size)
        if key not in mp.cache:
            per_image = []
            for masks in mp.masks:
                small = downsample_gt(masks, size, self.gt_downsample)
                pad = small.new_zeros((mp.max_targets - small.shape[0], *size))
                per_image.append(torch.cat([small, pad]))
            slots = torch.stack(per_image)[:, mp.slot_target.to(per_image[0].device)]
            mp.cache[key] = slots & mp.valid.to(slots.device)[..., None, None]
        return mp.cache[key]

    def geometric_pilots(self, mp: MPBatch, size: Tuple[int, int], memory: Memory) -> Tensor:
        """B x P x h x w shifted/scaled pilots: drawn once per step on the finest level, resized by nearest."""
        finest = max(memory.sizes, key=lambda s: s[0] * s[1])
        if "geometric" not in mp.cache:
            clean = self.clean_pilots(mp, finest)
            shift = self.shift_noise_scale if "shift" in self.mask_noise else 0.0
            scale = self.scale_noise_scale if "scale" in self.mask_noise else 0.0
            mp.cache["geometric"] = geometric_noise(clean.flatten(0, 1), shift, scale).view_as(clean)
        fine = mp.cache["geometric"]
        return fine if tuple(size) == tuple(finest) else resize_nearest(fine, size)

    def pilot_masks(self, mp: MPBatch, level: int, memory: Memory) -> Tensor:
        """Noised pilot masks of level ``level``: B x P x h x w, or B x heads x P x h x w with per-head noise."""
        size = memory.sizes[level]
        if self.mask_noise in ("shift", "scale", "shift_scale"):
            return self.geometric_pilots(mp, size, memory)
        clean = self.clean_pilots(mp, size)
        if self.mask_noise == "none":
            return clean
        key = ("point", level)
        if not self.noise_per_layer and key in mp.cache:
            return mp.cache[key]
        if self.per_head_noise:
            clean = clean[:, None].expand(-1, self.num_heads, -1, -1, -1)
        noised = point_noise(clean, self.point_noise_ratio, self.point_noise_mode)
        valid = mp.valid.to(noised.device)[..., None, None]
        noised = noised & (valid[:, None] if self.per_head_noise else valid)
        mp.cache[key] = noised
        return noised

    def pilots_layer(self, i: int) -> bool:
        return self.mp_layers < 0 or i < self.mp_layers

    # ---- overridden steps of the base loop ----

    def prepare_queries(self, state: DecoderState) -> Tuple[Tensor, Optional[Tensor]]:
        """[P MP slots ; N matching queries] x B x C and their positional queries (None when dropped);
        sets ``state.method`` to the step's :class:`MPBatch` in training with GT segments."""
        batch_size = state.mask_features.shape[0]
        if self.query_embed is None:
            output, query_pos = self.query_feat.weight.unsqueeze(1).repeat(1, batch_size, 1), None
        else:
            output, query_pos = super().prepare_queries(state)
        if not self.training:
            return output, query_pos
        # Zero-weighted use of the MP-only parameters: DDP then sees them used in every step.
        output = output + self.mp_parameters_touch()
        if not self.mp_enabled or state.targets is None:
            return output, query_pos
        mp = self.build_mp_batch(state.targets, output.device)
        if mp is None:
            return output, query_pos
        state.method = mp
        output = torch.cat([self.mp_content(mp, output), output])
        if query_pos is not None:
            if self.mp_query_embed is None:
                mp_pos = query_pos.new_zeros(mp.num_slots, batch_size, query_pos.shape[-1])
            else:
                mp_pos = self.mp_query_embed.weight[None].expand(mp.num_slots, batch_size, -1)
            query_pos = torch.cat([mp_pos, query_pos])
        return output, query_pos

    def mp_parameters_touch(self) -> Tensor:
        """0 * (sum of the MP-only parameters): a scalar that leaves values unchanged."""
        total = self.label_enc.weight.sum()
        if self.mp_query_embed is not None:
            total = total + self.mp_query_embed.weight.sum()
        return total * 0.0

    def layer_attention_mask(self, i: int, state: DecoderState) -> Tensor:
        """The base mask with its MP rows replaced by the noised pilot masks (on piloted layers)."""
        attn_mask = super().layer_attention_mask(i, state)
        mp = state.method
        if mp is not None and self.pilots_layer(i):
            blocked = ~self.pilot_masks(mp, i % self.num_feature_levels, state.memory).flatten(-2)
            batch = blocked.shape[0]
            if blocked.dim() == 3:  # the same pilot for every head
                blocked = blocked[:, None]
            rows = attn_mask.view(batch, self.num_heads, attn_mask.shape[1], attn_mask.shape[2])
            rows[:, :, : mp.num_slots] = blocked
        return attn_mask

    def self_attention_mask(self, i: int, output: Tensor, state: DecoderState) -> Optional[Tensor]:
        return None if state.method is None else state.method.self_attn_mask

    def build_outputs(self, state: DecoderState) -> Dict:
        """Matching part as the base outputs; the MP part under ``mp_outputs``."""
        mp = state.method
        if mp is None:
            return super().build_outputs(state)
        p = mp.num_slots
        classes, masks = state.predictions_class, state.predictions_mask
        out = self.prediction_dict([c[:, p:] for c in classes], [m[:, p:] for m in masks])
        mp_out = self.prediction_dict([c[:, :p] for c in classes], [m[:, :p] for m in masks])
        mp_out.update(num_groups=mp.num_groups, max_targets=mp.max_targets)
        out["mp_outputs"] = mp_out
        return out


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderMaskDN(MPMaskedTransformerDecoder):
    """The official MP-Former fork's decoder name: :class:`MPMaskedTransformerDecoder` without positional
    queries (no ``query_embed``, as in the fork's checkpoints), configured by the same keys; the fork's
    own keys (``MODEL.DN.*``, ``MODEL.MASK_FORMER.*DN*``) apply through :func:`mp_options`."""

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification=True):
        ret = super().from_config(cfg, in_channels, mask_classification)
        ret["drop_query_pos"] = True
        return ret
