"""Bipartite (Hungarian) matching of predicted queries to ground-truth segments.

The cost of assigning query q to target t is

    cost_class * class_cost(q, t) + cost_mask * BCE(q, t) + cost_dice * dice(q, t),

with the mask terms computed on ``num_points`` uniformly random points shared by all predictions
and targets of an image, so predictions and targets may have different resolutions.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..layers.mask_costs import batch_dice_cost, batch_sigmoid_ce_cost
from ..layers.point_sampling import point_sample
from ..registries import MATCHER_REGISTRY

__all__ = ["HungarianMatcher"]


@MATCHER_REGISTRY.register()
class HungarianMatcher(nn.Module):
    """Softmax-head Hungarian matcher (Mask2Former).

    Subclasses for other heads override :meth:`class_cost` (e.g. a sigmoid head without a
    no-object column).
    """

    @configurable
    def __init__(self, *, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_mask: weight of the sigmoid BCE mask cost.
            cost_dice: weight of the dice mask cost.
            num_points: points sampled per image on which masks are compared.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0 (MODEL.MASK_FORMER.{CLASS,MASK,DICE}_WEIGHT)")
        if num_points <= 0:
            raise ValueError(
                f"HungarianMatcher: num_points (MODEL.MASK_FORMER.TRAIN_NUM_POINTS) must be > 0, got {num_points}"
            )
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mf.CLASS_WEIGHT,
            "cost_mask": mf.MASK_WEIGHT,
            "cost_dice": mf.DICE_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
        }

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Classification cost of one image.

        Args:
            logits: Q x (K+1) class logits (last column = no-object).
            labels: T int64 target classes in [0, K).

        Returns:
            Q x T cost: minus the softmax probability of each target's class. (1 - p would give
            the same assignment; the constant is dropped.)
        """
        return -logits.softmax(-1)[:, labels]

    def cost_matrix(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        tgt_masks: torch.Tensor,
    ) -> torch.Tensor:
        """Total matching cost of one image.

        Args:
            logits: Q x C class logits.
            masks: Q x H x W mask logits.
            labels: T int64 target classes.
            tgt_masks: T x H' x W' binary target masks (any dtype).

        Returns:
            Q x T cost, in float32 or float64 (half inputs are promoted).
        """
        dtype = torch.promote_types(masks.dtype, torch.float32)
        masks = masks.to(dtype)
        tgt_masks = tgt_masks.to(dtype)
        num_queries, num_targets = masks.shape[0], tgt_masks.shape[0]
        # One set of points for the whole image, so every (q, t) pair is compared at the same places.
        point_coords = torch.rand(1, self.num_points, 2, dtype=dtype, device=masks.device)
        with torch.autocast(device_type=masks.device.type, enabled=False):
            tgt_points = point_sample(
                tgt_masks[:, None], point_coords.expand(num_targets, -1, -1), align_corners=False
            ).squeeze(1)
            pred_points = point_sample(
                masks[:, None], point_coords.expand(num_queries, -1, -1), align_corners=False
            ).squeeze(1)
            cost_mask = batch_sigmoid_ce_cost(pred_points, tgt_points)
            cost_dice = batch_dice_cost(pred_points, tgt_points)
            cost_class = self.class_cost(logits.to(dtype), labels)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": B x Q x C class logits, "pred_masks": B x Q x H x W mask logits}.
            targets: B dicts {"labels": T_b int64, "masks": T_b x H' x W' binary masks}.

        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, T_b); query
            ``pred_idx[i]`` is assigned target ``tgt_idx[i]``.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {pred_logits.shape[0]} predictions but {len(targets)} targets")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, target["masks"]).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "HungarianMatcher: the matching cost has NaN/Inf entries; the predictions diverged"
                )
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
