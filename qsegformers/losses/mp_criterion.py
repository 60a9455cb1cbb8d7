"""MP-Former's criterion: Mask2Former's matched losses plus the losses of the mask-piloted (MP) part
(spec: shared/specs/mpformer.md, section 3.1).

MP slot ``g * T_max + j`` of image b is supervised by GT segment j of image b for every group g and
every prediction (hard assignment, no matching): class target = the clean label, mask target = the
clean GT mask, with the same CE / point-sampled BCE / dice terms as the matched part, normalised by
``num_masks * G``. Padding slots (j >= T_b) get the no-object class and no mask loss. Keys:
``loss_ce_mp``, ``loss_mask_mp``, ``loss_dice_mp`` and ``<key>_<i>`` for the aux outputs.
"""
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..decoders.mp_config import mp_options
from ..registries import CRITERION_REGISTRY
from .criterion import BASE_LOSS_KEYS, Indices, SetCriterion, build_weight_dict

__all__ = ["MPCriterion", "mp_weight_dict", "hard_assignment", "MP_SUFFIX"]

MP_SUFFIX = "_mp"
ASSIGNMENTS = ("hard", "hungarian")


def mp_weight_dict(
    class_weight: float, mask_weight: float, dice_weight: float, dec_layers: int, deep_supervision: bool
) -> Dict[str, float]:
    """``loss_{ce,mask,dice}_mp`` (+ ``_<i>`` aux copies) with the given weights."""
    base = build_weight_dict(class_weight, mask_weight, dice_weight, dec_layers, deep_supervision)
    return {_mp_key(k): w for k, w in base.items()}


def _mp_key(key: str) -> str:
    """loss_ce -> loss_ce_mp, loss_ce_3 -> loss_ce_mp_3."""
    for base in BASE_LOSS_KEYS:
        if key == base or key.startswith(base + "_"):
            return base + MP_SUFFIX + key[len(base):]
    raise KeyError(key)


def hard_assignment(num_groups: int, max_targets: int, num_targets: Sequence[int]) -> Indices:
    """Per image (slot indices, GT indices): slot g * max_targets + j <-> GT j for j < T_b and every g."""
    indices = []
    for count in num_targets:
        j = torch.arange(count, dtype=torch.int64)
        groups = torch.arange(num_groups, dtype=torch.int64)[:, None] * max_targets
        indices.append(((groups + j[None]).flatten(), j.repeat(num_groups)))
    return indices


@CRITERION_REGISTRY.register()
class MPCriterion(SetCriterion):
    """:class:`SetCriterion` for the matching part plus the MP part's losses (``outputs["mp_outputs"]``,
    see :class:`qsegformers.decoders.mp_former.MPMaskedTransformerDecoder`)."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        *,
        deep_supervision: bool = True,
        mp_enabled: bool = True,
        mp_cls_loss: bool = True,
        mp_assignment: str = "hard",
    ):
        """
        Args (besides :class:`SetCriterion`'s):
            mp_enabled: the decoder adds an MP part in training; the MP keys are then always returned
                (zero in a step without MP part, so every rank reports the same keys).
            mp_cls_loss: add the MP classification loss.
            mp_assignment: "hard" (slot -> its GT) or "hungarian" (each group matched on its own; ablation).
        """
        if mp_assignment not in ASSIGNMENTS:
            raise ValueError(f"MODEL.MP.ASSIGNMENT must be one of {ASSIGNMENTS}, got {mp_assignment!r}")
        super().__init__(
            num_classes,
            matcher,
            weight_dict,
            eos_coef,
            losses,
            num_points,
            oversample_ratio,
            importance_sample_ratio,
            deep_supervision=deep_supervision,
        )
        self.mp_enabled = mp_enabled
        self.mp_losses = ["labels", "masks"] if mp_cls_loss else ["masks"]
        self.mp_assignment = mp_assignment

    @classmethod
    def config_kwargs(cls, cfg, num_classes: int, matcher: nn.Module) -> Dict:
        """:class:`SetCriterion`'s arguments plus the MP options and the MP loss weights."""
        mf = cfg.MODEL.MASK_FORMER
        opts = mp_options(cfg)
        kwargs = super().config_kwargs(cfg, num_classes, matcher)
        mult = opts["loss_weight_mult"]
        kwargs["weight_dict"].update(
            mp_weight_dict(
                mf.CLASS_WEIGHT * mult, mf.MASK_WEIGHT * mult, mf.DICE_WEIGHT * mult, mf.DEC_LAYERS, mf.DEEP_SUPERVISION
            )
        )
        kwargs.update(mp_enabled=opts["enabled"], mp_cls_loss=opts["cls_loss"], mp_assignment=opts["assignment"])
        return kwargs

    def mp_match(self, outputs: Dict, targets: List[Dict], num_groups: int, max_targets: int) -> Indices:
        """Assignment of one MP output dict (B x P predictions): hard, or Hungarian per group."""
        if self.mp_assignment == "hard":
            return hard_assignment(num_groups, max_targets, [len(t["labels"]) for t in targets])
        per_group = []
        for g in range(num_groups):
            lo, hi = g * max_targets, (g + 1) * max_targets
            group = {k: outputs[k][:, lo:hi] for k in ("pred_logits", "pred_masks")}
            per_group.append([(src + lo, tgt) for src, tgt in self.match(group, targets)])
        return [
            (torch.cat([g[b][0] for g in per_group]), torch.cat([g[b][1] for g in per_group]))
            for b in range(len(targets))
        ]

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Unweighted matched losses (:meth:`SetCriterion.forward`) plus the MP losses when MP is enabled."""
        losses = super().forward({k: v for k, v in outputs.items() if k != "mp_outputs"}, targets)
        if not self.mp_enabled:
            return losses
        # Called on every rank in every step (it all-reduces), whether or not this rank has an MP part.
        num_masks = self.get_num_masks(targets, outputs["pred_logits"].device)
        num_aux = len(outputs.get("aux_outputs", [])) if self.deep_supervision else 0
        suffixes = [""] + [f"_{i}" for i in range(num_aux)]
        mp_out = outputs.get("mp_outputs")
        if mp_out is None:
            # No GT in this step: the same keys as a step with MP, at zero, still in the graph.
            zero = outputs["pred_logits"].sum() * 0.0
            keys = [k for k in (("loss_ce",) if "labels" in self.mp_losses else ()) + ("loss_mask", "loss_dice")]
            return {**losses, **{k + MP_SUFFIX + s: zero.clone() for k in keys for s in suffixes}}
        groups, max_targets = mp_out["num_groups"], mp_out["max_targets"]
        mp_masks = num_masks * groups
        predictions = [mp_out] + (list(mp_out.get("aux_outputs", [])) if self.deep_supervision else [])
        for suffix, pred in zip(suffixes, predictions):
            indices = self.mp_match(pred, targets, groups, max_targets)
            losses.update(self.compute_losses(pred, targets, indices, mp_masks, MP_SUFFIX + suffix, self.mp_losses))
        return losses

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", mp_enabled={self.mp_enabled}, mp_losses={self.mp_losses}, mp_assignment={self.mp_assignment}"
        )
