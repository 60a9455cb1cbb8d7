"""Base of the fixed-matching criteria (query k <-> class k: SegViT's ATM, PFT): the FixedMatcher check and
the focal + dice mask losses of the present classes, shared instead of repeated per method.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..matching.fixed import FixedMatcher
from .criterion import Indices, SetCriterion
from .mask_losses import (
    calculate_uncertainty,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sigmoid_focal_loss,
)

__all__ = ["FixedMatchingCriterion", "MASK_LOSS_SAMPLINGS", "DEFAULT_NUM_POINTS"]

MASK_LOSS_SAMPLINGS = ("dense", "points")
DEFAULT_NUM_POINTS = 112 * 112  # Mask2Former's points per mask, for mask_loss_sampling="points"


class FixedMatchingCriterion(SetCriterion):
    """:class:`SetCriterion` with the fixed assignment and focal/dice ``loss_masks``.

    ``loss_masks``: focal and dice losses of the matched (present classes') mask logits, either "dense"
    (B x Q x h x w logits bilinearly upsampled to the target resolution) or on Mask2Former's
    importance-sampled "points".
    """

    assignment_is_fixed = True  # query k <-> class k, the same for every output

    def __init__(
        self,
        num_classes: int,
        *,
        matcher: Optional[nn.Module],
        weight_dict: Dict[str, float],
        losses: Sequence[str],
        eos_coef: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_loss_sampling: str = "dense",
        num_points: int = DEFAULT_NUM_POINTS,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        """
        Args:
            num_classes: K (= queries).
            matcher: a FixedMatcher (a new one when None); any other matcher is an error.
            weight_dict, losses, eos_coef, deep_supervision: as in :class:`SetCriterion` (eos_coef 1.0: the
                no-object class, where there is one, is not down-weighted).
            focal_alpha, focal_gamma: of the focal mask loss.
            mask_loss_sampling: "dense" or "points".
            num_points, oversample_ratio, importance_sample_ratio: point sampling, for "points".
        """
        matcher = FixedMatcher() if matcher is None else matcher
        if not isinstance(matcher, FixedMatcher):
            raise TypeError(
                f"{type(self).__name__} needs the FixedMatcher (query k = class k), got {type(matcher).__name__}; "
                "leave MODEL.MASK_FORMER.MATCHER_NAME empty or set it to 'FixedMatcher'."
            )
        if mask_loss_sampling not in MASK_LOSS_SAMPLINGS:
            raise ValueError(
                f"{type(self).__name__}: mask_loss_sampling must be one of {MASK_LOSS_SAMPLINGS}, got {mask_loss_sampling!r}"
            )
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
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_loss_sampling = mask_loss_sampling

    def loss_masks(self, outputs: Dict, targets: List[Dict], indices: Indices, num_masks: float) -> Dict:
        """Focal and dice losses of the matched mask logits. Returns {"loss_mask": scalar, "loss_dice": scalar}."""
        pred_masks = outputs["pred_masks"]
        batch_idx, src_idx = self._src_permutation_idx(indices)
        if batch_idx.numel() == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src = pred_masks[batch_idx.to(pred_masks.device), src_idx.to(pred_masks.device)][:, None].float()
        tgt = self._matched_target_masks(targets, indices).to(src)[:, None]
        if self.mask_loss_sampling == "dense":
            src = F.interpolate(src, size=tgt.shape[-2:], mode="bilinear", align_corners=False)
        else:
            with torch.no_grad():
                coords = get_uncertain_point_coords_with_randomness(
                    src, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )
                tgt = point_sample(tgt, coords, align_corners=False)
            src = point_sample(src, coords, align_corners=False)
        return {
            "loss_mask": sigmoid_focal_loss(src, tgt, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma),
            "loss_dice": dice_loss(src, tgt, num_masks),
        }
