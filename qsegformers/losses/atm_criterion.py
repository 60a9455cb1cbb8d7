"""SegViT's criterion (spec: shared/specs/segvit.md, section 3): fixed query = class assignment, and for
every prediction (each ATM stage, or each layer of the Shrunk head) either

* ``loss_type="mask"`` (default): ``loss_ce`` the (K+1)-way CE of every query (absent classes -> no-object,
  weighted ``eos_coef``, from :class:`SetCriterion`), and the dense ``loss_mask`` (sigmoid focal) and
  ``loss_dice`` of the present classes' mask logits, bilinearly upsampled to the target resolution
  (:class:`~qsegformers.losses.fixed_criterion.FixedMatchingCriterion`), or
* ``loss_type="ce"`` (Table 4 ablation): ``loss_sem_ce``, a per-pixel K-way CE on the semantic scores
  ``sum_q softmax(l_q)[c] sigmoid(m_q)`` (the inference output, used as logits), ignoring uncovered pixels.

Aux predictions get the same terms suffixed ``_<i>`` and the same weights.
"""
import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registries import CRITERION_REGISTRY
from .criterion import Indices, LossFn
from .fixed_criterion import FixedMatchingCriterion
from .semask_prior import IGNORE_LABEL, semantic_targets, semask_prior_loss

__all__ = ["ATMCriterion", "LOSS_TYPES", "semantic_scores"]

LOSS_TYPES = ("mask", "ce")
_AUX_SUFFIX = re.compile(r"_\d+$")


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """B x Q x (K+1) class logits, B x Q x H x W mask logits -> B x K x H x W ``sum_q p_q[c] sigmoid(m_q)``."""
    return torch.einsum("bqc,bqhw->bchw", pred_logits.softmax(-1)[..., :-1], pred_masks.sigmoid())


@CRITERION_REGISTRY.register()
class ATMCriterion(FixedMatchingCriterion):
    """Class CE + dense focal/dice mask losses with query k <-> class k, or the per-pixel CE variant."""

    def __init__(
        self,
        num_classes: int,
        *,
        matcher: Optional[nn.Module] = None,
        class_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loss_type: str = "mask",
        ignore_value: int = IGNORE_LABEL,
        deep_supervision: bool = True,
    ):
        """
        Args:
            num_classes: K (= number of queries; the no-object class is K).
            matcher: a FixedMatcher (a new one when None); any other matcher is an error.
            class_weight, focal_weight, dice_weight: weights of loss_ce, loss_mask, loss_dice.
            ce_weight: weight of loss_sem_ce (loss_type "ce").
            eos_coef: CE weight of the no-object class.
            focal_alpha, focal_gamma: of the focal mask loss.
            loss_type: "mask" or "ce".
            ignore_value: label of pixels no target mask covers (loss_type "ce").
            deep_supervision: also supervise ``outputs["aux_outputs"]``.
        """
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"MODEL.ATM.LOSS_TYPE must be one of {LOSS_TYPES}, got {loss_type!r}")
        weight_dict = (
            {"loss_ce": class_weight, "loss_mask": focal_weight, "loss_dice": dice_weight}
            if loss_type == "mask"
            else {"loss_sem_ce": ce_weight}
        )
        super().__init__(
            num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            losses=["labels", "masks"] if loss_type == "mask" else ["sem_ce"],
            eos_coef=eos_coef,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            mask_loss_sampling="dense",
            deep_supervision=deep_supervision,
        )
        self.loss_type = loss_type
        self.ignore_value = ignore_value

    def term_functions(self) -> Dict[str, LossFn]:
        return {**super().term_functions(), "sem_ce": self.loss_sem_ce}

    @classmethod
    def from_config(cls, cfg, num_classes: int, matcher) -> "ATMCriterion":
        atm = cfg.MODEL.ATM
        return cls(
            num_classes,
            matcher=matcher,
            class_weight=atm.CLASS_WEIGHT,
            focal_weight=atm.FOCAL_WEIGHT,
            dice_weight=atm.DICE_WEIGHT,
            ce_weight=atm.CE_WEIGHT,
            eos_coef=atm.NO_OBJECT_WEIGHT,
            focal_alpha=atm.FOCAL_ALPHA,
            focal_gamma=atm.FOCAL_GAMMA,
            loss_type=atm.LOSS_TYPE,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            deep_supervision=cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION,
        )

    def loss_sem_ce(self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float) -> Dict:
        """Per-pixel CE of the semantic scores (upsampled to the targets) against the painted label map.

        Returns {"loss_sem_ce": scalar}.
        """
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        masks = F.interpolate(outputs["pred_masks"].float(), size=(height, width), mode="bilinear", align_corners=False)
        scores = semantic_scores(outputs["pred_logits"].float(), masks)
        gt = semantic_targets(targets, (height, width), self.ignore_value).to(scores.device)
        return {"loss_sem_ce": semask_prior_loss(scores, gt, self.ignore_value)}

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply each loss by its weight; an aux copy ``<key>_<i>`` takes the weight of ``<key>``."""
        weights = {k: self.weight_dict.get(k, self.weight_dict.get(_AUX_SUFFIX.sub("", k))) for k in losses}
        missing = [k for k, w in weights.items() if w is None]
        if missing:
            raise KeyError(f"ATMCriterion: losses {missing} have no weight (known: {sorted(self.weight_dict)})")
        return {k: v * weights[k] for k, v in losses.items()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, loss_type={self.loss_type}, weights={self.weight_dict}, "
            f"eos_coef={self.eos_coef}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"deep_supervision={self.deep_supervision}"
        )
